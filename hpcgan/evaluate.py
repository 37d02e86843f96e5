"""Evaluate a generator (or any labelled image set) against a real shard split, offline, by metric name.

    python tools/evaluate.py run=RUN_DIR shards=REAL [metrics=[fid,kid,prdc,...]] [features=cell|inception]
    python tools/evaluate.py fake=SYNTHETIC_OR_PNG_DIR shards=REAL out=FILE.json
    torchrun --standalone --nproc_per_node=N -m hpcgan.evaluate run=... shards=...   (ranks share the work)

What is compared (configs/evaluate.yaml):
  generated  a run's newest checkpoint (EMA weights when it has them, `weights=`), `n_per_class` images of
             every class the real split has (default: as many as the real split has, so the class mix is the
             real one); `weights=init` is the untrained generator of the same architecture (a ceiling to read
             numbers against); or `fake=DIR`: a shard set (synthetic or real, split `fake_split`) or a PNG
             folder with one sub-folder per class (`png/<class>/`, as tools/generate.py writes)
  real       `shards`' `real_split` (train: what the GAN saw; fidelity and memorisation are judged against it).
             The test split is never used to fit anything here.
Features: `cell` (default): the project's own classifier trained on the real train split of `shards`
(hpcgan.metrics.cell; trained once and cached by the manifest's sha256, fully offline); `inception`:
torch-fidelity's FID Inception-v3 from a staged weights file (tools/stage_weights.py). class_accuracy
always uses the cell classifier. Real-split features are cached in `cache_dir`, keyed by (manifest sha256,
split, extractor sha256, image size): computed once, reused by every evaluation of a sweep.

Distributed: work units (a class of generated images; a batch of real images) go to ranks round robin and
the results are gathered; the units and their batches do not depend on the number of ranks, so 1 and N
ranks give the same numbers. Rank 0 computes the metrics and writes
  out (default RUN_DIR/eval/step-<step>-<features>.json)  everything a table needs (see `_rows`)
  results (default: results.jsonl beside out)              one JSON row per number, appended
  <out without .json>-memorisation.png                     the closest generated/real pairs
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from hpcgan import dist
from hpcgan.data.shards import iter_samples, read_manifest, sha256_file
from hpcgan.fsutil import atomic_write_bytes
from hpcgan.results import append_rows, number, write_result
from hpcgan.metrics import DEFAULT_METRICS, EvalData, MetricResult, Side, check_names, compute, needs
from hpcgan.progress import Progress
from hpcgan.settings import SettingsError, check_choice, compose_settings, parse

logger = logging.getLogger("hpcgan.evaluate")

FORMAT = 1
CACHE_VERSION = 1        # bump when the way real features are computed changes
FEATURES = ("cell", "inception")
WEIGHTS = ("auto", "ema", "raw", "init")


class EvaluateError(ValueError):
    """Bad input to evaluate(); the message says what was wrong and what to do."""


@dataclass
class EvaluateSettings:
    shards: str = "???"                 # the real shard set (reference split and the cell extractor's data)
    run: str | None = None              # training run directory (its newest valid checkpoint) ...
    checkpoint: str | None = None       # ... or an explicit checkpoint file
    fake: str | None = None             # ... or an image set: a shard set or a PNG folder (png/<class>/*.png)
    fake_split: str = "train"           # split of `fake` when it is a shard set
    real_split: str = "train"           # the real reference split
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    features: str = "cell"              # cell | inception
    feature_file: str | None = None     # a cell extractor file (default: the cached one for `shards`, trained if absent)
    weights_dir: str | None = None      # staged weights (inception, LPIPS); default $HPCGAN_WEIGHTS or ~/.cache/hpcgan/weights
    cache_dir: str | None = None        # real-feature and extractor cache; default $HPCGAN_CACHE or ~/.cache/hpcgan
    n_per_class: int | None = None      # generated images per class (null: as many as the real split has)
    weights: str = "auto"               # auto (EMA when present) | ema | raw | init (untrained: a ceiling)
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    out: str | None = None              # the JSON result (default RUN_DIR/eval/step-<step>-<features>.json)
    results: str | None = None          # JSONL to append rows to (default: results.jsonl beside out)
    tag: str | None = None              # a free label carried into every row (e.g. floor, ceiling)
    progress: bool = True

    def __post_init__(self):
        check_choice("features", self.features, FEATURES)
        check_choice("weights", self.weights, WEIGHTS)
        check_names_setting(self.metrics)
        given = [k for k in ("run", "checkpoint", "fake") if getattr(self, k)]
        if not given:
            raise SettingsError("nothing to evaluate: give run=RUN_DIR, checkpoint=FILE or fake=DIR")
        if self.fake and (self.run or self.checkpoint):
            raise SettingsError("give either fake=DIR or run=/checkpoint=, not both")
        if self.fake and not self.out:
            raise SettingsError("fake=DIR needs out=FILE.json (inputs are never written into)")
        if self.n_per_class is not None and self.n_per_class < 1:
            raise SettingsError(f"n_per_class={self.n_per_class}: must be >= 1 (or null)")
        if self.batch_size < 1:
            raise SettingsError(f"batch_size={self.batch_size}: must be >= 1")


def check_names_setting(names) -> None:
    try:
        check_names(names)
    except ValueError as e:
        raise SettingsError(f"metrics: {e}") from None


def cache_root(value: str | None) -> Path:
    return Path(value or os.environ.get("HPCGAN_CACHE") or Path.home() / ".cache" / "hpcgan")


# ---- image sources ----------------------------------------------------------------------------------

def decode(data: bytes) -> np.ndarray:
    """Encoded image -> uint8 [3, H, W]."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy()


@dataclass
class Unit:
    """One piece of work: a batch of images with their labels (label -1: unknown)."""
    index: int
    images: np.ndarray | None      # uint8 [B, 3, S, S]; None for a generator unit until produced
    labels: np.ndarray


class ShardSplit:
    """A split of a shard set, in batches of `batch_size` in file order (the units of work)."""

    def __init__(self, shards: str | Path, split: str, batch_size: int):
        self.dir, self.split, self.batch_size = Path(shards), split, batch_size
        self.manifest = read_manifest(shards)
        self.classes = list(self.manifest["classes"])
        self.counts = {c: int(n) for c, n in (self.manifest.get("counts") or {}).get(split, {}).items()}
        if not sum(self.counts.values()):
            raise EvaluateError(f"{shards} has no images in split {split!r} (counts: "
                                f"{ {s: sum(v.values()) for s, v in self.manifest.get('counts', {}).items()} })")
        self.image_size = int(self.manifest["image_size"])
        self.manifest_sha256 = sha256_file(self.dir / "manifest.json")

    def __len__(self) -> int:
        return sum(self.counts.values())

    def units(self, mine=lambda i: True) -> Iterator[Unit]:
        """Batches in file order; only those `mine(index)` accepts are decoded."""
        images, labels, index = [], [], 0
        for _, data, _, label, _ in iter_samples(self.dir, self.split):
            images.append(data)
            labels.append(label)
            if len(images) == self.batch_size:
                yield from self._unit(index, images, labels, mine)
                images, labels, index = [], [], index + 1
        if images:
            yield from self._unit(index, images, labels, mine)

    @staticmethod
    def _unit(index, images, labels, mine):
        if mine(index):
            yield Unit(index, np.stack([decode(d) for d in images]), np.asarray(labels, dtype=np.int64))


class PngFolder:
    """A folder of PNGs with one sub-folder per class (class names or their slugs), or png/<class>/."""

    def __init__(self, root: str | Path, classes: list[str], batch_size: int):
        from hpcgan.generate import slug
        root = Path(root)
        root = root / "png" if (root / "png").is_dir() else root
        by_slug = {slug(c): i for i, c in enumerate(classes)}
        self.files: list[tuple[Path, int]] = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            if slug(sub.name) not in by_slug:
                raise EvaluateError(f"{sub}: folder name is not one of the classes {classes}")
            self.files += [(f, by_slug[slug(sub.name)]) for f in sorted(sub.glob("*.png"))]
        if not self.files:
            raise EvaluateError(f"{root}: no PNG files in class sub-folders")
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.files)

    def units(self, mine=lambda i: True) -> Iterator[Unit]:
        for index, start in enumerate(range(0, len(self.files), self.batch_size)):
            if mine(index):
                part = self.files[start:start + self.batch_size]
                yield Unit(index, np.stack([decode(f.read_bytes()) for f, _ in part]),
                           np.asarray([c for _, c in part], dtype=np.int64))


class GeneratorSource:
    """`plan[class] = n` images of each class from a generator (one unit per class; label -1 and one unit
    for an unconditional generator)."""

    def __init__(self, G, spec, plan: dict[int, int], seed: int, batch_size: int, device: torch.device):
        self.G, self.spec, self.plan, self.seed = G, spec, plan, seed
        self.batch_size, self.device = batch_size, device

    def __len__(self) -> int:
        return sum(self.plan.values())

    def units(self, mine=lambda i: True) -> Iterator[Unit]:
        from hpcgan.generate import class_images, class_seed
        for index, (label, n) in enumerate(self.plan.items()):
            if not mine(index):
                continue
            label = label if label >= 0 else None  # the images generate(seed=...) writes for that class
            batches = class_images(self.G, self.spec, label, n, class_seed(self.seed, label), self.batch_size,
                                   self.device)
            images = torch.cat(list(batches)).numpy()
            yield Unit(index, images, np.full(len(images), -1 if label is None else label, dtype=np.int64))


# ---- features ---------------------------------------------------------------------------------------

@dataclass
class Extracted:
    labels: np.ndarray
    features: np.ndarray
    logits: np.ndarray | None = None
    classifier_logits: np.ndarray | None = None
    images: np.ndarray | None = None

    def side(self) -> Side:
        labels = self.labels if (self.labels >= 0).all() else None
        return Side(self.features, self.logits, labels, self.images, self.classifier_logits)


def _extract_units(source, extractor, classifier, env: dist.DistEnv, keep_pixels: bool, desc: str,
                   progress: bool) -> Extracted:
    """Every unit of `source` through the extractor (and the classifier), split over ranks, gathered."""
    mine = (lambda i: i % env.world_size == env.rank)
    parts = []
    bar = Progress(len(source), desc, "img", bar=progress and env.is_main,
                   every=None if env.is_main else float("inf"))   # one rank speaks
    for unit in source.units(mine):
        feats, logits, cls_logits = [], [], []
        for start in range(0, len(unit.images), source.batch_size):
            x = torch.from_numpy(unit.images[start:start + source.batch_size]).to(env.device)
            f, lg = extractor.extract(x)
            feats.append(f.float().cpu().numpy())
            if lg is not None:
                logits.append(lg.float().cpu().numpy())
            if classifier is not None:
                cls_logits.append((lg if classifier is extractor else classifier.extract(x)[1]).float().cpu().numpy())
        parts.append((unit.index, unit.labels, np.concatenate(feats), _cat(logits), _cat(cls_logits),
                      unit.images if keep_pixels else None))
        bar.update(len(unit.images) * env.world_size)  # the other ranks work alongside (an estimate)
    bar.close()
    parts = _gather(env, parts)
    parts.sort(key=lambda p: p[0])
    return Extracted(np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
                     _cat([p[3] for p in parts if p[3] is not None]),
                     _cat([p[4] for p in parts if p[4] is not None]),
                     _cat([p[5] for p in parts if p[5] is not None]))


def _cat(arrays: list) -> np.ndarray | None:
    return np.concatenate(arrays) if arrays else None


def _gather(env: dist.DistEnv, parts: list) -> list:
    if not env.distributed:
        return parts
    everyone = [None] * env.world_size
    torch.distributed.all_gather_object(everyone, parts)
    return [p for rank_parts in everyone for p in rank_parts]


def real_cache_key(manifest_sha256: str, split: str, extractor, classifier, image_size: int) -> str:
    what = {"manifest": manifest_sha256, "split": split, "extractor": [extractor.name, extractor.sha256],
            "classifier": [classifier.name, classifier.sha256] if classifier is not None else None,
            "image_size": image_size, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def real_features(real: ShardSplit, extractor, classifier, env, cache_dir: Path, keep_pixels: bool,
                  progress: bool) -> tuple[Extracted, dict]:
    """The real split's features (cached) and, when asked, its pixels (decoded, not cached)."""
    key = real_cache_key(real.manifest_sha256, real.split, extractor, classifier, real.image_size)
    path = cache_dir / "stats" / f"real-{key}.npz"
    miss = torch.tensor([float(not path.is_file())], device=env.device)
    hit = not bool(dist.all_reduce_max(env, miss).item())  # every rank takes the same branch
    info = {"cache": str(path), "cache_hit": hit}
    if hit:
        with np.load(path) as z:
            ex = Extracted(z["labels"], z["features"], z["logits"] if "logits" in z else None,
                           z["classifier_logits"] if "classifier_logits" in z else None)
        logger.info("real %s features: cached %s", real.split, path)
        if keep_pixels:
            ex.images = np.concatenate([u.images for u in real.units()])
        return ex, info
    ex = _extract_units(real, extractor, classifier, env, keep_pixels, f"real {real.split}", progress)
    if env.is_main:
        arrays = {k: v for k, v in (("labels", ex.labels), ("features", ex.features), ("logits", ex.logits),
                                    ("classifier_logits", ex.classifier_logits)) if v is not None}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        logger.info("real %s features: computed and cached in %s", real.split, path)
    return ex, info


def load_extractors(s: EvaluateSettings, real: ShardSplit, env: dist.DistEnv, want_classifier: bool):
    """(extractor for the features, the real-trained cell classifier or None)."""
    from hpcgan.metrics.cell import ensure_cell_extractor
    from hpcgan.metrics.features import load_extractor
    device, cell = env.device, None
    if s.features == "cell" or want_classifier:
        path = Path(s.feature_file) if s.feature_file else None
        if path is None:  # rank 0 trains one when none is cached; the others wait and load it
            cache = cache_root(s.cache_dir) / "extractors"
            if env.is_main:
                path, trained = ensure_cell_extractor(real.dir, cache, progress=s.progress)
                if trained:
                    logger.info("trained a cell feature extractor for %s -> %s", real.dir, path)
            dist.barrier(env)
            if not env.is_main:
                path, _ = ensure_cell_extractor(real.dir, cache, progress=False)
        cell = load_extractor("cell", path=path, device=device)
        if getattr(cell, "classes", None) not in (None, real.classes):
            raise EvaluateError(f"cell extractor {path} was trained on classes {cell.classes}, the shards have "
                                f"{real.classes}")
    extractor = cell if s.features == "cell" else load_extractor(s.features, weights_dir=s.weights_dir, device=device)
    return extractor, (cell if want_classifier else None)


def describe(ex) -> dict:
    if ex is None:
        return {}
    d = {"name": ex.name, "sha256": ex.sha256, "dim": int(ex.dim)}
    for k in ("path", "val_accuracy", "manifest_sha256"):
        if getattr(ex, k, None) is not None:
            d[k] = getattr(ex, k) if not isinstance(getattr(ex, k), Path) else str(getattr(ex, k))
    return d


# ---- what is evaluated ------------------------------------------------------------------------------

def fake_source(s: EvaluateSettings, real: ShardSplit, device: torch.device):
    """(source of images to evaluate, description dict)."""
    if s.fake:
        fake = Path(s.fake)
        if (fake / "manifest.json").is_file():
            split = ShardSplit(fake, s.fake_split, s.batch_size)
            if split.classes != real.classes:
                raise EvaluateError(f"classes of {fake} ({split.classes}) differ from the real shards' ({real.classes})")
            _same_size(split.image_size, real.image_size, fake)
            m = split.manifest
            return split, {"kind": "shards", "path": str(fake.resolve()), "split": s.fake_split,
                           "synthetic": bool(m.get("synthetic")), "model": m.get("model"),
                           "checkpoint": m.get("checkpoint"), "manifest_sha256": split.manifest_sha256}
        if fake.is_dir():
            return PngFolder(fake, real.classes, s.batch_size), {"kind": "png", "path": str(fake.resolve())}
        raise EvaluateError(f"fake={fake}: not a shard set (no manifest.json) nor a folder")
    return generator_source(s, real, device)


def _same_size(a: int, b: int, what) -> None:
    if a != b:
        raise EvaluateError(f"{what} has {a} px images but the real shards {b} px; evaluate like with like "
                            "(re-shard at the same size)")


def generator_source(s: EvaluateSettings, real: ShardSplit, device: torch.device):
    from hpcgan.generate import GenerateError, load_generator, unseen_classes
    try:
        G, spec, classes, image_size, info = load_generator(s.run, s.checkpoint, "raw" if s.weights == "init"
                                                            else s.weights, device=str(device))
    except GenerateError as e:
        raise EvaluateError(str(e)) from None
    if s.weights == "init":  # the same architecture, untrained: what "no learning" scores
        from hpcgan.models.registry import build_model
        torch.manual_seed(s.seed)
        counts = info.get("class_counts")
        G = build_model(spec, len(classes), image_size, counts and [counts.get(c, 0) for c in classes])[0]
        G = G.to(device).eval()
        info = {**info, "weights": "init", "step": 0}
    if classes != real.classes:
        raise EvaluateError(f"the checkpoint's classes ({classes}) differ from the real shards' ({real.classes})")
    _same_size(image_size, real.image_size, info["path"])
    # a class the generator never trained on is not scored: what it makes of it is not that cell type
    unseen = [c for c in unseen_classes(info.get("class_counts"), classes) if real.counts.get(c, 0) > 0]
    present = [i for i, c in enumerate(classes) if real.counts.get(c, 0) > 0 and c not in unseen]
    if unseen and spec.conditional:
        logger.warning("not scoring %s: the generator never saw a training image of them", unseen)
    if spec.conditional:
        plan = {i: s.n_per_class or real.counts[classes[i]] for i in present}
    else:
        plan = {-1: s.n_per_class * len(present) if s.n_per_class else len(real)}
    run_dir = Path(s.run).resolve() if s.run else Path(info["path"]).resolve().parent.parent
    desc = {"kind": "generator", "run_dir": str(run_dir), "model": spec.name, "conditional": spec.conditional,
            "checkpoint": {"path": str(info["path"]), "sha256": info["sha256"], "step": int(info["step"])},
            "weights": info["weights"], "seed": s.seed, "run_config": _run_config(info.get("config"), run_dir),
            "unseen_classes": unseen if spec.conditional else []}
    return GeneratorSource(G, spec, plan, s.seed, s.batch_size, device), desc


def _run_config(cfg: dict | None, run_dir: Path) -> dict:
    """The training settings a table groups by (seed, steps, regime): the checkpoint's config, else the run's
    config.yaml."""
    if cfg is None:
        from hpcgan.rundir import read_config
        try:
            cfg = read_config(run_dir) or {}
        except (OSError, ValueError):
            return {}
    keys = ("seed", "steps", "batch_size", "world_size", "balance_classes", "diffaug", "ema", "split", "shards",
            "precision", "scarce", "scarce_seed", "class_counts")
    return {k: cfg.get(k) for k in keys if k in cfg}


# ---- the evaluation ---------------------------------------------------------------------------------

def evaluate(settings: EvaluateSettings | dict, env: dist.DistEnv | None = None) -> dict | None:
    """Run one evaluation; returns the result dict on rank 0 (None on other ranks)."""
    s = settings if isinstance(settings, EvaluateSettings) else parse(EvaluateSettings, settings)
    env = env or dist.DistEnv(device=dist.resolve_device(s.device))
    t0 = time.time()
    try:
        real = ShardSplit(s.shards, s.real_split, s.batch_size)
    except FileNotFoundError as e:
        raise EvaluateError(str(e)) from None
    want = needs(s.metrics)
    pixels = "pixels" in want
    # what is evaluated loads (and is checked against the real shards) before an extractor is trained or read:
    # a typo in run= costs a second, not the minutes of training the cell extractor
    source, what = fake_source(s, real, env.device)
    extractor, classifier = load_extractors(s, real, env, "classifier" in want)

    cache_dir = cache_root(s.cache_dir)
    real_ex, cache_info = real_features(real, extractor, classifier, env, cache_dir, pixels, s.progress)
    fake_ex = _extract_units(source, extractor, classifier, env, pixels, "generated" if what["kind"] == "generator"
                             else f"images {what['kind']}", s.progress)
    if not env.is_main:
        return None
    out = output_path(s, what)
    lpips, lpips_missing = load_lpips_or_reason(s, env.device) if "lpips" in want else (None, "not asked for")
    data = EvalData(real.classes, real_ex.side(), fake_ex.side(), out_prefix=out.with_suffix(""), lpips=lpips,
                    lpips_missing=lpips_missing, seed=s.seed)
    results, skipped = compute(s.metrics, data)
    say_skipped(skipped)
    meta = {"format": FORMAT, "stage": "evaluate", "time": time.time(), "seconds": round(time.time() - t0, 2),
            "source": what, "tag": s.tag, "classes": real.classes, "image_size": real.image_size,
            "real": {"shards": str(real.dir.resolve()), "split": real.split, "manifest_sha256": real.manifest_sha256,
                     "n": len(real_ex.labels), **cache_info},
            "n_fake": len(fake_ex.labels), "extractor": describe(extractor), "classifier": describe(classifier),
            "world_size": env.world_size, "settings": asdict(s)}
    doc = {**meta, "metrics": {k: r.values for k, r in results.items()},
           "per_class": {k: r.per_class for k, r in results.items() if r.per_class},
           "info": {k: r.info for k, r in results.items() if r.info}, "skipped": skipped}
    doc["rows"] = _rows(meta, results, skipped)
    write_result(out, doc)
    append_rows(Path(s.results) if s.results else out.parent / "results.jsonl", doc["rows"])
    logger.info("evaluation written to %s", out)
    return doc


def output_path(s: EvaluateSettings, what: dict) -> Path:
    if s.out:
        return Path(s.out)
    step = what["checkpoint"]["step"]
    name = "init" if what.get("weights") == "init" else f"step-{step:08d}"
    return Path(what["run_dir"]) / "eval" / f"{name}-{s.features}.json"


def load_lpips_or_reason(s: EvaluateSettings, device):
    """(LPIPS distance, "") or (None, why not: the staging command) when its weights are not staged."""
    from hpcgan.metrics.lpips import load_lpips
    from hpcgan.metrics.weights import MissingWeightsError
    try:
        return load_lpips(weights_dir=s.weights_dir, device=device), ""
    except MissingWeightsError as e:
        return None, e.short


_said: set[str] = set()  # reasons this process has already warned about


def say_skipped(skipped: dict[str, str]) -> None:
    """Warn once per process and reason for each metric not computed (a study evaluates many runs); repeats
    go to the debug log. The JSON keeps every reason."""
    for name, why in skipped.items():
        said = f"{name}: {why}"
        (logger.debug if said in _said else logger.warning)("%s not computed: %s", name, why)
        _said.add(said)


def _rows(meta: dict, results: dict[str, MetricResult], skipped: dict[str, str]) -> list[dict]:
    """One row per number, with what places it in a table and traces it back (DESIGN.md, Results)."""
    src, cfg = meta["source"], meta["source"].get("run_config") or {}
    base = {"stage": "evaluate", "run_dir": src.get("run_dir") or src.get("path"), "source": src["kind"],
            "model": src.get("model"), "seed": cfg.get("seed"), "steps": (src.get("checkpoint") or {}).get("step"),
            "weights": src.get("weights"), "image_size": meta["image_size"], "tag": meta["tag"],
            "regime": {k: cfg[k] for k in ("balance_classes", "diffaug", "scarce", "split") if k in cfg} or None,
            "extractor": meta["extractor"].get("name"), "extractor_sha256": meta["extractor"].get("sha256"),
            "manifest_sha256": meta["real"]["manifest_sha256"], "real_split": meta["real"]["split"],
            "n_real": meta["real"]["n"], "n_fake": meta["n_fake"]}
    rows = []
    for name, r in results.items():
        by = meta["classifier"] if name == "class_accuracy" else meta["extractor"]
        where = {"extractor": by.get("name"), "extractor_sha256": by.get("sha256")}
        for metric, value in r.values.items():
            rows.append({**base, **where, "metric": metric, "class": None, "value": number(value)})
        for metric, per in r.per_class.items():
            for cls, value in per.items():
                rows.append({**base, **where, "metric": metric, "class": cls, "value": number(value)})
    for name, why in skipped.items():
        rows.append({**base, "metric": name, "class": None, "value": None, "skipped": why})
    return rows



def summary(doc: dict) -> str:
    """The headline numbers of one evaluation, one line each."""
    lines = []
    for name, values in doc["metrics"].items():
        lines.append(f"  {name:<15}" + "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
    for name, why in doc["skipped"].items():
        lines.append(f"  {name:<15}not computed: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m hpcgan.evaluate key=value ...` (also under torchrun): Hydra config configs/evaluate.yaml."""
    logging.basicConfig(level=logging.INFO if dist.launch_env()[0] == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = compose_settings(EvaluateSettings, "evaluate", argv)
    except SettingsError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    env = dist.init(s.device)
    try:
        doc = evaluate(s, env)
    except (EvaluateError, FileNotFoundError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup(env)
    if doc is not None:
        print(summary(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
