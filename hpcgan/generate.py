"""Turn a trained checkpoint into synthetic, class-balanced data.

Output directory `out` (written atomically, via hpcgan.fsutil.atomic_dir):
  {split}-NNNNNN.tar/.idx   shards in the same format as tools/shard.py (hpcgan.data.shards), so the
                            same loader reads real and synthetic sets side by side
  manifest.json             the shard-set manifest with synthetic: true, plus the checkpoint (path,
                            sha256, step), its run's training images per class (trained_counts), weights,
                            seed and the list of every image
  png/<class>/syn_<class>_<index>.png   (png=True) a browsable copy; file and key names start with
                            "syn_" so a synthetic image can never be mistaken for a patient's

Conditional models (G(z, y)) write `per_class=N` images of each chosen class, or top up every class of
a real shard set's split to `balance=TARGET` ("max": the largest class). One rule for a class the generator
never saw a training image of (its run's class_counts, recorded since issue 9), under per_class and balance
alike: it is skipped, said once, and recorded (manifest: skipped_classes); only a class asked for by name
(`classes=[monoblast]`) is refused (a GenerateError naming it): what a generator makes of a class it never
saw is mislabelled data. A checkpoint without counts is
generated as before, with a warning. Unconditional models cannot generate a chosen class; for them
`count=N` writes unlabelled images (label -1, class "unlabelled") into png/unlabelled/ and the manifest
only: no shards, since every shard sample needs a class label.

Same checkpoint + seed (+ batch size and device) -> byte-identical output: each class draws its latents
from its own generator seeded by class_seed(seed, label), independent of the other classes chosen.

For the evaluation stage: `load_generator` (a checkpoint -> G in eval mode and what it was trained on) and
`class_images` (the uint8 images generate() writes for one class and seed, batch by batch).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from hpcgan import dist
from hpcgan.data.shards import (MANIFEST, NO_TRAINING_IMAGES, ShardWriter, read_manifest, sha256_file, unseen_classes,
                                write_manifest)
from hpcgan.data.taxonomy import Taxonomy
from hpcgan.fsutil import atomic_dir
from hpcgan.images import check_image_size, to_uint8
from hpcgan.latent import sample_latent
from hpcgan.models.registry import GANSpec, build_model
from hpcgan.progress import Progress
from hpcgan.settings import MISSING
from hpcgan.views import ViewsError, check_source

logger = logging.getLogger(__name__)

WEIGHTS = ("auto", "ema", "raw")
UNLABELLED = "unlabelled"
CONDITIONAL_EXAMPLES = "wgan_gp_ac, acgan, cgan"


class GenerateError(ValueError):
    """Bad input to generate(); the message says what was wrong and what to do."""


@dataclass
class GenerateSettings:
    """What generate() and tools/generate.py take; these defaults are the ones (configs/generate.yaml
    documents the same values and what each means)."""
    run: str | None = None          # training run directory (its newest valid checkpoint)
    checkpoint: str | None = None   # or an explicit checkpoint file
    out: str = MISSING
    per_class: int | None = None    # how many: exactly one of per_class, balance, count
    balance: Any = None             # N or "max"
    count: int | None = None
    shards: str | None = None       # real shard set (balance)
    real_split: str = "train"
    classes: Any = None             # None / "all", a list, or "a,b"
    weights: str = "auto"
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    png: bool = True
    split: str = "train"
    shard_size: int = 1000
    truncation: float | None = None
    progress: bool = True
    curate: bool = False                    # keep only cells a judge trained on the GAN's own training cells
                                            # assigns to their class, and no near-copies (hpcgan.curate)
    curate_confidence: float = 0.5          # the judge's least probability of the cell's class
    curate_copy_percentile: float | None = 1.0  # near-copy threshold (percentile of training-cell nearest
                                            # distances, hpcgan.metrics.memorisation); null: no copy filter
    curate_max_draws: float = 4.0           # per class, draw at most this many x the images wanted
    curate_epochs: int = 30                 # the judge's training epochs (the last is kept)
    views: bool = False                     # draw each class's cells around its inverted training cells
                                            # (hpcgan.views: the GAN's own training cells, never val or test)
    view_sigma: float = 0.3                 # how far a view strays: anchor latent + view_sigma x N(0, I)
    view_steps: int = 400                   # Adam steps of each class's inversion
    view_weight: float = 1e-3               # weight of mean z^2 in the inversion (keeps latents near the prior)
    view_anchors: int | None = None         # per class, invert at most this many training cells (null: all)
    view_classes: Any = None                # the classes drawn as views (null: all; "scarce": those the GAN's
                                            # scarce cut made scarce); the others are drawn as usual
    view_from: str = "own"                  # whose cells anchor a view class: its own, or "others" (class-
                                            # swapped views: the other classes' cells drawn as the view class)

    def __post_init__(self) -> None:
        if self.out in (None, MISSING):
            raise GenerateError("give out=DIR for the synthetic data")
        modes = [k for k in ("per_class", "balance", "count") if getattr(self, k) is not None]
        if len(modes) != 1:
            raise GenerateError("give exactly one of per_class=N, balance=TARGET|max (with shards=DIR) or "
                                f"count=N (unconditional models); got {modes or 'none'}")
        if self.per_class is not None:
            self.per_class = _check_count("per_class", self.per_class)
        if self.count is not None:
            self.count = _check_count("count", self.count)
            if not self.png:
                raise GenerateError("unlabelled images (count=N) go only to the PNG folder; png=false would "
                                    "write nothing")
        if self.balance is not None:
            self.balance = _parse_balance(self.balance)
        for name in ("batch_size", "shard_size"):
            if _check_count(name, getattr(self, name)) == 0:
                raise GenerateError(f"{name} must be > 0")
        self.seed = _check_count("seed", self.seed)
        self._check_curation()
        self._check_views()
        if self.truncation is not None:
            _check_number("truncation", self.truncation, above_zero=True, hint=" (or null for none)")

    def _check_curation(self) -> None:
        if not self.curate:
            return
        if self.count is not None:
            raise GenerateError("curate=true judges each cell against its class: it needs labelled cells "
                                "(per_class or balance), not count=N")
        if not 0 <= self.curate_confidence <= 1:
            raise GenerateError(f"curate_confidence={self.curate_confidence!r} must be a probability in [0, 1]")
        p = self.curate_copy_percentile
        if p is not None and not 0 <= p <= 100:
            raise GenerateError(f"curate_copy_percentile={p!r} must be in 0..100 (or null: no copy filter)")
        if not self.curate_max_draws >= 1:
            raise GenerateError(f"curate_max_draws={self.curate_max_draws!r} must be >= 1")
        if _check_count("curate_epochs", self.curate_epochs) == 0:
            raise GenerateError("curate_epochs must be > 0")


    def _check_views(self) -> None:
        if not self.views:
            if self.view_from != "own":
                raise GenerateError(f"view_from={self.view_from} chooses the anchors of views: add views=true, or "
                                    "drop view_from")
            return
        if self.count is not None:
            raise GenerateError("views=true draws a class's cells around its training cells: it needs a "
                                "conditional model and labelled cells (per_class or balance), not count=N")
        if self.truncation is not None:
            raise GenerateError("views=true and truncation exclude each other: a view is anchor + view_sigma x "
                                "noise, which truncation would redraw; drop one")
        _check_number("view_sigma", self.view_sigma, above_zero=False, hint=" (0: the reconstructions)")
        if _check_count("view_steps", self.view_steps) == 0:
            raise GenerateError("view_steps must be > 0")
        _check_number("view_weight", self.view_weight, above_zero=False)
        c = self.view_classes
        if not (c is None or isinstance(c, str) or (isinstance(c, (list, tuple))
                                                    and all(isinstance(v, str) for v in c))):
            raise GenerateError(f"view_classes={c!r}: give null (every class), scarce, or a list of class names")
        try:
            check_source(self.view_from)
        except ViewsError as e:
            raise GenerateError(str(e)) from None
        if self.view_anchors is not None and _check_count("view_anchors", self.view_anchors) == 0:
            raise GenerateError("view_anchors must be > 0 (or null: every training cell of the class)")


# ---------------------------------------------------------------- names and seeds

def slug(name: str) -> str:
    """A class name usable in sample keys and file names ('smudge cell' -> 'smudge_cell'): keys may
    hold no '.', '/' and, for DALI's space-separated index, no spaces."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def sample_key(cls: str, index: int) -> str:
    return f"syn_{slug(cls)}_{index:06d}"


def class_seed(seed: int, label: int | str | None) -> int:
    """Seed of one class's latent stream: a function of (seed, label) only, so a class's images do not depend
    on which other classes are generated. label: the class label (3 and "3" alike), None or "unlabelled"
    for an unconditional model's one stream."""
    key = UNLABELLED if label is None else str(label)
    digest = hashlib.sha256(f"hpcgan.generate:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def resolve_device(device: str) -> torch.device:
    try:
        return dist.resolve_device(device)
    except (ValueError, RuntimeError) as e:
        raise GenerateError(str(e)) from None


# ---------------------------------------------------------------- checkpoint

def load_checkpoint(run_dir: str | Path | None, checkpoint: str | Path | None) -> tuple[dict, Path, str]:
    """(state, path, sha256) of an explicit checkpoint file, else of the newest valid one in run_dir."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise GenerateError(f"checkpoint {path} does not exist")
        data = path.read_bytes()  # hash exactly the bytes that are loaded
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, not a checkpoint, pickled code refused by weights_only
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise GenerateError(f"checkpoint {path} does not load ({type(e).__name__}: {first}); pass a "
                                "checkpoints/step-*.pt file written by hpcgan.train") from None
        if not isinstance(state, dict):
            raise GenerateError(f"checkpoint {path} is not a training checkpoint (a {type(state).__name__})")
        return state, path.resolve(), hashlib.sha256(data).hexdigest()
    if run_dir is None:
        raise GenerateError("give run=RUN_DIR (a training run directory) or checkpoint=PATH")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GenerateError(f"run directory {run_dir} does not exist")
    from hpcgan.checkpoint import list_checkpoints, load_latest
    state, path = load_latest(run_dir, map_location="cpu")
    if state is None:
        found = list_checkpoints(run_dir)
        if found:
            raise GenerateError(f"none of the {len(found)} checkpoints in {run_dir / 'checkpoints'} loads "
                                "(see the warnings above for why)")
        raise GenerateError(f"run directory {run_dir} has no checkpoint (checkpoints/step-*.pt); "
                            "train it first (hpcgan.train) or pass checkpoint=PATH")
    path = Path(path)
    return state, path.resolve(), sha256_file(path)


def checkpoint_model(state: dict, path: Path) -> tuple[GANSpec, list[str], int]:
    config = state.get("config") or {}
    missing = [k for k in ("model", "classes", "image_size") if k not in config]
    if missing or "G" not in state:
        raise GenerateError(f"{path}: not a training checkpoint (config lacks {missing or ['G']})")
    try:
        return GANSpec.from_config(config["model"]), list(config["classes"]), check_image_size(config["image_size"])
    except ValueError as e:
        raise GenerateError(f"{path}: {e}") from None


def select_weights(state: dict, weights: str, path: Path) -> tuple[dict, str]:
    """The generator state dict to use and its name: the EMA weights when present (unless raw asked)."""
    if weights not in WEIGHTS:
        raise GenerateError(f"weights={weights!r}; expected one of {WEIGHTS}")
    has_ema = state.get("G_ema") is not None
    if weights == "ema" and not has_ema:
        raise GenerateError(f"{path} holds no EMA generator weights (G_ema); use weights=raw")
    if weights == "raw" or not has_ema:
        return state["G"], "raw"
    return state["G_ema"], "ema"


def build_generator(spec: GANSpec, classes: list[str], image_size: int, weights: dict,
                    device: torch.device) -> torch.nn.Module:
    G, _ = build_model(spec, len(classes), image_size)
    try:
        G.load_state_dict(weights)
    except RuntimeError as e:   # weights of another architecture, size or width than its own config says
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise GenerateError(f"the checkpoint's generator weights do not fit the {spec.name} at {image_size} px its "
                            f"config describes ({first} ...): a damaged or hand-edited checkpoint") from None
    return G.to(device).eval()


def own_batchnorm_statistics(G, spec: GANSpec, state: dict, classes: list[str], path: Path) -> None:
    """EMA weights of a checkpoint written before hpcgan.train kept their own BatchNorm statistics (no
    "G_ema_bn": "standing") hold the live generator's, which do not fit them (issue 9: blank samples):
    recompute them as training does now (hpcgan.train.standing_stats, the run's batch size and seed)."""
    from hpcgan.train import TrainSettings, standing_stats
    if state.get("G_ema_bn") == "standing":
        return
    config = state.get("config") or {}
    device = next(G.parameters()).device
    if standing_stats(G, spec, len(classes), batches=TrainSettings.ema_standing_batches,
                      batch_size=int(config.get("batch_size", TrainSettings.batch_size)),
                      seed=int(config.get("seed", 0)), device=device):
        logger.warning("%s: its EMA generator carries the live generator's BatchNorm statistics (a checkpoint "
                       "from before they were recomputed for the EMA weights); recomputed them", path)


def trained_counts(config: dict) -> dict[str, int] | None:
    """{class: training images} of the run that wrote a checkpoint (its config's class_counts); None for a
    checkpoint from before runs recorded them."""
    counts = config.get("class_counts")
    return None if counts is None else {str(c): int(n) for c, n in counts.items()}


def load_generator(run_dir=None, checkpoint=None, weights: str = "auto", device: str = "auto"
                   ) -> tuple[torch.nn.Module, GANSpec, list[str], int, dict]:
    """(G in eval mode on `device`, its spec, its classes in label order, image size, info) of an explicit
    checkpoint file, else of run_dir's newest valid one; info = {"path", "sha256", "step", "weights", "config",
    "class_counts"} (weights "ema" or "raw": weights="auto" takes the EMA generator when the checkpoint has
    one; class_counts: {class: training images} of the run, None when the checkpoint predates them)."""
    state, path, sha = load_checkpoint(run_dir, checkpoint)
    spec, classes, image_size = checkpoint_model(state, path)
    g_weights, used = select_weights(state, weights, path)
    step = int(state.get("step", -1))
    logger.info("checkpoint %s (step %d, model %s): using %s generator weights",
                path, step, spec.name, "EMA" if used == "ema" else "raw (non-EMA)")
    G = build_generator(spec, classes, image_size, g_weights, resolve_device(device))
    if used == "ema":
        own_batchnorm_statistics(G, spec, state, classes, path)
    config = state.get("config") or {}
    return G, spec, classes, image_size, {"path": str(path), "sha256": sha, "step": step, "weights": used,
                                          "config": config, "class_counts": trained_counts(config)}


# ---------------------------------------------------------------- how many of each class

def _check_number(name: str, value, *, above_zero: bool, hint: str = "") -> None:
    """A real number > 0 (above_zero) or >= 0; a bool is no number here."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (value > 0 if above_zero else value >= 0)
    if not ok:
        raise GenerateError(f"{name}={value!r} must be a number {'> 0' if above_zero else '>= 0'}{hint}")


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise GenerateError(f"{name}={value!r} must be a whole number")
    if value < 0:
        raise GenerateError(f"{name}={value} is negative; give a count >= 0")
    return int(value)


def _parse_balance(balance) -> int | str:
    if balance == "max":
        return balance
    if isinstance(balance, str) and balance.strip().isdigit():
        return int(balance)
    if isinstance(balance, str):
        raise GenerateError(f"balance={balance!r}: give a whole number of images per class or 'max'")
    return _check_count("balance", balance)


def select_classes(classes: list[str], wanted) -> list[str]:
    """The chosen class names in label order; None/'all' = every class. A string may list several
    names separated by commas."""
    if wanted is None or wanted == "all":
        return list(classes)
    if isinstance(wanted, str):
        wanted = [w.strip() for w in wanted.split(",") if w.strip()]
    wanted = list(wanted)
    unknown = [w for w in wanted if w not in classes]
    if unknown:
        raise GenerateError(f"unknown classes {unknown}; the checkpoint's classes are {classes}")
    return [c for c in classes if c in wanted]


def trained_on(config: dict) -> dict | None:
    """What the checkpoint's GAN trained on: {"shards", "split", "scarce", "scarce_seed"} from its run config
    (None when the config does not say); synthetic manifests carry it for the classifier's leakage guard."""
    if not config or not config.get("shards"):
        return None
    scarce, seed = config.get("scarce") or None, config.get("seed")
    cut_seed = config.get("scarce_seed")
    return {"shards": config["shards"], "split": config.get("split", "train"), "scarce": scarce,
            "scarce_seed": (seed if cut_seed is None else cut_seed) if scarce else None, "seed": seed}


def _cut_applies(seen: dict | None, shards, real_split: str) -> bool:
    """Whether the real split being topped up is the one the GAN's scarce cut was made of."""
    if not seen or not seen.get("scarce") or isinstance(seen["shards"], (list, tuple)):
        return False
    same = Path(str(seen["shards"])).resolve() == Path(str(shards)).resolve()
    return same and real_split == seen.get("split") == "train"


def balance_counts(classes: list[str], chosen: list[str], balance, shards, real_split: str,
                   image_size: int, seen: dict | None = None) -> tuple[dict[str, int], dict]:
    """How many images each chosen class needs to reach the target in the real shard set's split; when the
    GAN trained on a scarce cut of that split (`seen`, trained_on), the cut classes count as their N (what a
    classifier of the same scarcity study has of them), so `balance` tops the cut up."""
    if shards is None:
        raise GenerateError("balance=TARGET needs shards=REAL_SHARD_DIR (the real shard set to top up)")
    try:
        manifest = read_manifest(shards)
    except FileNotFoundError as e:
        raise GenerateError(str(e)) from None
    if list(manifest.get("classes", [])) != classes:
        raise GenerateError(f"classes of the real shards {shards} ({manifest.get('classes')}) differ from the "
                            f"checkpoint's ({classes}); the synthetic labels would not mean the same classes")
    if manifest.get("image_size") not in (None, image_size):
        raise GenerateError(f"real shards {shards} are {manifest['image_size']} px but the checkpoint makes "
                            f"{image_size} px images; they could not be loaded together")
    real = {c: int(n) for c, n in (manifest.get("counts") or {}).get(real_split, {}).items()}
    if not real:
        raise GenerateError(f"real shards {shards} have no '{real_split}' split to balance")
    cut = seen["scarce"] if _cut_applies(seen, shards, real_split) else {}
    real = {c: min(n, int(cut[c])) if c in cut else n for c, n in real.items()}
    target = max(real.values()) if balance == "max" else balance
    counts = {c: max(0, target - real.get(c, 0)) for c in chosen}
    info = {"shards": str(Path(shards).resolve()), "split": real_split, "target": target,
            "real_counts": {c: real.get(c, 0) for c in classes}, "taxonomy": manifest.get("taxonomy"),
            "scarce": ({"classes": cut, "seed": seen.get("scarce_seed")} if cut else None)}
    return counts, info


# ---------------------------------------------------------------- sampling

@torch.inference_mode()
def class_images(G, spec: GANSpec, label: int | None, n: int, seed: int, batch_size: int, device,
                 truncation: float | None = None, views=None) -> Iterator[torch.Tensor]:
    """n images of class `label` (None: an unconditional model) as uint8 [B, 3, S, S] CPU batches of at most
    batch_size, in index order. `seed` seeds the class's latent stream: with class_seed(S, label) these are
    the images generate(seed=S) writes for that class. The latents are drawn at once, so they do not
    depend on batch_size. `views` (hpcgan.views.Views) moves the stream around the class's anchors."""
    if (label is None) == spec.conditional:
        raise GenerateError(f"{spec.name} is {'' if spec.conditional else 'un'}conditional: "
                            + ("give a class label" if spec.conditional else "give label=None"))
    gen = torch.Generator().manual_seed(seed)
    y = None if label is None else torch.full((n,), label, dtype=torch.int64)
    latent = sample_latent(spec, n, gen, y=y, truncation=truncation)
    if views is not None:
        latent.z = views.move(latent.z, label)
    for start in range(0, n, batch_size):
        batch = slice(start, start + batch_size)
        y_batch = None if latent.y is None else latent.y[batch].to(device)
        yield to_uint8(G(latent.z[batch].to(device), y_batch)).cpu()


def to_png(images: torch.Tensor) -> list[bytes]:
    """uint8 [B, 3, S, S] (float in [-1, 1]: converted by to_uint8) -> PNG bytes (deterministic encoder
    settings, no metadata)."""
    if images.is_floating_point():
        images = to_uint8(images)
    out = []
    for a in images.cpu().permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(a, "RGB").save(buf, format="PNG", compress_level=6)
        out.append(buf.getvalue())
    return out


def generate_class(G, spec: GANSpec, label: int | None, n: int, seed: int, batch_size: int,
                   device, truncation: float | None = None, views=None) -> Iterator[bytes]:
    """PNG bytes of class_images(...), one image at a time, in index order."""
    for batch in class_images(G, spec, label, n, seed, batch_size, device, truncation, views):
        yield from to_png(batch)


# ---------------------------------------------------------------- output

def _check_out(out: Path, shards) -> None:
    """Never replace something that is not an earlier synthetic output (e.g. the real shards)."""
    if shards is not None and out.resolve() == Path(shards).resolve():
        raise GenerateError(f"out={out} is the real shard directory; write synthetic data elsewhere")
    if not out.exists():
        return
    try:
        ok = json.loads((out / MANIFEST).read_text()).get("synthetic") is True
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok and (out.is_file() or any(out.iterdir())):
        raise GenerateError(f"out={out} exists and is not an earlier synthetic output; "
                            "choose a new directory or remove it yourself")
    logger.info("replacing the earlier output in %s", out)


def generate(run_dir=None, out=None, per_class=None, balance=None, shards=None, **options) -> dict:
    """Write synthetic images from a training run's checkpoint to `out`; return the manifest.

    Exactly one of per_class=N, balance=TARGET|"max" (with shards=REAL_SHARD_DIR), or count=N
    (unconditional models only) says how many; options: the other GenerateSettings fields. See the
    module docstring for the layout.
    """
    return write_synthetic(GenerateSettings(run=run_dir, out=out, per_class=per_class, balance=balance,
                                            shards=shards, **options))


def write_synthetic(s: GenerateSettings) -> dict:
    """generate() for checked settings (tools/generate.py parses them from the command line)."""
    out = Path(s.out)
    _check_out(out, s.shards)
    G, spec, classes, image_size, ckpt = load_generator(s.run, s.checkpoint, s.weights, s.device)
    plan, balance_info, real_taxonomy = _plan(s, spec, classes, image_size, ckpt["class_counts"],
                                              trained_on(ckpt["config"]))
    total = sum(plan.values())
    logger.info("generating %d images: %s", total, {c: n for c, n in plan.items() if n})
    if total == 0 and s.count is None:
        logger.warning("nothing to generate (every chosen class already has enough images): %s will hold a "
                       "manifest but no '%s' shards, so do not pass it to the loader", out, s.split)
    judge = _judge(s, ckpt, classes, image_size) if s.curate and total else None
    views = _views(s, G, spec, ckpt, classes, plan) if s.views and total else None
    with atomic_dir(out) as staging:
        shard_list, images, tallies = _write_images(staging, G, spec, classes, plan, s, ckpt, judge, views)
        manifest = _manifest(s, spec, classes, image_size, plan, shard_list, images, ckpt, balance_info,
                             real_taxonomy, str(next(G.parameters()).device))
        manifest["curation"] = _curation_record(s, judge, tallies)
        manifest["views"] = views.record if views is not None else None
        manifest = write_manifest(staging, manifest)
        if shard_list:  # the same picture tools/shard.py leaves beside real shards
            from hpcgan.viz import shard_contact_sheet
            shard_contact_sheet(staging, s.split, staging / "contact_sheet.png",
                                title=f"SYNTHETIC ({spec.name}, step {ckpt['step']}): the first images of every class")
    logger.info("wrote %d synthetic images to %s", len(manifest["images"]), out)
    return manifest


def _plan(s: GenerateSettings, spec: GANSpec, classes: list[str], image_size: int, counts: dict[str, int] | None,
          seen: dict | None = None):
    """({class: images to generate}, balance info or None, the real shards' taxonomy or None). `counts`: the
    checkpoint's training images per class (None: unknown); `seen`: what it trained on (trained_on)."""
    if s.count is not None:
        if spec.conditional:
            raise GenerateError(f"count=N is for unconditional models; {spec.name} is conditional: "
                                "use per_class=N or balance=TARGET")
        if s.classes not in (None, "all"):
            raise GenerateError(f"classes={s.classes!r}: an unconditional model ({spec.name}) cannot generate "
                                "chosen classes")
        return {UNLABELLED: s.count}, None, None
    if not spec.conditional:
        raise GenerateError(f"this model ({spec.name}) is unconditional and cannot generate a chosen class; "
                            f"use a conditional one ({CONDITIONAL_EXAMPLES}), or count=N for unlabelled "
                            "images (PNG folder and manifest only)")
    chosen = select_classes(classes, s.classes)
    unseen = unseen_classes(counts, chosen)
    if counts is None:
        logger.warning("the checkpoint does not record how many training images each class had (it predates "
                       "class_counts): classes it never saw cannot be told apart and are generated like the others")
    if unseen and s.classes not in (None, "all"):   # asked for by name: refused, never silently dropped
        raise GenerateError(f"classes={s.classes!r}: the generator never saw a training image of {unseen} "
                            f"({NO_TRAINING_IMAGES} in its run): what it makes of them is not those cells, only "
                            f"mislabelled data. Choose among the classes it was trained on: "
                            f"classes={_seen_list(chosen, unseen)}")
    if unseen:
        logger.warning("skipping %s: the generator never saw a training image of them (%s); recorded in the "
                       "manifest's skipped_classes", unseen, NO_TRAINING_IMAGES)
    kept = [c for c in chosen if c not in unseen]
    if not kept:
        raise GenerateError(f"the generator never saw a training image of any class chosen ({chosen}): nothing "
                            "to generate")
    if s.balance is None:
        return {c: s.per_class for c in kept}, None, None
    plan, info = balance_counts(classes, kept, s.balance, s.shards, s.real_split, image_size, seen)
    info["skipped_classes"] = unseen
    return plan, info, info.pop("taxonomy")


def _skipped(s: GenerateSettings, classes: list[str], counts: dict[str, int] | None) -> list[str]:
    """The chosen classes skipped because the generator never saw them (none for unlabelled images)."""
    return [] if s.count is not None else unseen_classes(counts, select_classes(classes, s.classes))


def _seen_list(chosen: list[str], unseen: list[str]) -> str:
    """The chosen classes the generator saw, as a Hydra list override."""
    return "[" + ",".join(f'"{c}"' if " " in c else c for c in chosen if c not in unseen) + "]"


def _judge(s: GenerateSettings, ckpt: dict, classes: list[str], image_size: int):
    from hpcgan.curate import CurationError, train_judge
    try:
        return train_judge(trained_on(ckpt["config"]), classes, image_size, confidence=s.curate_confidence,
                           copy_percentile=s.curate_copy_percentile, epochs=s.curate_epochs, seed=s.seed)
    except CurationError as e:
        raise GenerateError(str(e)) from None


def _views(s: GenerateSettings, G, spec: GANSpec, ckpt: dict, classes: list[str], plan: dict[str, int]):
    from hpcgan.curate import CurationError, training_source
    from hpcgan.views import fit_views
    seen = trained_on(ckpt["config"])
    try:
        training_source(seen, "views=true")    # a checkpoint without trained_on: said before view_classes' checks
        chosen = _view_classes(s.view_classes, plan, seen)
        return fit_views(G, spec, seen, classes, chosen, sigma=s.view_sigma, steps=s.view_steps,
                         weight=s.view_weight, anchors=s.view_anchors, seed=s.seed, batch_size=s.batch_size,
                         source=s.view_from)
    except (CurationError, ViewsError) as e:
        raise GenerateError(str(e)) from None


def _view_classes(wanted, plan: dict[str, int], seen: dict | None) -> list[str]:
    """The planned classes view_classes names: null every one, "scarce" those the GAN's scarce cut cut."""
    planned = [c for c, n in plan.items() if n]
    if wanted == "scarce":
        cut = list(((seen or {}).get("scarce") or {}))
        if not cut:
            raise GenerateError("view_classes=scarce: the checkpoint's run cut no class (no scarce= in what it "
                                "trained on); name the classes, or null for all")
        chosen = [c for c in planned if c in cut]
        if not chosen:
            raise GenerateError(f"view_classes=scarce: none of the classes this set generates ({planned}) was cut "
                                f"(the cut: {cut}); name the classes, or null for all")
        return chosen
    if wanted is None or wanted == "all":
        return planned
    named = [w.strip() for w in wanted.split(",")] if isinstance(wanted, str) else list(wanted)
    stray = [c for c in named if c not in planned]
    if stray:
        raise GenerateError(f"view_classes: {stray} are not among the classes this set generates ({planned})")
    return [c for c in planned if c in named]


def _class_pngs(G, spec: GANSpec, label: int | None, n: int, s: GenerateSettings, device, judge, tally,
                views=None):
    """(index, PNG bytes, extra manifest fields) of the class's images: the first n of its latent order (around
    its anchors with views), or with a judge the first n it keeps of at most curate_max_draws x n (tally counts
    them; hpcgan.curate)."""
    seed = class_seed(s.seed, label)
    if judge is None or n == 0:
        for index, data in enumerate(generate_class(G, spec, label, n, seed, s.batch_size, device, s.truncation,
                                                    views)):
            yield index, data, {}
        return
    from hpcgan.curate import curated
    draws = int(np.ceil(n * s.curate_max_draws))
    batches = class_images(G, spec, label, draws, seed, s.batch_size, device, s.truncation, views)
    for index, img, p, distance in curated(batches, judge, label, n, tally):
        yield index, to_png(img[None])[0], {"judge_p": round(p, 4), "copy_distance": round(distance, 4)}


def _curation_record(s: GenerateSettings, judge, tallies: dict) -> dict | None:
    """The manifest's "curation": the judge and, per class, wanted / drawn / kept / dropped by reason."""
    if judge is None:
        return None
    for cls, t in tallies.items():
        if t.kept < t.wanted:
            logger.warning("curation: %s kept %d of the %d wanted after %d draws (dropped %s); lower "
                           "curate_confidence or raise curate_max_draws", cls, t.kept, t.wanted, t.drawn, t.dropped)
    return {"judge": judge.info, "max_draws": s.curate_max_draws,
            "classes": {c: t.as_dict() for c, t in tallies.items()}}


def _write_images(staging: Path, G, spec: GANSpec, classes: list[str], plan: dict[str, int], s: GenerateSettings,
                  ckpt: dict, judge=None, views=None) -> tuple[list[dict], list[dict], dict]:
    """Generate every planned image into shards (labelled) and/or the PNG folder, through the judge when curating;
    (shard dicts, image list, {class: hpcgan.curate.ClassTally} when curating)."""
    from hpcgan.curate import ClassTally
    labelled = s.count is None
    device = next(G.parameters()).device
    common = {"synthetic": True, "source": "synthetic", "source_label": "synthetic", "model": spec.name,
              "checkpoint_sha256": ckpt["sha256"], "checkpoint_step": ckpt["step"], "seed": s.seed,
              "weights": ckpt["weights"]}
    images: list[dict] = []
    tallies = {cls: ClassTally(n) for cls, n in plan.items() if n} if judge is not None else {}
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(ShardWriter(staging, s.split, s.shard_size)) if labelled else None
        bar = stack.enter_context(Progress(sum(plan.values()), "generate", "img", bar=s.progress))
        for cls, n in plan.items():
            label = classes.index(cls) if labelled else -1
            g_label = label if labelled else None
            for index, data, extra in _class_pngs(G, spec, g_label, n, s, device, judge, tallies.get(cls), views):
                key = sample_key(cls, index)
                rel = f"png/{slug(cls)}/{key}.png" if s.png else None
                if rel is not None:
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    (staging / rel).write_bytes(data)
                if writer is not None:
                    meta = dict(common, **{"class": cls, "fine": cls, "label": label, "index": index, "key": key,
                                           "path": rel or key, "sha256": hashlib.sha256(data).hexdigest()})
                    writer.write(key, data, "png", label, meta)
                images.append({"class": cls, "label": label, "index": index, "key": key, "png": rel, **extra})
                bar.update(1)
    return (writer.shards if writer is not None else []), images, tallies


def _manifest(s: GenerateSettings, spec: GANSpec, classes, image_size, plan, shard_list, images, ckpt,
              balance_info, real_taxonomy, device: str) -> dict:
    """The shard-set manifest (hpcgan.data.shards contract) plus provenance. Nothing in it depends on
    where `out` is, so the same inputs give the same bytes."""
    if s.count is not None:
        counts, by_source, shards = {}, {}, {}
    else:
        per = {c: 0 for c in classes}   # what was written (curation may keep fewer than planned)
        for im in images:
            per[im["class"]] += 1
        counts, by_source, shards = {s.split: per}, {s.split: {"synthetic": per}}, {s.split: shard_list}
    settings = {k: getattr(s, k) for k in ("per_class", "balance", "count", "classes", "batch_size", "png",
                                            "split", "truncation", "shard_size")}
    return {
        "synthetic": True,
        "classes": classes,
        "image_size": image_size,
        "counts": counts,
        "counts_by_source": by_source,
        "shards": shards,
        "unlabelled": plan.get(UNLABELLED, 0) if s.count is not None else 0,
        "settings": settings | {"device": device},
        "taxonomy": _taxonomy(classes, real_taxonomy),
        "model": spec.name,
        "weights": ckpt["weights"],
        "seed": s.seed,
        "checkpoint": {k: ckpt[k] for k in ("path", "sha256", "step")},
        "trained_counts": ckpt["class_counts"],    # the checkpoint's training images per class (null: unknown)
        "trained_on": trained_on(ckpt["config"]),  # its shards, split(s) and scarce cut (the leakage guard reads it)
        "balance": balance_info,
        "skipped_classes": _skipped(s, classes, ckpt["class_counts"]),  # never seen by the generator: none made
        "images": images,
    }


def _taxonomy(classes: list[str], real_taxonomy: dict | None) -> dict:
    """The taxonomy the labels follow: the real shards' when balancing, else the repo's if its classes
    are the checkpoint's, else just the class list."""
    if real_taxonomy:
        return real_taxonomy
    tax = Taxonomy.load()
    return tax.spec if tax.classes == classes else {"classes": classes}
