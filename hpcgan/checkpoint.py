"""Training checkpoints: whole or absent, loadable with torch.load(weights_only=True).

A checkpoint is a plain dict (see the shared brief, "Checkpoint"):
  {"step", "epoch", "batch_in_epoch", "config", "G", "D", "G_ema", "opt_G", "opt_D", "scaler", "rng", "meta"}
saved as `run_dir/checkpoints/step-NNNNNNNN.pt`. Saving is atomic (temp file + fsync + rename), so a
kill mid-save leaves the previous checkpoints untouched; `load_latest` still guards against a newest
file that is corrupt or truncated (disk full, copied half-way) by falling back to the one before it.

Other runs (a classifier: hpcgan.classify) use the same files and guarantees with their own keys: they pass
`required=` to save_checkpoint and load_latest (a GAN reader then skips such a checkpoint as lacking keys).
"""
from __future__ import annotations

import io
import logging
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch

from hpcgan.fsutil import atomic_write_bytes

logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
REQUIRED_KEYS = ("step", "epoch", "batch_in_epoch", "config", "G", "D", "G_ema", "opt_G", "opt_D",
                 "scaler", "rng", "meta")
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:08d}.pt"


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files of a run, oldest first (by step number, not mtime)."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: str | Path, state: dict, keep_last: int = 3, *,
                    required: tuple[str, ...] = REQUIRED_KEYS) -> Path:
    """Write `state` atomically as checkpoints/step-NNNNNNNN.pt and prune all but the newest `keep_last`
    up to and including it (newer, unreadable files are left alone).

    Call it on rank 0 only. `keep_last <= 0` keeps everything. `required`: the keys `state` must have (the
    GAN checkpoint's by default; "step" is always needed, it names the file).
    """
    missing = [k for k in dict.fromkeys(("step", *required)) if k not in state]
    if missing:
        raise ValueError(f"checkpoint state is missing keys {missing}")
    path = checkpoint_path(run_dir, int(state["step"]))
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())
    if keep_last > 0:
        # Prune only checkpoints older than this one: a newer file can only be one load_latest skipped as
        # unreadable (kept for inspection), and counting it would delete the checkpoint just written.
        older = [p for p in list_checkpoints(run_dir) if _step_of(p) < int(state["step"])]
        for old in older[:max(0, len(older) - (keep_last - 1))]:
            old.unlink(missing_ok=True)
    logger.info("saved checkpoint %s", path)
    return path


def _warn_loudly(msg: str) -> None:
    logger.warning(msg)
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def load_latest(run_dir: str | Path, map_location="cpu", *,
                required: tuple[str, ...] = REQUIRED_KEYS) -> tuple[dict | None, Path | None]:
    """(state, path) of the newest checkpoint that loads and has every key of `required` (default: the GAN
    checkpoint's), else (None, None).

    Loads with weights_only=True: a checkpoint is data, never code. Unreadable newer files are skipped
    with a loud warning (they are kept on disk for inspection, not deleted).
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated zip, bad pickle, zero bytes, ...
            first = (str(e).strip().splitlines() or [""])[0][:300]
            _warn_loudly(f"checkpoint {path} is unreadable ({type(e).__name__}: {first}); "
                         f"falling back to an older one")
            continue
        missing = [k for k in required if not isinstance(state, dict) or k not in state]
        if missing:
            _warn_loudly(f"checkpoint {path} lacks keys {missing}; falling back to an older one")
            continue
        return state, path
    return None, None


def resume_point(run_dir: str | Path, env, *, map_location="cpu", required: tuple[str, ...] = REQUIRED_KEYS,
                 none_loads: str = "loads (see the warnings)") -> tuple[dict | None, Path | None]:
    """load_latest, agreed by every rank of `env` (hpcgan.dist.DistEnv): (state, path), or (None, None) for a
    fresh run. RuntimeError when checkpoints exist but none `none_loads` (the caller's words: what it
    needs and the fix), rather than starting over on top of them, or when the ranks found different newest
    checkpoints."""
    from hpcgan import dist
    ckpt, path = load_latest(run_dir, map_location=map_location, required=required)
    folder = Path(run_dir) / "checkpoints"
    if ckpt is None and list_checkpoints(run_dir):
        raise RuntimeError(f"{folder} has checkpoints but none {none_loads}")
    step = float(ckpt["step"]) if ckpt else 0.0
    both = dist.all_reduce_max(env, torch.tensor([step, -step], device=env.device)).tolist()
    if both[0] != -both[1]:
        raise RuntimeError(f"ranks found different newest checkpoints in {folder} (a shared filesystem "
                           "lagging?); restart the job")
    return ckpt, path

# ---- RNG state as tensors/ints, so that weights_only=True can load it -------------------------------

def capture_rng() -> dict:
    """The process-global RNG states (torch CPU, CUDA if present, numpy, python `random`)."""
    np_state = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    py_state = random.getstate()      # (version, tuple of 625 ints, gauss_next)
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": None if py_state[2] is None else float(py_state[2])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng(rng: dict) -> None:
    """Restore what capture_rng saved; its tensors may sit on a GPU (load_latest(map_location="cuda"))."""
    torch.set_rng_state(rng["torch"].cpu())
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), int(n["pos"]),
                         int(n["has_gauss"]), float(n["cached_gaussian"])))
    p = rng["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"].cpu())
