"""Pretrained weights come only from files staged in one folder: nothing is downloaded while evaluating.

Compute nodes of a cluster usually have no internet. So every pretrained network the evaluation uses is a
file in the *weights folder* (`weights_dir`: the value given, else $HPCGAN_WEIGHTS, else
~/.cache/hpcgan/weights), put there once, on a machine with internet, by

    python tools/stage_weights.py inception lpips_alex weights_dir=/project/hpcgan-weights

and then copied to the cluster (or staged straight onto its shared file system) with
`export HPCGAN_WEIGHTS=/project/hpcgan-weights`. A missing file is a `MissingWeightsError` naming the
path and that command. The project's own `cell` extractor needs no staged file (hpcgan.metrics.cell).

Each file is checked against its expected sha256 when known, else against the hash prefix its
publisher put in the file name (torch.hub's `name-<first 8 hex of sha256>.pth` convention).
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from pathlib import Path

from hpcgan.data.shards import sha256_file
from hpcgan.fsutil import atomic_file

logger = logging.getLogger(__name__)

ENV = "HPCGAN_WEIGHTS"
DEFAULT_DIR = Path("~/.cache/hpcgan/weights")
STAGE_COMMAND = "python tools/stage_weights.py {name} weights_dir={dir}"

# name -> the file, where it comes from, its hash. sha256: the full digest where known (the torchvision files:
# the digests that projects pinning them record, consistent with the prefixes torchvision puts in the names),
# else None, and sha256_prefix (from the file name, torch.hub's convention) is what is checked.
STAGED: dict[str, dict] = {
    "inception": {
        # torch_fidelity/feature_extractor_inceptionv3.py, URL_INCEPTION_V3 (torch-fidelity 0.2.0 - 0.4.0)
        "file": "weights-inception-2015-12-05-6726825d.pth",
        "url": "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth",
        "sha256": None,  # torch-fidelity publishes none; the name carries the prefix (pytorch-fid's file, same name)
        "sha256_prefix": "6726825d",
        "what": "FID Inception-v3 (TensorFlow pt_inception-2015-12-05 graph, converted by torch-fidelity), ~100 MB",
    },
    "lpips_alex": {
        # torchvision/models/alexnet.py, AlexNet_Weights.IMAGENET1K_V1
        "file": "alexnet-owt-7be5be79.pth",
        "url": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "sha256": "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",  # 244,408,911 bytes
        "sha256_prefix": "7be5be79",
        "what": "torchvision AlexNet ImageNet weights: the LPIPS (alex) backbone, 244 MB",
    },
    "lpips_vgg": {
        # torchvision/models/vgg.py, VGG16_Weights.IMAGENET1K_V1
        "file": "vgg16-397923af.pth",
        "url": "https://download.pytorch.org/models/vgg16-397923af.pth",
        "sha256": "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",  # 553,433,881 bytes
        "sha256_prefix": "397923af",
        "what": "torchvision VGG16 ImageNet weights: the LPIPS (vgg) backbone, 553 MB",
    },
}


class MissingWeightsError(FileNotFoundError):
    """A staged weights file is absent; the message says how to stage it."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, Path(path)
        folder = self.path.parent
        self.short = (f"{name} weights not staged; stage them: `{STAGE_COMMAND.format(name=name, dir=folder)}` "
                      f"(or set {ENV})")
        super().__init__(
            f"{name} weights ({STAGED[name]['what']}) not found at {self.path}. Stage them on a machine with "
            f"internet: `{STAGE_COMMAND.format(name=name, dir=folder)}`, then copy {folder} to the cluster and "
            f"set {ENV}={folder} (or pass weights_dir=...)")


def weights_dir(value: str | os.PathLike | None = None) -> Path:
    """The weights folder: `value`, else $HPCGAN_WEIGHTS, else ~/.cache/hpcgan/weights."""
    if value not in (None, ""):
        return Path(value).expanduser()
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else DEFAULT_DIR.expanduser()


_folder = weights_dir  # for functions whose `weights_dir` argument hides the function


def _entry(name: str) -> dict:
    if name not in STAGED:
        raise ValueError(f"unknown weights name {name!r}; known: {', '.join(STAGED)}")
    return STAGED[name]


def staged_path(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Where `name`'s file is (or would be) staged."""
    return _folder(weights_dir) / _entry(name)["file"]


def require(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """The staged file of `name`; MissingWeightsError (saying how to stage it) when it is absent."""
    path = staged_path(name, weights_dir)
    if not path.is_file():
        raise MissingWeightsError(name, path)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    return sha256_file(path)


def hash_problem(name: str, digest: str) -> str | None:
    """None when `digest` is what `name`'s file should hash to (as far as known), else what is wrong."""
    e = _entry(name)
    if e["sha256"] is not None and digest != e["sha256"]:
        return f"sha256 {digest}, expected {e['sha256']}"
    prefix = e.get("sha256_prefix")
    if e["sha256"] is None and prefix and not digest.startswith(prefix):
        return f"sha256 {digest} does not start with {prefix} (the hash in the published file name)"
    return None


def verify(name: str, path: str | os.PathLike) -> str:
    """sha256 of `path`; ValueError when it is not `name`'s file."""
    digest = file_sha256(path)
    problem = hash_problem(name, digest)
    if problem:
        raise ValueError(f"{path} is not the {name} weights file ({problem}); stage it again: "
                         f"`{STAGE_COMMAND.format(name=name, dir=Path(path).parent)}`")
    return digest


def resolve(name: str, weights_dir: str | os.PathLike | None = None,
            path: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(file, sha256) of `name`'s weights: the staged file, which must pass its hash check, or `path` as given
    (for a file kept elsewhere; a warning when it is not the published file, whose hash is then recorded)."""
    if path is None:
        staged = require(name, weights_dir)
        return staged, verify(name, staged)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name} weights file {path} does not exist")
    digest = file_sha256(path)
    problem = hash_problem(name, digest)
    if problem:
        logger.warning("%s is not the published %s weights file (%s)", path, name, problem)
    return path, digest


def stage(name: str, weights_dir: str | os.PathLike | None = None, *, source: str | os.PathLike | None = None,
          progress: bool = True) -> Path:
    """Put `name`'s file into the weights folder: downloaded from its URL, or copied from `source` (a file
    obtained otherwise, e.g. by scp). Written under a temporary name, hash-checked, then renamed into place;
    a file that fails the check is deleted and ValueError raised. Returns the staged path."""
    e = _entry(name)
    dest = staged_path(name, weights_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        source = Path(source).expanduser()
        if not source.is_file():
            raise FileNotFoundError(f"from={source}: no such file")
        with open(source, "rb") as f:
            _install(name, f, source.stat().st_size, dest, str(source), progress)
    else:
        logger.info("downloading %s from %s", name, e["url"])
        with urllib.request.urlopen(e["url"], timeout=60) as r:  # noqa: S310 (fixed https URLs)
            _install(name, r, int(r.headers.get("Content-Length") or 0) or None, dest, e["url"], progress)
    return dest


def _install(name: str, stream, total: int | None, dest: Path, origin: str, progress: bool) -> None:
    from tqdm import tqdm
    h = hashlib.sha256()
    with atomic_file(dest) as out, tqdm(total=total, unit="B", unit_scale=True, desc=name,
                                        disable=not progress) as bar:
        for block in iter(lambda: stream.read(1 << 20), b""):
            h.update(block)
            out.write(block)
            bar.update(len(block))
        problem = hash_problem(name, h.hexdigest())
        if problem:  # raised inside the block: the temp file goes, nothing is staged
            raise ValueError(f"{origin} is not the {name} weights file ({problem}); nothing was staged")


