"""Grid expansion, pure: StudySettings -> the study's tasks, each a command of the project's own entry points,
named by its grid values (so the same study in the same folder always means the same tasks), with the tasks it
waits on.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcgan.settings import SettingsError
from hpcgan.sweep.settings import (
    SIMULATOR_LAYOUTS,
    STAGES,
    TOOLS,
    StudySettings,
    needs_synthetic,
)


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
_KEY_PLAIN = re.compile(r"[A-Za-z0-9_/+.$%*@?|-]")   # what Hydra's grammar takes unescaped in a dict key
_KEY_ESCAPED = set("()[]{}:=,\\ \t")                # ... and what it takes after a backslash


def hydra_key(k: Any) -> str:
    """A dict key as a Hydra override writes it. Hydra's grammar has no quoted keys, so the characters it
    allows are written as they are and its escapable ones (space, brackets, : = ,) after a backslash:
    {immature\\ granulocyte:20} reads as {'immature granulocyte': 20}."""
    out = []
    for c in str(k):
        if not (_KEY_PLAIN.fullmatch(c) or c in _KEY_ESCAPED):
            raise ValueError(f"{k!r} cannot be a key of a Hydra override (the character {c!r}): rename it")
        out.append(c if _KEY_PLAIN.fullmatch(c) else "\\" + c)
    key = "".join(out)
    try:   # Hydra reads a key such as 10, 1e3, true or null as a number, bool or None: refused too
        same = list(_override_parser().parse_override(f"k={{{key}:0}}").value()) == [k]
    except Exception:
        same = False
    if not same:
        raise ValueError(f"{k!r} cannot be a key of a Hydra override (Hydra would not read it back as that "
                         "string): rename it")
    return key


@functools.lru_cache(maxsize=1)
def _override_parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return OverridesParser.create()


def hydra_value(v: Any) -> str:
    """A value as a Hydra override writes it: plain when safe, a list as [a,b], a dict's keys by hydra_key,
    else single-quoted."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{hydra_key(k)}:{hydra_value(x)}" for k, x in v.items()) + "}"
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
                    ["-m", "hpcgan.train", *kv(shards=sh, run_dir=run, model=g.spec(model), seed=seed,
                                               steps=g.steps), *scarce_args(s, seed), *g.train_overrides(model)],
                    deps=[dep], grid={"model": model, "seed": seed, "size": size}, check={"kind": "run"})
    gen = s.generate
    for size in g.sizes:
        for model in gen.models:
            for seed in g.seeds:
                name, source, sh = gan_name(model, seed, size), gan_name(gen.source(model), seed, size), shards[size][0]
                run, syn = out / "gan" / source, out / "synthetic" / name
                add("generate", f"synthetic/{name}", syn,
                    [TOOLS / "generate.py", *kv(run=run, out=syn, **gen.how(), shards=sh, progress=False),
                     *gen.set_overrides(model)],
                    deps=[f"gan/{source}", shards[size][1]], grid={"model": model, "seed": seed, "size": size},
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
                                                      cache_dir=out / "cache", progress=False,
                                                      tag=model if model in g.variants else None), *e.overrides],
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
    stage (the search's winner: `rival` with every seed, `full` on the uncut split, `on_rival` regimes, and
    `realN` on the seed's cut with every cut class at N real cells: classify.more_real)."""
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
                for n in c.more_real:
                    _classifier(s, out, shards[size], add, "rival", arch, "original", seed, size, tag=f"real{n}",
                                cut={name: int(n) for name in s.data.scarce}, **pick)


def _set_name(s: StudySettings, name: str | None) -> str | None:
    """How a classifier's rows name the synthetic set it read: given only where the GAN's model name would not
    say it (a variant of the GAN, or of its set)."""
    if name is None or (name not in s.generate.variants and name not in s.gan.variants):
        return None
    return name


def _classifier(s: StudySettings, out: Path, shard: tuple[str, str | None], add, stage: str, arch: str, regime: str,
                seed: int, size: int, tag: str | None = None, deps=(), extra=(), uncut: bool = False,
                cut: dict[str, int] | None = None):
    """One classifier task per synthetic set the regime reads (one without): a synthetic regime runs on that
    GAN's run with the classifier's seed when the GAN grid has it, else its first seed. Returns the last.
    uncut: no scarce cut (`full`); cut: this cut instead of data.scarce, with the same seed (more_real)."""
    from hpcgan.classify.regimes import get_regime
    g, task = s.gan, None
    gan_seed = seed if seed in g.seeds else g.seeds[0]
    for model in (s.generate.models if needs_synthetic(regime) else [None]):
        name = classifier_name(arch, f"{tag}-{get_regime(regime).name}" if tag else regime, seed, size, model)
        run = out / "cls" / name
        syn = out / "synthetic" / gan_name(model, gan_seed, size) if model else None
        task = add(stage, f"cls/{name}", run,
                   [TOOLS / "classify.py", *kv(shards=shard[0], synthetic=syn, arch=arch, regime=regime, seed=seed,
                                               out=run, tag=tag, synthetic_name=_set_name(s, model)),
                    *([] if uncut else kv(scarce=cut, scarce_seed=gan_seed) if cut else scarce_args(s, gan_seed)),
                    *s.classify.overrides, *extra],
                   deps=[shard[1], f"synthetic/{gan_name(model, gan_seed, size)}" if model else None, *deps],
                   grid={"arch": arch, "regime": regime, "seed": seed, "size": size, "synthetic_from": model,
                         "gan_seed": gan_seed if model else None, "tag": tag},
                   check={"kind": "run", "results": True})
    return task
