"""The study's schema, one home for its defaults, and its checks (StudySettings and its parts; hpcgan.sweep.compose
builds one from configs/study/<name>.yaml). Also the names every module of the package shares (stages, states,
file names, errors).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from hpcgan import CONFIG_DIR, REPO_ROOT
from hpcgan.settings import MISSING, SettingsError, check_choice, check_range, override_key

FORMAT = 1
STAGES = ("simulate", "shard", "features", "train", "generate", "evaluate", "classify", "rival")
EXECUTORS = ("auto", "slurm", "local")
STATES = ("finished", "running", "requeued", "pending", "failed", "missing")
ACTIVE = ("running", "requeued", "pending")
STUDY_FILE, SUBMISSIONS = "study.json", "submissions.jsonl"
SIMULATOR_LAYOUTS = ("pbc", "aml", "lab")
TOOLS = REPO_ROOT / "tools"


class SweepError(RuntimeError):
    """A study that cannot be launched as asked; the message says what to change."""


class TaskError(RuntimeError):
    """A task that did not finish; the message names the task, why, and its log."""


@dataclass
class Resources:
    """What one task of a stage asks Slurm for; None = the cluster file's (cluster.resources)."""
    nodes: int | None = None
    gpus: int | None = None               # per node
    cpus: int | None = None               # per task (= per node); torchrun's workers share them
    mem_gb: float | None = None           # None: the partition's default
    time_min: int | None = None
    ranks: int | None = None              # torchrun workers per node; None: gpus, or 1 without GPUs
    array_parallelism: int | None = None  # the array's %N: tasks of the stage running at once
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch: dict[str, Any] = field(default_factory=dict)   # more sbatch options: {exclusive: true, ...}

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus", "time_min", "ranks", "array_parallelism"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 1)
        for name in ("gpus", "mem_gb"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 0)


def default_resources() -> Resources:
    return Resources(nodes=1, gpus=0, cpus=2, time_min=60, array_parallelism=64)


@dataclass
class ClusterSettings:
    """The site a study runs on (configs/cluster/default.yaml documents the same values; edit it once)."""
    resources: Resources = field(default_factory=default_resources)   # every stage's, unless it says otherwise
    setup: list[str] = field(default_factory=list)   # shell lines in every job before the task (module load ...)
    python: str | None = None          # interpreter on the compute nodes; None: the one running the launch
    signal_delay_s: int = 120          # USR2 this long before the time limit: checkpoint, requeue, resume
    max_requeues: int = 3              # time-limit requeues of one task (preemptions do not count)
    kill_on_invalid_dep: bool = True   # cancel a task whose upstream failed instead of leaving it pending
    max_array_size: int = 1000         # tasks per array, below the site's MaxArraySize (Slurm's default 1001)

    def __post_init__(self) -> None:
        check_range("cluster.signal_delay_s", self.signal_delay_s, 10)
        check_range("cluster.max_requeues", self.max_requeues, 0)
        check_range("cluster.max_array_size", self.max_array_size, 1)


@dataclass
class DataSettings:
    shards: Any = None                 # a shard set; several sizes: {size: dir}, or "{size}" in the path
    sources: dict[str, str] | None = None   # else {pbc: DIR, aml: DIR, lab: DIR} sharded at every size here
    simulate_scale: float = 1.0        # else the embedded simulator at this scale (tools/simulate.py)
    seed: int = 0                      # simulator and split seed
    shard: list[str] = field(default_factory=list)   # more tools/shard.py overrides (test_fraction=0.3, ...)
    # scarcity study: {class: N} cuts the train split that every GAN and classifier of the study trains on
    # (hpcgan.data.scarce); the cut of seed s is the one GAN seed s trains on and its classifiers use
    scarce: dict[str, int] | None = None

    def __post_init__(self) -> None:
        for name, n in (self.scarce or {}).items():
            check_range(f"data.scarce.{name}", n, 1)
        if self.shards is not None and not isinstance(self.shards, (str, dict)):
            raise SettingsError(f"data.shards={self.shards!r}: a shard directory, or {{size: directory}}")
        if self.sources is not None:
            unknown = sorted(set(self.sources) - set(SIMULATOR_LAYOUTS))
            if unknown or not self.sources:
                raise SettingsError(f"data.sources: give some of {', '.join(SIMULATOR_LAYOUTS)} (got {unknown or 'none'})")
        check_range("data.simulate_scale", self.simulate_scale, 0)


@dataclass
class GanVariant:
    """A model trained under a name of its own, with overrides over the model's (a lever of a screen)."""
    model: str = MISSING
    overrides: list[str] = field(default_factory=list)


@dataclass
class GanGrid:
    models: list[str] = field(default_factory=lambda: ["wgan_gp_ac"])   # model specs, or names in `variants`
    seeds: list[int] = field(default_factory=lambda: [0])
    sizes: list[int] = field(default_factory=lambda: [128])
    steps: int | None = None           # None: hpcgan.train's epochs
    overrides: list[str] = field(default_factory=list)              # hpcgan.train overrides for every run
    model_overrides: dict[str, list[str]] = field(default_factory=dict)  # ... and per model
    # {name: {model: SPEC, overrides: [...]}}: SPEC trained again under `name` (gan.models lists it), with the
    # spec's model_overrides and then these (e.g. a longer budget); its runs, sets and rows are named `name`
    variants: dict[str, GanVariant] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from hpcgan.images import check_image_size
        known = model_names()
        check_study_keys("gan.overrides", self.overrides, "gan")
        for m, extra in self.model_overrides.items():
            check_study_keys(f"gan.model_overrides.{m}", extra, "gan")
        for name, v in self.variants.items():
            check_variant_name(f"gan.variants.{name}", name, known)
            check_study_keys(f"gan.variants.{name}.overrides", v.overrides, "gan")
            if v.model not in known:
                raise SettingsError(f"gan.variants.{name}.model: unknown model {v.model!r}; choose from "
                                    f"{', '.join(known)}")
        for m in self.models:
            if m not in known and m not in self.variants:
                raise SettingsError(f"gan.models: unknown model {m!r}; choose from {', '.join(known)} or a name "
                                    "in gan.variants")
        for m in self.model_overrides:   # a model left out of gan.models (gan.models=[a,b] on the command line)
            if m not in known:          # keeps its overrides unused; an unknown name is a typo
                raise SettingsError(f"gan.model_overrides: unknown model {m!r}; choose from {', '.join(known)}")
        check_grid("gan", models=self.models, seeds=self.seeds, sizes=self.sizes)
        for s in self.seeds:
            check_range("gan.seeds", s, 0)
        for size in self.sizes:
            check_image_size(size, "gan.sizes")
        if self.steps is not None:
            check_range("gan.steps", self.steps, 1)

    def spec(self, name: str) -> str:
        """The model spec a name of gan.models trains (itself, or its variant's)."""
        return self.variants[name].model if name in self.variants else name

    def train_overrides(self, name: str) -> list[str]:
        """hpcgan.train overrides of one name: every run's, its spec's, then its variant's."""
        spec = self.spec(name)
        extra = self.variants[name].overrides if name in self.variants else []
        return [*self.overrides, *self.model_overrides.get(spec, []), *extra]


@dataclass
class SyntheticVariant:
    """A synthetic set of another name from a GAN of gan.models, with tools/generate.py overrides (curate=true)."""
    gan: str = MISSING
    overrides: list[str] = field(default_factory=list)


@dataclass
class GenerateStage:
    models: list[str] = field(default_factory=lambda: ["wgan_gp_ac"])   # [] = no synthetic sets; names of
                                                                        # gan.models or of `variants`
    balance: str = "max"               # every set tops each class up to this (max: the largest class)...
    per_class: int | None = None       # ... or, when set, holds this many images of every class (then a regime
                                       # may take synthetic_count=N <= per_class; topup takes the first it needs)
    overrides: list[str] = field(default_factory=list)
    variants: dict[str, SyntheticVariant] = field(default_factory=dict)   # {name: {gan: NAME, overrides: [...]}}

    def __post_init__(self) -> None:
        if self.per_class is not None:
            check_range("generate.per_class", self.per_class, 1)
            if self.balance != "max":
                raise SettingsError(f"generate.balance={self.balance} and generate.per_class={self.per_class} "
                                    "both say how many images a set holds; set one of them (generate.per_class=null for balance)")
        check_study_keys("generate.overrides", self.overrides, "generate")
        for name, v in self.variants.items():
            check_study_keys(f"generate.variants.{name}.overrides", v.overrides, "generate")

    def source(self, name: str) -> str:
        """The gan.models name whose run makes the set called `name`."""
        return self.variants[name].gan if name in self.variants else name

    def set_overrides(self, name: str) -> list[str]:
        """tools/generate.py overrides of one set: every set's, then its variant's."""
        return [*self.overrides, *(self.variants[name].overrides if name in self.variants else [])]

    def how(self) -> dict:
        """How many images every set holds: tools/generate.py's per_class=N or balance=TARGET."""
        return {"per_class": self.per_class} if self.per_class is not None else {"balance": self.balance}


@dataclass
class EvaluateStage:
    enabled: bool = True
    features: str = "cell"
    metrics: list[str] | None = None   # None: hpcgan.evaluate's defaults
    n_per_class: int | None = None
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from hpcgan.metrics import check_names
        check_choice("evaluate.features", self.features, ("cell", "inception"))
        if self.metrics is not None:
            try:
                check_names(self.metrics)
            except ValueError as e:
                raise SettingsError(f"evaluate.metrics: {e}") from None
        if self.n_per_class is not None:
            check_range("evaluate.n_per_class", self.n_per_class, 1)
        check_study_keys("evaluate.overrides", self.overrides, "evaluate")


@dataclass
class ClassifyGrid:
    enabled: bool = True
    archs: list[str] = field(default_factory=lambda: ["small_cnn"])
    regimes: list[str] = field(default_factory=lambda: ["original", "original+synthetic"])
    seeds: list[int] = field(default_factory=lambda: [0])
    sizes: list[int] | None = None     # None: gan.sizes
    overrides: list[str] = field(default_factory=list)   # tools/classify.py overrides for every run
    # the cheap rival, found at run time (hpcgan.classify.rival): {sampling: [...], loss: [...], augment: [...]}
    # (an axis left out: all its values), every combination one run of the first seed scored on val; null: none
    rival_search: dict[str, list[str]] | None = None
    full: bool = False                 # the winner on the uncut train split too (the `full` row; needs the search)
    on_rival: list[str] = field(default_factory=list)   # regimes run over the winner's recipe (axes they set win)
    more_real: list[int] = field(default_factory=list)   # the winner, cut classes at N real cells (compose checks)

    def __post_init__(self) -> None:
        check_study_keys("classify.overrides", self.overrides, "classify")
        if self.enabled:
            from hpcgan.classify.archs import get_arch
            from hpcgan.classify.regimes import get_regime
            check_grid("classify", archs=self.archs, regimes=self.regimes, seeds=self.seeds)
            for name, check in (("archs", get_arch), ("regimes", get_regime), ("on_rival", get_regime)):
                for value in getattr(self, name):
                    try:
                        check(value)
                    except ValueError as e:
                        raise SettingsError(f"classify.{name}: {e}") from None
            if self.rival_search is None and (self.full or self.on_rival or self.more_real):
                raise SettingsError("classify.full, classify.on_rival and classify.more_real take the rival "
                                    "search's winner: set classify.rival_search ({} searches every recipe)")
            self.search_grid()

    def search_grid(self) -> list[dict[str, str]]:
        """The rival search's recipes (none without classify.rival_search)."""
        from hpcgan.classify.rival import search_grid
        if self.rival_search is None:
            return []
        try:
            return search_grid(self.rival_search)
        except ValueError as e:
            raise SettingsError(f"classify.{e}") from None


@dataclass
class StudySettings:
    """A study: configs/study/<name>.yaml over these defaults (one home), its cluster in `cluster`."""
    name: str = "study"
    data: DataSettings = field(default_factory=DataSettings)
    gan: GanGrid = field(default_factory=GanGrid)
    generate: GenerateStage = field(default_factory=GenerateStage)
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    classify: ClassifyGrid = field(default_factory=ClassifyGrid)
    resources: dict[str, Resources] = field(default_factory=dict)   # per stage, over cluster.resources
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise SettingsError(f"name={self.name!r}: letters, digits, _ . - only (it names the Slurm jobs)")
        for stage in self.resources:
            check_choice("resources", stage, STAGES)
        self._check_generate()
        if self.classify.enabled:
            self._check_synthetic_counts()
            if any(needs_synthetic(r) for r in self.classify.regimes + self.classify.on_rival) and not self.generate.models:
                raise SettingsError(f"classify.regimes {self.classify.regimes + self.classify.on_rival} use synthetic "
                                    "data but generate.models is empty: name the GANs whose synthetic sets feed them")
            for size in self.classify.sizes or ():
                if size not in self.gan.sizes:
                    raise SettingsError(f"classify.sizes: {size} is not in gan.sizes {self.gan.sizes}")

    def _check_generate(self) -> None:
        """generate.models name conditional GANs of gan.models, or set variants of them (those it lists)."""
        for name, v in self.generate.variants.items():
            check_variant_name(f"generate.variants.{name}", name, [*self.gan.models, *model_names()])
            if name in self.generate.models and v.gan not in self.gan.models:   # (one left out: unused)
                raise SettingsError(f"generate.variants.{name}.gan: {v.gan!r} is not trained in this study "
                                    f"(gan.models {self.gan.models})")
        for name in self.generate.models:
            m = self.generate.source(name)
            if m not in self.gan.models:
                raise SettingsError(f"generate.models: {name!r} is not trained in this study (gan.models "
                                    f"{self.gan.models}) nor a name in generate.variants")
            if not model_conditional(self.gan.spec(m)):
                raise SettingsError(f"generate.models: {m!r} is unconditional and cannot make a chosen class; "
                                    "balanced synthetic sets need a conditional model (wgan_gp_ac, acgan, cgan)")

    def _check_synthetic_counts(self) -> None:
        """Sets that top the classes up (generate.balance) cannot feed a regime that takes N or Nx synthetic
        images of every class, nor sets of generate.per_class one that may take more than that (N > per_class,
        or Nx): either would fail at run time, after the GANs. A top-up from per_class sets is checked then (it
        depends on the data's counts: per_class must reach the largest class less the smallest)."""
        from hpcgan.classify.regimes import get_regime, parse_count
        per_class = self.generate.per_class
        for spec in self.classify.regimes + self.classify.on_rival:
            r = get_regime(spec)
            if not r.reads_synthetic or r.synthetic_count == "topup":
                continue
            kind, n = parse_count(r.synthetic_count)
            if per_class is not None and kind == "n" and n <= per_class:
                continue
            if per_class is not None:
                raise SettingsError(f"classify regime {spec!r}: synthetic_count={r.synthetic_count} may take more "
                                    f"than the generate.per_class={per_class} images each set holds per class; use "
                                    f"synthetic_count=N with N <= {per_class}")
            raise SettingsError(f"classify regime {spec!r}: synthetic_count={r.synthetic_count} takes synthetic "
                                "images of every class, but a study's synthetic sets only top classes up to "
                                f"generate.balance={self.generate.balance}; use synthetic_count=topup here, or set "
                                "generate.per_class=N (sets of N images of every class)")

    def stage_resources(self, stage: str) -> dict:
        """cluster.resources overlaid by resources.<stage> (rival: resources.classify unless it has its own);
        ranks resolved (gpus, or 1)."""
        if stage == "rival" and stage not in self.resources:
            stage = "classify"
        merged = asdict(self.cluster.resources)
        for k, v in asdict(self.resources.get(stage, Resources())).items():
            if k == "sbatch":
                merged["sbatch"] = {**merged["sbatch"], **v}
            elif v is not None:
                merged[k] = v
        merged["ranks"] = merged["ranks"] or max(1, merged["gpus"] or 0)
        return merged


def check_grid(prefix: str, **lists) -> None:
    for name, values in lists.items():
        if not values:
            raise SettingsError(f"{prefix}.{name}: give at least one")
        if len(set(map(str, values))) != len(values):
            raise SettingsError(f"{prefix}.{name}: {values} repeats a value")


# Keys the study writes into every command itself (expand.py), each with where a study sets it: an override of one
# would be silently replaced, or give a run the study cannot find: refused when the study is read (progress= is free).
_WHERE, _DATA = "the study's out= folder", {"shards": "data.shards or data.sources"}
_CUT = {"scarce": "data.scarce", "scarce_seed": "gan.seeds (the cut follows the seed)"}
STUDY_KEYS = {
    "gan": {**_DATA, **_CUT, "run_dir": _WHERE, "seed": "gan.seeds", "model": "a gan.variants entry {model: SPEC}"},
    "generate": {**_DATA, "run": _WHERE, "out": _WHERE, "per_class": "generate.per_class",
                 "balance": "generate.balance", "count": "generate.per_class"},
    "evaluate": {**_DATA, **{k: _WHERE for k in ("run", "out", "results", "checkpoint", "fake", "feature_file",
                                                  "cache_dir")}, "tag": "a gan.variants name",
                 **{k: f"evaluate.{k}" for k in ("features", "metrics", "n_per_class")}},
    "classify": {**_DATA, **_CUT, "out": _WHERE, "arch": "classify.archs", "seed": "classify.seeds",
                 "regime": "classify.regimes (or classify.on_rival)", "synthetic": "generate.models",
                 "synthetic_name": "generate.variants", "recipe_from": "classify.rival_search",
                 "synthetic_count": "a regime's axis: 'original+synthetic synthetic_count=N' in classify.regimes",
                 "tag": "classify.rival_search, classify.full, classify.on_rival or classify.more_real"}}


def check_study_keys(key: str, overrides: list[str], stage: str) -> None:
    """Refuse an override (of `key`) that sets a setting the study gives `stage`'s commands itself."""
    for o in overrides:
        name = override_key(o)
        if name in STUDY_KEYS[stage]:
            raise SettingsError(f"{key}: {o!r} sets {name}, which the study gives every {stage} command itself; "
                                f"set it with {STUDY_KEYS[stage][name]}")


def check_variant_name(key: str, name: str, taken) -> None:
    """A variant's name is a run-directory name of its own: letters, digits, _ . + -, and not a model's."""
    if name in taken or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise SettingsError(f"{key}: a variant needs a name of its own (letters, digits, _ . + -), not a "
                            "model's or a GAN's")


def model_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def model_conditional(name: str) -> bool:
    import yaml
    return bool(yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text()).get("conditional", True))


def needs_synthetic(regime: str) -> bool:
    """Whether a classifier regime reads a synthetic set (hpcgan.classify.regimes says)."""
    from hpcgan.classify.regimes import get_regime
    return get_regime(regime).reads_synthetic
