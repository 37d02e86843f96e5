"""ImageNet weights of the classifier architectures, staged by name on a machine with internet.

    python tools/stage_weights.py timm:resnet50 timm:vgg16 weights_dir=/project/hpcgan-weights

builds each architecture's timm model with timm's own pretrained download (`timm.create_model(
"<model>.<tag>", pretrained=True)`, the model and tag from hpcgan.classify.archs.ARCHS: no URL or hash is
written here), and saves its state dict in the weights folder (hpcgan.metrics.weights.weights_dir) as

    timm-<arch>.pth    the state dict (torch.save)
    timm-<arch>.json   {"arch", "timm_model", "pretrained_tag", "timm_version", "sha256", "bytes"}

`tools/classify.py pretrained=true` (and a study's `classify.overrides: [pretrained=true]`) then finds the file
by the arch name and checks it against its sha256; `pretrained_file=PATH` wins when both are given.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from hpcgan.classify.archs import ARCHS, get_arch
from hpcgan.data.shards import sha256_file
from hpcgan.fsutil import atomic_write_bytes
from hpcgan.jsonfile import write_json
from hpcgan.metrics.weights import ENV, weights_dir

PREFIX = "timm:"
STAGE_COMMAND = "python tools/stage_weights.py timm:{arch} weights_dir={dir}"


def stageable() -> list[str]:
    """The arch names whose ImageNet weights can be staged by name."""
    return [a.name for a in ARCHS.values() if a.pretrained]


def _arch(name: str):
    arch = get_arch(name)
    if not arch.pretrained:
        raise ValueError(f"arch={name} has no ImageNet weights to stage by name (those that do: "
                         f"{', '.join(stageable())}); for another timm model stage a file yourself and pass "
                         "pretrained_file=PATH")
    return arch


def staged_file(arch: str, folder: str | os.PathLike | None = None) -> Path:
    return weights_dir(folder) / f"timm-{_arch(arch).name}.pth"


def save_staged(arch: str, state_dict: dict, folder: str | os.PathLike | None = None,
                timm_version: str | None = None) -> Path:
    """Write `state_dict` as arch's staged file (atomically) with its record beside it; returns the file."""
    a = _arch(arch)
    if timm_version is None:
        import timm
        timm_version = timm.__version__
    path = staged_file(arch, folder)
    save_weights(path, state_dict, {"arch": a.name, "timm_model": a.timm, "pretrained_tag": a.pretrained,
                                    "timm_version": timm_version})
    return path


def save_weights(path: str | os.PathLike, state_dict: dict, record: dict) -> dict:
    """Write `state_dict` (torch.save, on the CPU) atomically to `path`, and `record` plus the file's sha256 and
    bytes to path's .json; returns that record. A file `pretrained_file=` reads, and the sha256 it records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buf)
    atomic_write_bytes(path, buf.getvalue())
    record = {**record, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    write_json(path.with_suffix(".json"), record)
    return record


class DownloadError(RuntimeError):
    """timm could not fetch the weights (no internet here, or the hub refused)."""


def stage(arch: str, folder: str | os.PathLike | None = None) -> Path:
    """Download arch's ImageNet weights with timm (needs internet) and stage them."""
    import timm
    a = _arch(arch)
    name = f"{a.timm}.{a.pretrained}"
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # noqa: BLE001 - hub, HTTP and cache errors alike: none is the user's input
        raise DownloadError(f"timm could not download {name} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                            "run this on a machine with internet, then copy the weights folder") from e
    return save_staged(arch, model.state_dict(), folder, timm.__version__)


def find_staged(arch: str, folder: str | os.PathLike | None = None) -> Path:
    """arch's staged file, checked against its record; FileNotFoundError naming the staging command when it is
    absent, ValueError when it is not the file staged."""
    path = staged_file(arch, folder)
    record = path.with_suffix(".json")
    if not path.is_file() or not record.is_file():
        raise FileNotFoundError(
            f"pretrained=true: no staged ImageNet weights of {arch} at {path}. On a machine with internet run "
            f"`{STAGE_COMMAND.format(arch=arch, dir=path.parent)}`, copy the folder to the cluster and set "
            f"{ENV} (or weights_dir=); or pass pretrained_file=PATH")
    want = json.loads(record.read_text()).get("sha256")
    got = sha256_file(path)
    if want != got:
        raise ValueError(f"{path} is not the file staged (sha256 {got[:12]}..., its record says "
                         f"{str(want)[:12]}...); stage it again")
    return path
