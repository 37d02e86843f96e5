"""Studies: a grid of stage tasks, one run directory each, submitted at once as Slurm job arrays that wait on
each other (submitit, `afterok`), or run here one after another (executor=local). Resumable and observable.

    python tools/sweep.py study=tiny out=studies/tiny [executor=auto|slurm|local] [gan.steps=8 ...]
    python tools/sweep.py status out=studies/tiny [--watch]

A study (configs/study/<name>.yaml; the cluster it runs on: configs/cluster/<name>.yaml) expands into tasks,
stage by stage (STAGES), each a command of the project's own entry points:
  simulate  tools/simulate.py          the embedded simulator (only when no shards and no sources are given)
  shard     tools/shard.py             the sources at every image size of the grid
  features  tools/train_features.py    the cell extractor of each shard set, once (every evaluation uses it)
  train     hpcgan.train               models x seeds x sizes (torchrun for ranks > 1, rendezvous over nodes)
  generate  tools/generate.py          a balanced synthetic set of each GAN in generate.models
  evaluate  hpcgan.evaluate            every GAN run, one shared feature cache per study
  classify  tools/classify.py          architectures x regimes x seeds (x the synthetic sets, for the regimes
                                       that use one) at every size; with classify.rival_search also the search:
                                       every cheap recipe, one seed, scored on val (hpcgan.classify.rival)
  rival     tools/classify.py          the search's winner (recipe_from=) with every seed on test (`rival`), on
                                       the uncut split (`full`) and under synthetic data (`on_rival`)
Run directories are named by their grid values (gan/wgan_gp_ac-s0-32, synthetic/..., cls/small_cnn-original-s0-32),
so the same study in the same folder always means the same tasks.

On Slurm each stage is one job array (`%N` = resources.<stage>.array_parallelism) whose dependency is `afterok`
on exactly the upstream tasks it needs (their array tasks, or whole arrays), so the whole study is submitted at
once; with `kill_on_invalid_dep` a task whose upstream failed is cancelled instead of pending forever. Before
anything is submitted every stage's request goes through `sbatch --test-only`: a request the partition cannot
meet fails there, naming the stage and sbatch's reason. A task (TaskRunner, a submitit Checkpointable) runs its
command in a subprocess; at the time-limit warning (USR2, cluster.signal_delay_s before the end) or a
preemption, the training saves a checkpoint (hpcgan.train handles USR2/TERM) and the task requeues itself and
resumes from its run directory.

Re-running the launch skips finished tasks (finished() reads the task's own outputs: status.json finished and
results present), leaves running, pending and requeued ones alone (and makes new tasks wait on them), and
submits the failed and missing ones. One run directory never runs twice at once: a task holds
tasks/<name>/lock (host, pid, job id) while it runs; a holder whose process or job is gone is taken over.

Study directory:
  study.json               the settings and every task: stage, command, output, dependencies, resources
  submissions.jsonl        one row per submitted array: stage, job id, its tasks in array order, dependency
  tasks/<task>/state.json  the runner's record: state, attempt, job id, host, pid, times, exit code, error
  tasks/<task>/lock        held while the task runs
  tasks/<task>/output.log  the command's stdout and stderr, every attempt
  submitit/                submitit's job scripts, pickles and logs
  data/ gan/ synthetic/ cls/ cache/   shards, run directories, synthetic sets, the evaluation's cell extractor
                                      and real-feature cache
`status` reads only these files (so it works without Slurm accounting) and adds Slurm's view (squeue, sacct)
when it can.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from hpcgan import CONFIG_DIR, REPO_ROOT
from hpcgan.jsonfile import dumps
from hpcgan.rundir import EXIT_SIGNAL, read_json, read_status, write_json
from hpcgan.settings import SettingsError, check_choice, check_range, parse

logger = logging.getLogger("hpcgan.sweep")

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


# ================================================================ settings

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
class GanGrid:
    models: list[str] = field(default_factory=lambda: ["wgan_gp_ac"])
    seeds: list[int] = field(default_factory=lambda: [0])
    sizes: list[int] = field(default_factory=lambda: [128])
    steps: int | None = None           # None: hpcgan.train's epochs
    overrides: list[str] = field(default_factory=list)              # hpcgan.train overrides for every run
    model_overrides: dict[str, list[str]] = field(default_factory=dict)  # ... and per model

    def __post_init__(self) -> None:
        from hpcgan.images import check_image_size
        known = model_names()
        for m in self.models:
            if m not in known:
                raise SettingsError(f"gan.models: unknown model {m!r}; choose from {', '.join(known)}")
        for m in self.model_overrides:   # a model left out of gan.models (gan.models=[a,b] on the command line)
            if m not in known:          # keeps its overrides unused; an unknown name is a typo
                raise SettingsError(f"gan.model_overrides: unknown model {m!r}; choose from {', '.join(known)}")
        _check_grid("gan", models=self.models, seeds=self.seeds, sizes=self.sizes)
        for s in self.seeds:
            check_range("gan.seeds", s, 0)
        for size in self.sizes:
            check_image_size(size, "gan.sizes")
        if self.steps is not None:
            check_range("gan.steps", self.steps, 1)


@dataclass
class GenerateStage:
    models: list[str] = field(default_factory=lambda: ["wgan_gp_ac"])   # [] = no synthetic sets
    balance: str = "max"
    overrides: list[str] = field(default_factory=list)


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

    def __post_init__(self) -> None:
        if self.enabled:
            from hpcgan.classify.archs import get_arch
            from hpcgan.classify.regimes import get_regime
            _check_grid("classify", archs=self.archs, regimes=self.regimes, seeds=self.seeds)
            for name, check in (("archs", get_arch), ("regimes", get_regime), ("on_rival", get_regime)):
                for value in getattr(self, name):
                    try:
                        check(value)
                    except ValueError as e:
                        raise SettingsError(f"classify.{name}: {e}") from None
            if self.rival_search is None and (self.full or self.on_rival):
                raise SettingsError("classify.full and classify.on_rival take the rival search's winner: set "
                                    "classify.rival_search ({} searches every recipe)")
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
        for m in self.generate.models:
            if m not in self.gan.models:
                raise SettingsError(f"generate.models: {m!r} is not trained in this study (gan.models {self.gan.models})")
            if not model_conditional(m):
                raise SettingsError(f"generate.models: {m!r} is unconditional and cannot make a chosen class; "
                                    "balanced synthetic sets need a conditional model (wgan_gp_ac, acgan, cgan)")
        if self.classify.enabled:
            if any(needs_synthetic(r) for r in self.classify.regimes + self.classify.on_rival) and not self.generate.models:
                raise SettingsError(f"classify.regimes {self.classify.regimes + self.classify.on_rival} use synthetic "
                                    "data but generate.models is empty: name the GANs whose synthetic sets feed them")
            for size in self.classify.sizes or ():
                if size not in self.gan.sizes:
                    raise SettingsError(f"classify.sizes: {size} is not in gan.sizes {self.gan.sizes}")

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


def _check_grid(prefix: str, **lists) -> None:
    for name, values in lists.items():
        if not values:
            raise SettingsError(f"{prefix}.{name}: give at least one")
        if len(set(map(str, values))) != len(values):
            raise SettingsError(f"{prefix}.{name}: {values} repeats a value")


def model_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def model_conditional(name: str) -> bool:
    import yaml
    return bool(yaml.safe_load((CONFIG_DIR / "model" / f"{name}.yaml").read_text()).get("conditional", True))


def needs_synthetic(regime: str) -> bool:
    """Whether a classifier regime reads a synthetic set (hpcgan.classify.regimes says)."""
    from hpcgan.classify.regimes import get_regime
    return get_regime(regime).reads_synthetic


def _add_or_set(override: str) -> str:
    """`a.b=v` as Hydra's add-or-override (`++a.b=v`), so a key the study file does not spell out (a stage's
    `resources.train.gpus`, a model's overrides) can be given like any other; a wrong key is still refused,
    by the schema. Top-level keys (config groups such as cluster=NAME) are left as they are."""
    key = override.split("=", 1)[0]
    return f"++{override}" if "." in key and not key.startswith(("+", "~")) else override


# Settings that select the data: given on the command line they replace the study's value (a cut of basophil
# alone is that cut, not the study's plus basophil); every other mapping (resources, ...) merges as Hydra does.
REPLACED_KEYS = ("data.scarce", "data.sources")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def load_study(name: str, overrides: Iterable[str] = ()) -> StudySettings:
    """configs/study/<name>.yaml (with its cluster file) + Hydra overrides -> StudySettings. `~KEY` removes a
    key (its schema default applies); REPLACED_KEYS are replaced, not merged."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not (CONFIG_DIR / "study" / f"{name}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "study").glob("*.yaml")))
        raise SettingsError(f"study={name}: no configs/study/{name}.yaml (studies: {known})")
    overrides = list(overrides)
    after = [o for o in overrides if o.startswith("~") or _key(o) in REPLACED_KEYS]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(f"study/{name}", overrides=[_add_or_set(o) for o in overrides if o not in after])
        _replace_or_remove(cfg, after)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise SettingsError(" ".join(str(e).split("\nSee https://")[0].split())) from None
    from omegaconf import OmegaConf
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # (a ??? in the study file: merged into the schema it would silently keep the default)
        raise SettingsError(f"study {name}: {', '.join(missing)} required: pass " + " ".join(f"{k}=..." for k in missing))
    return parse(StudySettings, cfg)


def _replace_or_remove(cfg, overrides: list[str]) -> None:
    """Apply `~KEY` (remove) and `KEY=VALUE` (replace whole) overrides to the composed study, in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict
    parser = OverridesParser.create()
    with open_dict(cfg):
        for o in overrides:
            key = _key(o)
            if not _schema_has(StudySettings, key.split(".")):
                raise SettingsError(f"{o}: the study has no key {key}")
            if o.startswith("~"):
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                if node is not None and leaf in node:
                    del node[leaf]
            else:
                OmegaConf.update(cfg, key, parser.parse_override(o.lstrip("+")).value(), merge=False)


def _schema_has(cls, path: list[str]) -> bool:
    """Whether the dotted path names a field of dataclass `cls` (a mapping field takes any key below it)."""
    import dataclasses
    import typing
    if not dataclasses.is_dataclass(cls):
        return True
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if path[0] not in fields:
        return False
    hints = typing.get_type_hints(cls)
    return len(path) == 1 or _schema_has(hints[path[0]], path[1:])


# ================================================================ tasks

@dataclass
class Task:
    """One run directory's worth of work: a command of the project's entry points, and how to tell it is done."""
    name: str                  # unique in the study; also where its bookkeeping lives (tasks/<name>/)
    stage: str
    out: str                   # the directory it writes (absolute)
    argv: list[str]            # after the interpreter: ["-m", "hpcgan.train", "k=v", ...] or [script, ...]
    deps: list[str] = field(default_factory=list)
    grid: dict = field(default_factory=dict)        # the grid values the name is made of
    resources: dict = field(default_factory=dict)   # StudySettings.stage_resources(stage)
    check: dict = field(default_factory=dict)       # see finished()


_SAFE = re.compile(r"[A-Za-z0-9_+.@%~/-]+")


def hydra_value(v: Any) -> str:
    """A value as a Hydra override writes it: plain when safe, a list as [a,b], else single-quoted."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{hydra_value(k)}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, bool):
        return str(v).lower()
    s = str(v)
    if _SAFE.fullmatch(s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def kv(**items) -> list[str]:
    return [f"{k}={hydra_value(v)}" for k, v in items.items() if v is not None]


def slug(value: Any) -> str:
    """A grid value as part of a run-directory name (file-system and Slurm safe)."""
    return re.sub(r"[^A-Za-z0-9_+.-]+", "_", str(value)).strip("_") or "_"


def gan_name(model: str, seed: int, size: int) -> str:
    return f"{slug(model)}-s{seed}-{size}"


def classifier_name(arch: str, regime: str, seed: int, size: int, synthetic_from: str | None = None) -> str:
    parts = [arch, regime] + ([synthetic_from] if synthetic_from else [])
    return "-".join(slug(p) for p in parts) + f"-s{seed}-{size}"


def expand(s: StudySettings, out: str | Path) -> list[Task]:
    """The study's tasks, in stage order (pure: reads nothing but the settings)."""
    out = Path(out).resolve()
    tasks: list[Task] = []
    resources = {stage: s.stage_resources(stage) for stage in STAGES}

    def add(stage: str, name: str, target: Path, argv: list[str], deps=(), grid=None, check=None) -> Task:
        t = Task(name, stage, str(target), [str(a) for a in argv], [d for d in deps if d], grid or {},
                 resources[stage], check or {})
        tasks.append(t)
        return t

    shards = _data_tasks(s, out, add)
    g = s.gan
    for size in g.sizes:
        for model in g.models:
            for seed in g.seeds:
                run = out / "gan" / gan_name(model, seed, size)
                sh, dep = shards[size]
                add("train", f"gan/{gan_name(model, seed, size)}", run,
                    ["-m", "hpcgan.train", *kv(shards=sh, run_dir=run, model=model, seed=seed, steps=g.steps),
                     *scarce_args(s, seed), *g.overrides, *g.model_overrides.get(model, [])],
                    deps=[dep], grid={"model": model, "seed": seed, "size": size}, check={"kind": "run"})
    for size in g.sizes:
        for model in s.generate.models:
            for seed in g.seeds:
                name, sh = gan_name(model, seed, size), shards[size][0]
                run, syn = out / "gan" / name, out / "synthetic" / name
                add("generate", f"synthetic/{name}", syn,
                    [TOOLS / "generate.py", *kv(run=run, out=syn, balance=s.generate.balance, shards=sh,
                                                progress=False), *s.generate.overrides],
                    deps=[f"gan/{name}", shards[size][1]], grid={"model": model, "seed": seed, "size": size},
                    check={"kind": "synthetic", "run": str(run)})
    if s.evaluate.enabled:
        e = s.evaluate
        for size in g.sizes:
            sh = shards[size][0]
            cell = out / "cache" / f"cell-{size}.pt"   # trained once, before the evaluations that share it
            features = add("features", f"data/cell-{size}", cell.parent,
                           [TOOLS / "train_features.py", *kv(shards=sh, out=cell, progress=False)],
                           deps=[shards[size][1]], grid={"size": size}, check={"kind": "file", "file": cell.name})
            for model in g.models:
                for seed in g.seeds:
                    name = gan_name(model, seed, size)
                    run = out / "gan" / name
                    add("evaluate", f"eval/{name}", run / "eval",
                        ["-m", "hpcgan.evaluate", *kv(run=run, shards=sh, features=e.features, metrics=e.metrics,
                                                      n_per_class=e.n_per_class, feature_file=cell,
                                                      cache_dir=out / "cache", progress=False), *e.overrides],
                        deps=[f"gan/{name}", features.name], grid={"model": model, "seed": seed, "size": size},
                        check={"kind": "eval", "run": str(run), "features": e.features})
    if s.classify.enabled:
        _classify_tasks(s, out, shards, add)
    return sorted(tasks, key=lambda t: STAGES.index(t.stage))


def scarce_args(s: StudySettings, seed: int) -> list[str]:
    """The scarce cut's overrides (the same for a GAN of seed `seed` and the classifiers fed by it)."""
    return kv(scarce=s.data.scarce, scarce_seed=seed) if s.data.scarce else []


def _data_tasks(s: StudySettings, out: Path, add) -> dict[int, tuple[str, str | None]]:
    """{size: (shard dir, the task that writes it or None)}: given shards, or shard tasks (of the given
    sources, or of the simulator's output)."""
    d = s.data
    if d.shards:
        return {size: (str(Path(shard_dir(d.shards, size)).resolve()), None) for size in s.gan.sizes}
    sources, sim_task = d.sources, None
    # Process pools take the task's CPUs (a local run's affinity is the whole machine, not the request).
    workers = {stage: s.stage_resources(stage).get("cpus") for stage in ("simulate", "shard")}
    if sources is None:
        sim = out / "data" / "sim"
        sim_task = add("simulate", "data/sim", sim,
                       [TOOLS / "simulate.py", *kv(out=sim, seed=d.seed, scale=d.simulate_scale, progress=False,
                                                   workers=workers["simulate"])],
                       check={"kind": "file", "file": "simulation.json"}).name
        sources = {layout: str(sim / layout) for layout in SIMULATOR_LAYOUTS}
    result = {}
    for size in s.gan.sizes:
        target = out / "data" / f"shards-{size}"
        t = add("shard", f"data/shards-{size}", target,
                [TOOLS / "shard.py", *kv(**{k: str(Path(v).resolve()) for k, v in sorted(sources.items())}),
                 *kv(out=target, size=size, seed=d.seed, progress=False, workers=workers["shard"]), *d.shard],
                deps=[sim_task], grid={"size": size}, check={"kind": "file", "file": "manifest.json"})
        result[size] = (str(target), t.name)
    return result


def shard_dir(shards, size: int) -> str:
    """The shard set of one image size: data.shards as a path ("{size}" replaced) or a {size: path} map."""
    if isinstance(shards, dict):
        found = {int(k): v for k, v in shards.items()}.get(int(size))
        if found is None:
            raise SettingsError(f"data.shards has no entry for size {size} (sizes: {sorted(shards)})")
        return str(found)
    return str(shards).replace("{size}", str(size))


def _classify_tasks(s: StudySettings, out: Path, shards: dict, add) -> None:
    """The classify stage (the grid, and the rival search on the first seed's cut, scored on val) and the rival
    stage (the search's winner: `rival` with every seed, `full` on the uncut split, `on_rival` regimes)."""
    c = s.classify
    search = [" ".join(["original", *(f"{k}={v}" for k, v in axes.items())]) for axes in c.search_grid()]
    for size in c.sizes or s.gan.sizes:
        for arch in c.archs:
            for regime in c.regimes:
                for seed in c.seeds:
                    _classifier(s, out, shards[size], add, "classify", arch, regime, seed, size)
            found = [_classifier(s, out, shards[size], add, "classify", arch, spec, c.seeds[0], size, tag="search",
                                 extra=["score_split=val"]) for spec in search]
            if not found:
                continue
            pick = {"deps": [t.name for t in found], "extra": kv(recipe_from=[t.out for t in found])}
            for seed in c.seeds:
                _classifier(s, out, shards[size], add, "rival", arch, "original", seed, size, tag="rival", **pick)
                if c.full:
                    _classifier(s, out, shards[size], add, "rival", arch, "original", seed, size, tag="full",
                                uncut=True, **pick)
                for regime in c.on_rival:
                    _classifier(s, out, shards[size], add, "rival", arch, regime, seed, size, tag="on_rival", **pick)


def _classifier(s: StudySettings, out: Path, shard: tuple[str, str | None], add, stage: str, arch: str, regime: str,
                seed: int, size: int, tag: str | None = None, deps=(), extra=(), uncut: bool = False):
    """One classifier task per synthetic set the regime reads (one without): a synthetic regime runs on that
    GAN's run with the classifier's seed when the GAN grid has it, else its first seed. Returns the last."""
    from hpcgan.classify.regimes import get_regime
    g, task = s.gan, None
    gan_seed = seed if seed in g.seeds else g.seeds[0]
    for model in (s.generate.models if needs_synthetic(regime) else [None]):
        name = classifier_name(arch, f"{tag}-{get_regime(regime).name}" if tag else regime, seed, size, model)
        run = out / "cls" / name
        syn = out / "synthetic" / gan_name(model, gan_seed, size) if model else None
        task = add(stage, f"cls/{name}", run,
                   [TOOLS / "classify.py", *kv(shards=shard[0], synthetic=syn, arch=arch, regime=regime, seed=seed,
                                               out=run, tag=tag), *([] if uncut else scarce_args(s, gan_seed)),
                    *s.classify.overrides, *extra],
                   deps=[shard[1], f"synthetic/{gan_name(model, gan_seed, size)}" if model else None, *deps],
                   grid={"arch": arch, "regime": regime, "seed": seed, "size": size, "synthetic_from": model,
                         "gan_seed": gan_seed if model else None, "tag": tag},
                   check={"kind": "run", "results": True})
    return task


# ================================================================ is a task done?

def finished(task: Task | dict) -> bool:
    """Whether a task's outputs are complete, from the files alone (its stage's own markers):
    file       out/<file> exists (simulator summary, shard manifest: both written atomically, last)
    run        status.json says finished (train, classify) and, with results, a results.jsonl exists below out
    synthetic  the synthetic set's manifest names the GAN run's final checkpoint
    eval       run/eval/step-<final step>-<features>.json exists and results.jsonl was appended after it
    """
    t = task if isinstance(task, dict) else asdict(task)
    c, out = t["check"], Path(t["out"])
    kind = c.get("kind")
    if kind == "file":
        return (out / c["file"]).is_file()
    if kind == "run":
        return read_status(out).get("state") == "finished" and (not c.get("results") or _has_results(out))
    if kind == "synthetic":
        st, manifest = read_status(c["run"]), read_json(out / "manifest.json") or {}
        ckpt = manifest.get("checkpoint") or {}
        return (st.get("state") == "finished" and ckpt.get("step") == st.get("step")
                and Path(ckpt.get("path", "/")).resolve().parent.parent == Path(c["run"]).resolve())
    if kind == "eval":
        st = read_status(c["run"])
        if st.get("state") != "finished":
            return False
        doc, rows = out / f"step-{int(st['step']):08d}-{c['features']}.json", out / "results.jsonl"
        return doc.is_file() and rows.is_file() and rows.stat().st_mtime >= doc.stat().st_mtime
    raise ValueError(f"task {t['name']}: unknown check {c!r}")


def _has_results(out: Path) -> bool:
    return any(p.stat().st_size > 0 for p in out.rglob("results.jsonl"))


# ================================================================ the study directory

def read_study(out: str | Path) -> dict:
    doc = read_json(Path(out) / STUDY_FILE)
    if not doc:
        raise SweepError(f"{out}: no {STUDY_FILE}; launch the study first (python tools/sweep.py study=NAME out={out})")
    doc["by_name"] = {t["name"]: t for t in doc["tasks"]}
    return doc


def write_study(out: Path, s: StudySettings, tasks: list[Task], study: str, overrides: list[str],
                executor: str) -> dict:
    old = read_json(out / STUDY_FILE) or {}
    before = {t["name"]: t["argv"] for t in old.get("tasks", [])}
    changed = [t.name for t in tasks if t.name in before and before[t.name] != t.argv]
    if changed:
        logger.warning("%d task(s) have a different command than at the last launch (e.g. %s); finished ones "
                       "are not rerun: delete a run directory to redo it", len(changed), changed[0])
    doc = {"format": FORMAT, "study": study, "overrides": list(overrides), "name": s.name, "executor": executor,
           "created": old.get("created", time.time()), "updated": time.time(), "repo": str(REPO_ROOT),
           "settings": asdict(s), "stages": list(STAGES), "tasks": [asdict(t) for t in tasks]}
    for t in doc["tasks"]:
        t["command"] = shlex.join(["python", *t["argv"]])
    write_json(out / STUDY_FILE, doc)
    return read_study(out)


def record_submission(out: Path, row: dict) -> None:
    """Append one row to submissions.jsonl in one write (O_APPEND: concurrent writers do not interleave)."""
    data = (dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(Path(out) / SUBMISSIONS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_submissions(out: Path) -> list[dict]:
    path = Path(out) / SUBMISSIONS
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def latest_jobs(submissions: list[dict]) -> dict[str, dict]:
    """{task: {"job": its Slurm job id (ARRAY_INDEX for an array) or None, "executor", "host", "pid"}} of
    the newest submission that holds each task."""
    latest = {}
    for row in submissions:
        for i, name in enumerate(row["tasks"]):
            job = None
            if row.get("job_id"):
                job = f"{row['job_id']}_{i}" if row.get("array") else str(row["job_id"])
            latest[name] = {"job": job, "executor": row.get("executor"), "host": row.get("host"),
                            "pid": row.get("pid"), "time": row.get("time")}
    return latest


class TaskFiles:
    """tasks/<name>/: state.json, lock, output.log."""

    def __init__(self, study_dir: str | Path, name: str):
        self.name, self.dir = name, Path(study_dir) / "tasks" / name
        self.state_path, self.lock_path, self.log = self.dir / "state.json", self.dir / "lock", self.dir / "output.log"

    def state(self) -> dict:
        return read_json(self.state_path, {}) or {}

    def update(self, **fields) -> dict:
        state = {**self.state(), **fields, "updated": time.time()}
        write_json(self.state_path, state)
        return state

    def holder(self) -> dict | None:
        return read_json(self.lock_path) if self.lock_path.exists() else None

    @contextlib.contextmanager
    def locked(self, owner: dict):
        """Hold the lock for the block. A lock held by a live other process or job raises TaskError; one
        left by a process or job that is gone (or by this very job, requeued) is taken over."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                held = self.holder()
                if held is None:  # being written this instant, or unreadable: look again
                    time.sleep(0.2)
                    if self.holder() is None and self.lock_path.exists():
                        _take_over(self.lock_path)
                    continue
                same_job = owner.get("job") and held.get("job") == owner.get("job")
                if not same_job and holder_alive(held):
                    raise TaskError(f"{self.name}: already running ({describe_holder(held)}); not starting it "
                                    f"twice. If that is wrong, delete {self.lock_path}")
                logger.info("taking over the lock of %s (%s is gone)", self.dir, describe_holder(held))
                _take_over(self.lock_path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            break
        else:
            raise TaskError(f"could not take {self.lock_path}: delete it if no task is running")
        try:
            yield
        finally:
            if (self.holder() or {}).get("token") == owner.get("token"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lock_path)


def _take_over(lock: Path) -> None:
    """Move a dead holder's lock aside (one rename: of two runners taking over, one wins), then delete it."""
    stale = lock.with_name(f".lock.stale-{socket.gethostname()}-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(lock, stale)
        os.unlink(stale)


def describe_holder(held: dict) -> str:
    who = f"job {held['job']}" if held.get("job") else "a local run"
    return f"{who}, pid {held.get('pid')} on {held.get('host')}"


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def holder_alive(held: dict, queue: dict | None = None) -> bool:
    """Whether the process holding a task's lock is still running: its Slurm job is running (squeue), or,
    without a job, its process on this host is. A lock from another host without a job cannot be checked:
    taken as alive."""
    job = held.get("job")
    if job and shutil.which("squeue"):
        state = (queue if queue is not None else squeue_jobs([job]) or {}).get(job, ("", ""))[0]
        return state in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING",
                         "STAGE_OUT")
    if held.get("host") == socket.gethostname():
        return _pid_alive(int(held.get("pid", 0)))
    return True


# ================================================================ running one task

def job_id() -> str | None:
    """This process's Slurm job id as squeue shows it (ARRAY_INDEX for an array task), or None."""
    a, i = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if a and i:
        return f"{a}_{i}"
    return os.environ.get("SLURM_JOB_ID") or None


def _node_rank() -> int:
    """Which node of a multi-node task this is (submitit starts one task per node)."""
    return int(os.environ.get("SLURM_PROCID", "0")) if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" else 0


def command(task: dict, python: str | None = None) -> list[str]:
    """The full command of a task on this node: the entry point itself, or torchrun around it for several
    ranks (standalone on one node; c10d rendezvous on the job's first node for several)."""
    python = python or sys.executable
    r = task["resources"]
    ranks, nodes = int(r.get("ranks") or 1), int(r.get("nodes") or 1)
    if ranks <= 1 and nodes <= 1:
        return [python, *task["argv"]]
    run = [python, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--max_restarts=0",
           *_torchrun_signal_option()]
    if nodes > 1:
        jid = int(os.environ.get("SLURM_JOB_ID", "0"))
        run += [f"--nnodes={nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={_first_node()}:{20000 + jid % 20000}",
                f"--rdzv_id={jid}"]
    else:
        run += ["--standalone", "--nnodes=1"]
    return run + task["argv"]


def _torchrun_signal_option() -> list[str]:
    """torchrun passes on only the signals it handles: add USR2 (the time-limit warning) where this torch has
    the option (as slurm/train.sh does)."""
    import importlib.util
    spec = importlib.util.find_spec("torch")
    run_py = Path(spec.submodule_search_locations[0]) / "distributed" / "run.py" if spec else None
    if run_py and run_py.is_file() and "signals_to_handle" in run_py.read_text():
        return ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"]
    return []


def _first_node() -> str:
    """The address of the job's first node, as Slurm itself reaches it (its NodeAddr; slurm/train.sh does the
    same): the rendezvous host of a multi-node task."""
    nodes = os.environ.get("SLURM_JOB_NODELIST", "")
    r = _slurm_cmd(["scontrol", "show", "hostnames", nodes]) if nodes else None
    if r is None or r.returncode != 0 or not r.stdout.split():
        return socket.gethostname()
    first = r.stdout.split()[0]
    info = _slurm_cmd(["scontrol", "show", "node", first])
    m = re.search(r"NodeAddr=(\S+)", info.stdout) if info is not None and info.returncode == 0 else None
    return m[1] if m else first


def _threads(task: dict) -> int:
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or min(task["resources"].get("cpus") or 1, os.cpu_count() or 1))
    return max(1, cpus // int(task["resources"].get("ranks") or 1))


def run_task(study_dir: str | Path, name: str, runner: "TaskRunner | None" = None) -> dict:
    """Run one task of a study here: skip it when finished, refuse when an upstream task is not finished or the
    run directory is busy, else run its command (output to tasks/<name>/output.log) holding its lock, and record
    the outcome in tasks/<name>/state.json. Returns the state; raises TaskError when the task did not finish."""
    study_dir = Path(study_dir).resolve()
    doc = read_study(study_dir)
    task = doc["by_name"].get(name)
    if task is None:
        raise TaskError(f"{study_dir}: no task {name!r} in {STUDY_FILE}")
    if _node_rank() != 0:  # another node of a multi-node task: its share of the ranks, no bookkeeping
        if finished(task):
            return {"state": "finished"}
        rc = _run_command(task, None, runner, study_dir)
        if rc != 0:
            raise TaskError(f"{name}: node {_node_rank()} exited with {rc}")
        return {"state": "finished"}
    files = TaskFiles(study_dir, name)
    if finished(task):
        return files.update(state="finished", note="already finished")
    missing = [d for d in task["deps"] if not finished(doc["by_name"][d])]
    if missing:
        files.update(state="failed", error=f"upstream not finished: {', '.join(missing)}", ended=time.time(),
                     job=job_id())
        raise TaskError(f"{name}: needs {', '.join(missing)}, which did not finish (python tools/sweep.py status "
                        f"out={study_dir})")
    owner = {"job": job_id(), "host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex(),
             "time": time.time()}
    with files.locked(owner):
        attempt = int(files.state().get("attempt", 0)) + 1
        files.update(state="running", attempt=attempt, job=owner["job"], host=owner["host"], pid=owner["pid"],
                     started=time.time(), ended=None, rc=None, error=None, note=None)
        try:
            rc = _run_command(task, files, runner, study_dir)
        except KeyboardInterrupt:
            files.update(state="failed", error="interrupted (Ctrl-C)", ended=time.time())
            raise
        ok = finished(task)
        state = files.update(state="finished" if ok else "failed", rc=rc, ended=time.time(),
                             error=None if ok else _failure(rc, files.log))
    if not ok:
        raise TaskError(f"{name}: {state['error']}; log: {files.log}\n{tail(files.log, 15)}")
    return state


def _failure(rc: int, log: Path) -> str:
    if rc == 0:
        return "the command exited 0 but its outputs are not complete"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc == EXIT_SIGNAL:
        return "stopped by a signal after a checkpoint (exit 3); relaunch to resume"
    return f"exit code {rc}"


def _run_command(task: dict, files: TaskFiles | None, runner, study_dir: Path) -> int:
    cmd = command(task)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(_threads(task)))
    log = files.log if files else Path(study_dir) / "tasks" / task["name"] / f"output-node{_node_rank()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n=== {time.strftime('%F %T')} job {job_id()} on {socket.gethostname()}: "
                f"{shlex.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        if runner is not None:
            runner._proc = proc
        try:
            while True:  # polled: a signal handler (submitit's, on USR2) may run while we wait
                try:
                    return proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    continue
        except KeyboardInterrupt:  # the child got the SIGINT too: let it save and stop
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=120)
            raise
        finally:
            if runner is not None:
                runner._proc = None


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait (from a signal handler) until process `pid` has ended; True when it did within `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _pid_alive(pid):
            return True
        time.sleep(0.5)
    return False


try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a dependency
    _Checkpointable = object


class TaskRunner(_Checkpointable):
    """What a Slurm array task runs: run_task(study_dir, name). A submitit Checkpointable: at the time-limit
    warning or a preemption (USR2 from Slurm, which reaches the command too), checkpoint() waits for the command
    to save and stop, marks the task requeued, and hands submitit a fresh runner for the same task, which
    submitit requeues; the command resumes from its run directory."""

    def __init__(self, study_dir: str, name: str, wait_s: float = 100.0):
        self.study_dir, self.name, self.wait_s = str(study_dir), name, wait_s
        self._proc = None

    def __call__(self) -> dict:
        return run_task(self.study_dir, self.name, self)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission
        proc = self._proc
        if proc is not None and not _wait_exit(proc.pid, self.wait_s):
            logger.warning("%s: the command did not stop within %.0f s of the signal", self.name, self.wait_s)
        if _node_rank() == 0:
            TaskFiles(self.study_dir, self.name).update(state="requeued", ended=time.time(),
                                                        note="time limit or preemption: requeued")
        return DelayedSubmission(TaskRunner(self.study_dir, self.name, self.wait_s))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state, _proc=None)


def tail(path: Path, n: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    lines = [ln.split("\r")[-1] for ln in lines]  # progress bars: the last redraw of a line
    return "\n".join(lines[-n:])


# ================================================================ Slurm's view

def _slurm_cmd(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def squeue_jobs(jobs: list[str] | None = None) -> dict[str, tuple[str, str]] | None:
    """{job id (ARRAY_INDEX for array tasks): (state, reason)} of this user's queued and running jobs (or of
    `jobs`); None when squeue is not available."""
    cmd = ["squeue", "-h", "-r", "-o", "%i|%T|%r"]
    cmd += ["-j", ",".join(jobs)] if jobs else ["-u", getpass.getuser()]
    r = _slurm_cmd(cmd)
    if r is None:
        return None
    if r.returncode != 0:
        return {} if jobs and "Invalid job id" in r.stderr else None
    queue = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            queue[parts[0]] = (parts[1], parts[2])
    return queue


def sacct_jobs(array_ids: Iterable[str]) -> dict[str, str]:
    """{job id: "STATE exit" } from Slurm accounting for these jobs (all tasks of arrays); {} without sacct."""
    ids = sorted({str(j).split("_")[0] for j in array_ids if j})
    found: dict[str, str] = {}
    for start in range(0, len(ids), 200):
        r = _slurm_cmd(["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(ids[start:start + 200])])
        if r is None or r.returncode != 0:
            return found
        for line in r.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 3:
                state = f"{parts[1]} {parts[2]}" if parts[2] not in ("", "0:0") else parts[1]
                found.update(dict.fromkeys(_expand_array_ids(parts[0]), state))
    return found


def _expand_array_ids(job: str) -> list[str]:
    """sacct's "22_[0-3,5%2]" (array tasks that never started) -> 22_0 ... 22_3, 22_5; other ids as they are."""
    m = re.fullmatch(r"(\d+)_\[([\d,-]+)(?:%\d+)?\]", job)
    if not m:
        return [job]
    ids = []
    for part in m[2].split(","):
        lo, _, hi = part.partition("-")
        ids += [f"{m[1]}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids


# ================================================================ status

@dataclass
class TaskStatus:
    name: str
    stage: str
    state: str          # one of STATES
    attempt: int = 0
    job: str | None = None
    slurm: str = ""     # squeue's or sacct's word for the job, when available
    note: str = ""
    updated: float | None = None
    log: str = ""


def collect_status(out: str | Path, doc: dict | None = None) -> list[TaskStatus]:
    """Every task's state, from the study directory, plus squeue's and sacct's view where available."""
    out = Path(out).resolve()
    doc = doc or read_study(out)
    jobs = latest_jobs(read_submissions(out))
    queue = squeue_jobs() if any(j.get("job") for j in jobs.values()) else None
    statuses = [_one_status(t, out, jobs.get(t["name"], {}), queue) for t in doc["tasks"]]
    gone = [st for st in statuses if st.state != "finished" and st.job and st.job not in (queue or {})]
    if gone:
        acct = sacct_jobs(st.job for st in gone)
        for st in gone:
            st.slurm = acct.get(st.job, st.slurm)
            if st.state == "failed" and st.slurm:
                st.note = f"{st.note} (sacct: {st.slurm})"
    return statuses


def _one_status(t: dict, out: Path, sub: dict, queue: dict | None) -> TaskStatus:
    """finished (its outputs say so) > running (a live lock holder, or Slurm runs its job) > pending / requeued
    (its job is queued; requeued once it has run) > failed (it ran and stopped unfinished, or its job left the
    queue without running it) > missing (never submitted)."""
    files = TaskFiles(out, t["name"])
    state = files.state()
    job = sub.get("job")
    st = TaskStatus(t["name"], t["stage"], "missing", int(state.get("attempt", 0)), job,
                    updated=state.get("updated"), log=str(files.log))
    q = (queue or {}).get(job) if job else None
    if q:
        st.slurm = q[0] if q[0] != "PENDING" else f"PENDING ({q[1]})"
    if finished(t):
        st.state = "finished"
        return st
    held = files.holder()
    if held and holder_alive(held, queue):
        st.state, st.note = "running", f"on {held.get('host')}"
        return st
    if q:
        if q[0] in ("RUNNING", "COMPLETING", "CONFIGURING"):
            st.state, st.note = "running", "starting"
        else:  # requeued: this very job has run before (time limit, preemption, scontrol requeue)
            st.state = "requeued" if st.attempt and state.get("job") == job else "pending"
        return st
    resubmitted = bool(sub) and (sub.get("time") or 0) > (state.get("updated") or 0)
    if resubmitted and sub.get("executor") == "local" and sub.get("host") == socket.gethostname() \
            and _pid_alive(int(sub.get("pid") or 0)):
        st.state = "pending"   # a local launch that has not reached it yet
    elif resubmitted:
        st.state, st.note = "failed", ("never ran: its job left the queue" if job else "never ran: its launch ended")
    elif state.get("state") == "failed":
        st.state, st.note = "failed", state.get("error") or ""
    elif state.get("state") in ("running", "requeued"):
        st.state, st.note = "failed", f"stopped without finishing (was {state['state']})"
    elif state:
        st.note = "outputs incomplete or removed"
    else:
        st.note = "not submitted yet"
    return st


def summary_table(statuses: list[TaskStatus]) -> str:
    """Tasks per stage and state."""
    stages = [s for s in STAGES if any(st.stage == s for st in statuses)]
    counts = {(st.stage, st.state): 0 for st in statuses}
    for st in statuses:
        counts[(st.stage, st.state)] += 1
    head = f"{'stage':<10}" + "".join(f"{s:>10}" for s in STATES) + f"{'total':>8}"
    lines = [head]
    for stage in stages:
        row = [counts.get((stage, s), 0) for s in STATES]
        lines.append(f"{stage:<10}" + "".join(f"{n or '.':>10}" for n in row) + f"{sum(row):>8}")
    return "\n".join(lines)


def status_table(statuses: list[TaskStatus], only: Iterable[str] | None = None) -> str:
    rows = [st for st in statuses if only is None or st.state in only]
    if not rows:
        return ""
    width = max(len(st.name) for st in rows) + 2
    now = time.time()
    lines = [f"{'task':<{width}}{'state':<10}{'try':>4}  {'job':<12}{'slurm':<24}{'age':>7}  note"]
    for st in rows:
        age = _age(now - st.updated) if st.updated else "-"
        lines.append(f"{st.name:<{width}}{st.state:<10}{st.attempt or '-':>4}  {st.job or '-':<12}"
                     f"{(st.slurm or '-')[:23]:<24}{age:>7}  {st.note}")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:.0f}s"


def failure_tails(out: Path, statuses: list[TaskStatus], n_tasks: int = 10, n_lines: int = 12) -> str:
    """The last lines of the failed tasks' logs (the command's, else submitit's)."""
    failed = [st for st in statuses if st.state == "failed"]
    parts = []
    for st in failed[:n_tasks]:
        log = Path(st.log)
        text = tail(log, n_lines)
        if not text and st.job:
            log, text = _submitit_log(out, st.job, n_lines)
        if text:
            parts.append(f"--- {st.name}: {log}\n{text}")
    if len(failed) > n_tasks:
        parts.append(f"... and {len(failed) - n_tasks} more failed tasks (logs in {out / 'tasks'})")
    return "\n".join(parts)


def _submitit_log(out: Path, job: str, n: int) -> tuple[Path, str]:
    from submitit.core.utils import JobPaths
    paths = JobPaths(out / "submitit" / "%j", job_id=job, task_id=0)
    for p in (paths.stderr, paths.stdout):
        if p.is_file():
            return p, tail(p, n)
    return paths.stderr, ""


def study_summary(settings: dict) -> str:
    """What the study resolved to, in a few lines: the data (shards or sources, the cut), models, regimes, seeds."""
    d, g, gen, c = settings["data"], settings["gan"], settings["generate"], settings["classify"]
    data = (f"shards {d['shards']}" if d.get("shards") else
            f"sources {d['sources']}" if d.get("sources") else f"the embedded simulator (scale {d['simulate_scale']})")
    lines = [f"  data      {data}; cut (data.scarce): {d.get('scarce') or 'none'}",
             f"  gan       models {g['models']}, seeds {g['seeds']}, sizes {g['sizes']}, steps {g['steps']}",
             f"  generate  {gen['models'] or 'none'}"]
    if c["enabled"]:
        lines.append(f"  classify  archs {c['archs']}, regimes {c['regimes']}, seeds {c['seeds']}")
        if c.get("rival_search") is not None:
            lines.append(f"  rival     search {c['rival_search'] or 'every recipe'} on val; full {c.get('full')}, "
                         f"on the rival {c.get('on_rival') or 'none'}")
    return "\n".join(lines)


def status_report(out: str | Path, all_rows: bool = True) -> tuple[str, list[TaskStatus]]:
    out = Path(out).resolve()
    doc = read_study(out)
    statuses = collect_status(out, doc)
    done = sum(st.state == "finished" for st in statuses)
    parts = [f"study {doc['name']} in {out}: {done}/{len(statuses)} tasks finished\n" + study_summary(doc["settings"]),
             status_table(statuses, None if all_rows else ("running", "requeued", "pending", "failed", "missing")),
             summary_table(statuses)]
    tails = failure_tails(out, statuses)
    if tails:
        parts += ["failed tasks (last log lines):", tails]
    return "\n\n".join(p for p in parts if p), statuses


def watch(out: str | Path, interval: float = 10.0, write: Callable[[str], None] = print) -> list[TaskStatus]:
    """Redraw the status every `interval` seconds, with a progress bar, until no task is pending, running or
    requeued; returns the last statuses."""
    from tqdm import tqdm
    tty = sys.stdout.isatty()
    bar = None
    try:
        while True:
            text, statuses = status_report(out, all_rows=False)
            if tty:
                write("\033[2J\033[H" + text)
            else:
                write(text)
            done = sum(st.state == "finished" for st in statuses)
            if bar is None:
                bar = tqdm(total=len(statuses), desc="study", unit="task", dynamic_ncols=True, disable=not tty)
            bar.n = done
            bar.set_postfix({s: sum(st.state == s for st in statuses) for s in ("running", "pending", "failed")},
                            refresh=True)
            if not any(st.state in ACTIVE for st in statuses):
                return statuses
            time.sleep(interval)
    finally:
        if bar is not None:
            bar.close()


# ================================================================ launching

@contextlib.contextmanager
def launch_lock(out: Path):
    """One launch of a study at a time (flock on out/.launch.lock; released when the process ends)."""
    import fcntl
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".launch.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise SweepError(f"another launch of {out} is in progress ({f.read().strip() or 'unknown process'}); "
                             f"follow it with: python tools/sweep.py status out={out} --watch") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_executor(executor: str) -> str:
    check_choice("executor", executor, EXECUTORS)
    if executor == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if executor == "slurm" and not shutil.which("sbatch"):
        raise SweepError("executor=slurm: no sbatch on PATH (not on a Slurm login node?); run the study here "
                         "with executor=local")
    return executor


def check_inputs(s: StudySettings) -> None:
    """Given shards and sources must exist (and shards be at the size asked) before anything is launched."""
    d = s.data
    if d.shards:
        for size in s.gan.sizes:
            path = Path(shard_dir(d.shards, size))
            manifest = read_json(path / "manifest.json")
            if not manifest:
                raise SweepError(f"data.shards: {path} is not a shard set (no manifest.json); write one with "
                                 f"tools/shard.py ... out={path} size={size}")
            if int(manifest.get("image_size", -1)) != size:
                raise SweepError(f"data.shards: {path} holds {manifest.get('image_size')} px images but gan.sizes "
                                 f"asks for {size}; put {{size}} in the path (e.g. shards/real{{size}})")
    for layout, path in (d.sources or {}).items():
        if not Path(path).is_dir():
            raise SweepError(f"data.sources.{layout}: {path} is not a folder")


@dataclass
class LaunchResult:
    executor: str
    submitted: dict[str, list[str]] = field(default_factory=dict)   # stage -> its job ids (slurm; local: [])
    skipped: dict[str, int] = field(default_factory=dict)      # state -> how many were left alone
    failed: list[str] = field(default_factory=list)            # local: tasks that did not finish


def launch(s: StudySettings, out: str | Path, executor: str = "auto", study: str = "", overrides=(),
           write: Callable[[str], None] = print) -> LaunchResult:
    """Write study.json, then submit (slurm) or run (local) every task that is neither finished nor active."""
    out = Path(out).resolve()
    executor = resolve_executor(executor)
    check_inputs(s)
    tasks = expand(s, out)
    with launch_lock(out):
        doc = write_study(out, s, tasks, study or s.name, list(overrides), executor)
        write(f"study {doc['name']} ({len(tasks)} tasks) in {out}:\n" + study_summary(doc["settings"]))
        statuses = {st.name: st for st in collect_status(out, doc)}
        todo = [t for t in doc["tasks"] if statuses[t["name"]].state in ("failed", "missing")]
        result = LaunchResult(executor)
        for st in statuses.values():
            if st.state not in ("failed", "missing"):
                result.skipped[st.state] = result.skipped.get(st.state, 0) + 1
        if result.skipped:
            write("left alone: " + ", ".join(f"{n} {state}" for state, n in result.skipped.items()))
        if not todo:
            write("nothing to do: every task is finished or under way")
            return result
        if executor == "slurm":
            active = {n: st.job for n, st in statuses.items() if st.state in ACTIVE and st.job}
            submit_slurm(out, doc, todo, active, s, result, write)
        else:
            run_local(out, doc, todo, result, write)
    return result


def _stage_groups(todo: list[dict]) -> list[tuple[str, list[dict]]]:
    return [(stage, [t for t in todo if t["stage"] == stage]) for stage in STAGES if any(t["stage"] == stage for t in todo)]


def slurm_executor(out: Path, s: StudySettings, stage: str, res: dict, dependency: str | None = None):
    """A submitit SlurmExecutor for one stage's array, with the stage's resources."""
    import submitit
    c = s.cluster
    ex = submitit.SlurmExecutor(folder=out / "submitit" / "%j", max_num_timeout=c.max_requeues, python=c.python)
    params: dict[str, Any] = {"job_name": f"hpcgan-{s.name}-{stage}", "time": res["time_min"], "nodes": res["nodes"],
                              "ntasks_per_node": 1, "cpus_per_task": res["cpus"], "signal_delay_s": c.signal_delay_s,
                              "array_parallelism": res["array_parallelism"], "setup": list(c.setup) or None}
    if res.get("gpus"):
        params["gpus_per_node"] = res["gpus"]
    if res.get("mem_gb"):
        params["mem"] = f"{int(res['mem_gb'] * 1024)}M"
    for k in ("partition", "account", "qos", "constraint"):
        if res.get(k):
            params[k] = res[k]
    extra: dict[str, Any] = {"requeue": True, **res.get("sbatch", {})}
    if dependency:
        extra["dependency"] = dependency
        if c.kill_on_invalid_dep:
            extra["kill-on-invalid-dep"] = "yes"
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None}, additional_parameters=extra)
    return ex


def preflight(out: Path, ex, stage: str, n: int) -> None:
    """`sbatch --test-only` of the stage's job script: a request the partition cannot meet fails here."""
    folder = out / "submitit"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f".preflight-{stage}.sh"
    script.write_text(ex._make_submission_file_text("true", "preflight"))
    try:
        r = subprocess.run(["sbatch", "--test-only", f"--array=0-{max(0, n - 1)}", str(script)], capture_output=True,
                           text=True, timeout=60)
    finally:
        script.unlink(missing_ok=True)
    if r.returncode != 0:
        reason = " ".join((r.stderr or r.stdout).split()) or f"exit code {r.returncode}"
        raise SweepError(f"stage {stage}: Slurm refuses its request ({_describe_request(ex.parameters)}): {reason}. "
                         f"Change resources.{stage} in the study or the cluster file (configs/cluster/); nothing "
                         "was submitted")


def _describe_request(p: dict) -> str:
    keys = ("partition", "nodes", "cpus_per_task", "gpus_per_node", "mem", "time", "account", "qos", "constraint")
    return ", ".join(f"{k}={p[k]}" for k in keys if p.get(k) is not None)


def _afterok(ids: set[str], arrays: dict[str, tuple[str, list[str]]]) -> str:
    """afterok on these job ids; every task of an array submitted now -> the array's id alone."""
    ids = set(ids)
    for array_id, (_, names) in arrays.items():
        mine = {f"{array_id}_{i}" for i in range(len(names))}
        if len(names) > 1 and mine <= ids:
            ids = (ids - mine) | {array_id}
    return "afterok:" + ":".join(sorted(ids, key=lambda j: [int(x) for x in j.split("_")]))


def plan_arrays(tasks: list[dict], job_of: dict[str, str], arrays: dict[str, tuple[str, list[str]]]
                ) -> list[tuple[list[dict], str | None]]:
    """One stage's arrays as [(tasks, dependency)]: the tasks that wait on no queued job, then those that do.
    These wait on exactly the upstream tasks they need: `aftercorr:A` when they line up one to one with an
    array A submitted now (task i waits for A's task i only: one failed GAN does not cancel the others'
    evaluations), and `afterok` on the other job ids."""
    free = [t for t in tasks if not any(d in job_of for d in t["deps"])]
    waiting = [t for t in tasks if any(d in job_of for d in t["deps"])]
    plans: list[tuple[list[dict], str | None]] = [(free, None)] if free else []
    if not waiting:
        return plans
    corr, covered = None, set()
    for array_id, (_, names) in arrays.items():
        index = {n: i for i, n in enumerate(names)}
        mapped = [[index[d] for d in t["deps"] if d in index] for t in waiting]
        if len(names) == len(waiting) > 1 and all(len(m) == 1 for m in mapped) \
                and sorted(m[0] for m in mapped) == list(range(len(names))):
            waiting = [t for _, t in sorted(zip((m[0] for m in mapped), waiting), key=lambda p: p[0])]
            corr, covered = array_id, set(names)
            break
    ids = {job_of[d] for t in waiting for d in t["deps"] if d in job_of and d not in covered}
    parts = ([f"aftercorr:{corr}"] if corr else []) + ([_afterok(ids, arrays)] if ids else [])
    return plans + [(waiting, ",".join(parts))]


def submit_slurm(out: Path, doc: dict, todo: list[dict], active: dict[str, str], s: StudySettings,
                 result: LaunchResult, write: Callable[[str], None]) -> None:
    """Each stage as job arrays (plan_arrays), all at once, later stages waiting on earlier ones."""
    from submitit.core.utils import FailedJobError
    groups = _stage_groups(todo)
    for stage, tasks in groups:  # every request checked before anything is submitted
        preflight(out, slurm_executor(out, s, stage, tasks[0]["resources"]), stage,
                  min(len(tasks), s.cluster.max_array_size))
    job_of: dict[str, str] = dict(active)   # task -> the job it runs (or will run) in
    arrays: dict[str, tuple[str, list[str]]] = {}
    submitted_ids: list[str] = []
    try:
        size = s.cluster.max_array_size
        for stage, stage_tasks in groups:
            chunks = [stage_tasks[i:i + size] for i in range(0, len(stage_tasks), size)]
            for tasks, dep in (plan for chunk in chunks for plan in plan_arrays(chunk, job_of, arrays)):
                ex = slurm_executor(out, s, stage, tasks[0]["resources"], dep)
                runners = [TaskRunner(str(out), t["name"], wait_s=max(10, s.cluster.signal_delay_s - 20)) for t in tasks]
                try:
                    jobs = ex.submit_array(runners)
                except FailedJobError as e:
                    raise SweepError(f"stage {stage}: sbatch failed ({_describe_request(ex.parameters)}): "
                                     f"{' '.join(str(e).split())}") from None
                array_id = jobs[0].job_id.split("_")[0]
                submitted_ids.append(array_id)
                names = [t["name"] for t in tasks]
                arrays[array_id] = (stage, names)
                job_of.update({t["name"]: j.job_id for t, j in zip(tasks, jobs)})
                record_submission(out, {"executor": "slurm", "stage": stage, "job_id": array_id,
                                        "array": len(jobs) > 1, "tasks": names, "dependency": dep,
                                        "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
                result.submitted.setdefault(stage, []).append(array_id)
                width = min(len(tasks), tasks[0]["resources"]["array_parallelism"])
                write(f"{stage}: {len(tasks)} task(s) -> job {array_id}"
                      + (f" (array 0-{len(tasks) - 1}%{width})" if len(jobs) > 1 else "")
                      + (f", after {dep}" if dep else ""))
    except BaseException:
        if submitted_ids:  # a half-submitted study would wait forever on the missing stage: take it back
            subprocess.run(["scancel", *submitted_ids], capture_output=True, timeout=60)
            write(f"cancelled what this launch had submitted ({', '.join(submitted_ids)})")
        raise


def run_local(out: Path, doc: dict, todo: list[dict], result: LaunchResult, write: Callable[[str], None]) -> None:
    """The tasks here, one after another in stage order; a task whose upstream failed is not run."""
    from tqdm import tqdm
    record_submission(out, {"executor": "local", "stage": None, "job_id": None, "tasks": [t["name"] for t in todo],
                            "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
    failed: set[str] = set()
    bar = tqdm(total=len(todo), desc=f"study {doc['name']}", unit="task", dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    try:
        for t in todo:
            bar.set_postfix_str(t["name"])
            blocked = [d for d in t["deps"] if d in failed]
            if blocked:
                TaskFiles(out, t["name"]).update(state="failed", error=f"upstream failed: {', '.join(blocked)}",
                                                 ended=time.time(), job=None)
                failed.add(t["name"])
                write(f"skipped {t['name']}: upstream failed ({', '.join(blocked)})")
            else:
                t0 = time.time()
                try:
                    run_task(out, t["name"])
                    write(f"finished {t['name']} ({time.time() - t0:.0f} s)")
                except TaskError as e:
                    failed.add(t["name"])
                    write(f"FAILED {str(e).splitlines()[0]}")
            bar.update(1)
    finally:
        bar.close()
    for t in todo:
        result.submitted.setdefault(t["stage"], [])
    result.failed = sorted(failed)
