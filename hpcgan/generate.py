"""Turn a trained checkpoint into synthetic, class-balanced data.

Output directory `out` (written atomically, via hpcgan.fsutil.atomic_dir):
  {split}-NNNNNN.tar/.idx   shards in the same format as tools/shard.py (hpcgan.data.shards), so the
                            same loader reads real and synthetic sets side by side
  manifest.json             the shard-set manifest with synthetic: true, plus the checkpoint (path,
                            sha256, step), weights, seed and the list of every image
  png/<class>/syn_<class>_<index>.png   (png=True) a browsable copy; file and key names start with
                            "syn_" so a synthetic image can never be mistaken for a patient's

Conditional models (G(z, y)) write `per_class=N` images of each chosen class, or top up every class of
a real shard set's split to `balance=TARGET` ("max": the largest class). Unconditional models cannot
generate a chosen class; for them `count=N` writes unlabelled images (label -1, class "unlabelled")
into png/unlabelled/ and the manifest only: no shards, since every shard sample needs a class label.

Same checkpoint + seed (+ batch size and device) -> byte-identical output: each class draws its latents
from its own generator seeded from (seed, class name), independent of the other classes chosen.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hpcgan import dist
from hpcgan.data.shards import MANIFEST, ShardWriter, read_manifest, sha256_file
from hpcgan.data.taxonomy import Taxonomy
from hpcgan.fsutil import atomic_dir
from hpcgan.models.registry import GANSpec, build_model

logger = logging.getLogger(__name__)

WEIGHTS = ("auto", "ema", "raw")
UNLABELLED = "unlabelled"
CONDITIONAL_EXAMPLES = "wgan_gp_ac, acgan, cgan"


class GenerateError(ValueError):
    """Bad input to generate(); the message says what was wrong and what to do."""


# ---------------------------------------------------------------- names and seeds

def slug(name: str) -> str:
    """A class name usable in sample keys and file names ('smudge cell' -> 'smudge_cell'): keys may
    hold no '.', '/' and, for DALI's space-separated index, no spaces."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def sample_key(cls: str, index: int) -> str:
    return f"syn_{slug(cls)}_{index:06d}"


def class_seed(seed: int, cls: str) -> int:
    """Seed of one class's latent stream: a function of (seed, class name) only."""
    digest = hashlib.sha256(f"hpcgan.generate:{seed}:{cls}".encode()).digest()
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
    return GANSpec.from_config(config["model"]), list(config["classes"]), int(config["image_size"])


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
    G.load_state_dict(weights)
    return G.to(device).eval()


# ---------------------------------------------------------------- how many of each class

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


def balance_counts(classes: list[str], chosen: list[str], balance, shards, real_split: str,
                   image_size: int) -> tuple[dict[str, int], dict]:
    """How many images each chosen class needs to reach the target in the real shard set's split."""
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
    target = max(real.values()) if balance == "max" else balance
    counts = {c: max(0, target - real.get(c, 0)) for c in chosen}
    info = {"shards": str(Path(shards).resolve()), "split": real_split, "target": target,
            "real_counts": {c: real.get(c, 0) for c in classes}, "taxonomy": manifest.get("taxonomy")}
    return counts, info


# ---------------------------------------------------------------- sampling

def sample_latent(spec: GANSpec, n: int, gen: torch.Generator, truncation: float | None = None) -> torch.Tensor:
    """[n, spec.latent_dim] on the CPU: normal noise (optionally truncated: values beyond +-t drawn
    again), then the InfoGAN codes the spec asks for (one-hot categorical, uniform(-1, 1) continuous)."""
    z = torch.randn(n, spec.z_dim, generator=gen)
    if truncation is not None:
        out = z.abs() > truncation
        while out.any():
            z[out] = torch.randn(int(out.sum()), generator=gen)
            out = z.abs() > truncation
    parts = [z]
    if spec.info_cat > 0:
        cat = torch.randint(spec.info_cat, (n,), generator=gen)
        parts.append(torch.nn.functional.one_hot(cat, spec.info_cat).float())
    if spec.info_cont > 0:
        parts.append(torch.rand(n, spec.info_cont, generator=gen) * 2 - 1)
    return torch.cat(parts, dim=1)


def to_png(images: torch.Tensor) -> list[bytes]:
    """[B, 3, S, S] in [-1, 1] -> PNG bytes (deterministic encoder settings, no metadata)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).numpy()
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a, "RGB").save(buf, format="PNG", compress_level=6)
        out.append(buf.getvalue())
    return out


@torch.inference_mode()
def generate_class(G, spec: GANSpec, label: int | None, n: int, seed: int, batch_size: int,
                   device: torch.device, truncation: float | None):
    """Yield PNG bytes of n images of one class (label None: unconditional), in index order."""
    gen = torch.Generator().manual_seed(seed)
    z_all = sample_latent(spec, n, gen, truncation)  # drawn at once: the stream does not depend on batch size
    for start in range(0, n, batch_size):
        z = z_all[start:start + batch_size].to(device)
        y = None if label is None else torch.full((z.shape[0],), label, dtype=torch.int64, device=device)
        yield from to_png(G(z, y))


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


def generate(run_dir=None, out=None, per_class=None, balance=None, shards=None, *, count=None,
             classes=None, checkpoint=None, weights="auto", seed=0, batch_size=64, device="auto",
             png=True, split="train", real_split="train", shard_max_count=1000, truncation=None,
             progress=True) -> dict:
    """Write synthetic images from a training run's checkpoint to `out`; return the manifest.

    Exactly one of per_class=N, balance=TARGET|"max" (with shards=REAL_SHARD_DIR), or count=N
    (unconditional models only) says how many. See the module docstring for the layout.
    """
    if out is None:
        raise GenerateError("give out=DIR for the synthetic data")
    modes = {k: v for k, v in (("per_class", per_class), ("balance", balance), ("count", count)) if v is not None}
    if len(modes) != 1:
        raise GenerateError("give exactly one of per_class=N, balance=TARGET|max (with shards=DIR) or "
                            f"count=N (unconditional models); got {sorted(modes) or 'none'}")
    if per_class is not None:
        per_class = _check_count("per_class", per_class)
    if count is not None:
        count = _check_count("count", count)
    if balance is not None:
        balance = _parse_balance(balance)
    batch_size = _check_count("batch_size", batch_size)
    if batch_size == 0:
        raise GenerateError("batch_size must be > 0")
    seed = _check_count("seed", seed)
    if truncation is not None and (isinstance(truncation, bool) or not isinstance(truncation, (int, float))
                                   or truncation <= 0):
        raise GenerateError(f"truncation={truncation!r} must be a number > 0 (or null for none)")
    out = Path(out)
    _check_out(out, shards)

    state, ckpt_path, ckpt_sha = load_checkpoint(run_dir, checkpoint)
    spec, all_classes, image_size = checkpoint_model(state, ckpt_path)
    step = int(state.get("step", -1))
    g_weights, weights_used = select_weights(state, weights, ckpt_path)
    logger.info("checkpoint %s (step %d, model %s): using %s generator weights",
                ckpt_path, step, spec.name, "EMA" if weights_used == "ema" else "raw (non-EMA)")

    if count is not None and spec.conditional:
        raise GenerateError(f"count=N is for unconditional models; {spec.name} is conditional: "
                            "use per_class=N or balance=TARGET")
    if count is None and not spec.conditional:
        raise GenerateError(f"this model ({spec.name}) is unconditional and cannot generate a chosen class; "
                            f"use a conditional one ({CONDITIONAL_EXAMPLES}), or count=N for unlabelled "
                            "images (PNG folder and manifest only)")
    if count is not None and not png:
        raise GenerateError("unlabelled images (count=N) go only to the PNG folder; png=false would write nothing")

    if count is not None and classes not in (None, "all"):
        raise GenerateError(f"classes={classes!r}: an unconditional model ({spec.name}) cannot generate chosen classes")

    balance_info = real_taxonomy = None
    if count is not None:
        plan = {UNLABELLED: count}
    else:
        chosen = select_classes(all_classes, classes)
        if balance is not None:
            plan, balance_info = balance_counts(all_classes, chosen, balance, shards, real_split, image_size)
            real_taxonomy = balance_info.pop("taxonomy")
        else:
            plan = {c: per_class for c in chosen}
    total = sum(plan.values())
    logger.info("generating %d images: %s", total, {c: n for c, n in plan.items() if n})
    if total == 0 and count is None:
        logger.warning("nothing to generate (every chosen class already has enough images): %s will hold a "
                       "manifest but no '%s' shards, so do not pass it to the loader", out, split)

    dev = resolve_device(device)
    G = build_generator(spec, all_classes, image_size, g_weights, dev)
    common = {"synthetic": True, "source": "synthetic", "source_label": "synthetic", "model": spec.name,
              "checkpoint_sha256": ckpt_sha, "checkpoint_step": step, "seed": seed, "weights": weights_used}
    with atomic_dir(out) as staging:
        shard_list, images = _write_images(staging, G, spec, all_classes, plan, common, labelled=count is None,
                                           png=png, split=split, shard_max_count=shard_max_count, seed=seed,
                                           batch_size=batch_size, device=dev, truncation=truncation,
                                           progress=progress)
        manifest = _manifest(all_classes, image_size, split, plan, shard_list, count is not None, images,
                             spec, ckpt_path, ckpt_sha, step, seed, weights_used, balance_info, real_taxonomy,
                             dict(per_class=per_class, balance=balance, count=count, classes=classes,
                                  batch_size=batch_size, device=str(dev), png=png, split=split,
                                  truncation=truncation, shard_max_count=shard_max_count))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if shard_list:  # the same picture tools/shard.py leaves beside real shards
            from hpcgan.viz import shard_contact_sheet
            shard_contact_sheet(staging, split, staging / "contact_sheet.png",
                                title=f"SYNTHETIC ({spec.name}, step {step}): the first images of every class")
    logger.info("wrote %d synthetic images to %s", total, out)
    return manifest


def _write_images(staging: Path, G, spec: GANSpec, classes: list[str], plan: dict[str, int], common: dict, *,
                  labelled: bool, png: bool, split: str, shard_max_count: int, seed: int, batch_size: int,
                  device: torch.device, truncation: float | None, progress: bool) -> tuple[list[dict], list[dict]]:
    """Generate every planned image into shards (labelled) and/or the PNG folder; (shard dicts, image list)."""
    images: list[dict] = []
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(ShardWriter(staging, split, shard_max_count)) if labelled else None
        bar = stack.enter_context(tqdm(total=sum(plan.values()), unit="img", desc="generate", disable=not progress))
        for cls, n in plan.items():
            label = classes.index(cls) if labelled else -1
            pngs = generate_class(G, spec, label if labelled else None, n, class_seed(seed, cls),
                                  batch_size, device, truncation)
            for index, data in enumerate(pngs):
                key = sample_key(cls, index)
                rel = f"png/{slug(cls)}/{key}.png" if png else None
                if rel is not None:
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    (staging / rel).write_bytes(data)
                if writer is not None:
                    meta = dict(common, **{"class": cls, "fine": cls, "label": label, "index": index, "key": key,
                                           "path": rel or key, "sha256": hashlib.sha256(data).hexdigest()})
                    writer.write(key, data, "png", label, meta)
                images.append({"class": cls, "label": label, "index": index, "key": key, "png": rel})
                bar.update(1)
    return (writer.shards if writer is not None else []), images


def _manifest(classes, image_size, split, plan, shard_list, unlabelled, images, spec, ckpt_path, ckpt_sha,
              step, seed, weights_used, balance_info, real_taxonomy, settings) -> dict:
    """The shard-set manifest (hpcgan.data.shards contract) plus provenance. Nothing in it depends on
    where `out` is, so the same inputs give the same bytes."""
    if unlabelled:
        counts, by_source, shards = {}, {}, {}
    else:
        per = {c: plan.get(c, 0) for c in classes}
        counts, by_source, shards = {split: per}, {split: {"synthetic": per}}, {split: shard_list}
    return {
        "format": 1,
        "synthetic": True,
        "classes": classes,
        "image_size": image_size,
        "counts": counts,
        "counts_by_source": by_source,
        "shards": shards,
        "unlabelled": plan.get(UNLABELLED, 0) if unlabelled else 0,
        "settings": settings,
        "taxonomy": _taxonomy(classes, real_taxonomy),
        "model": spec.name,
        "weights": weights_used,
        "seed": seed,
        "checkpoint": {"path": str(ckpt_path), "sha256": ckpt_sha, "step": step},
        "balance": balance_info,
        "images": images,
    }


def _taxonomy(classes: list[str], real_taxonomy: dict | None) -> dict:
    """The taxonomy the labels follow: the real shards' when balancing, else the repo's if its classes
    are the checkpoint's, else just the class list."""
    if real_taxonomy:
        return real_taxonomy
    tax = Taxonomy.load()
    return tax.spec if tax.classes == classes else {"classes": classes}
