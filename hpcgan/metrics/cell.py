"""The `cell` feature extractor: a small CNN trained on the real shards, the evaluation's offline domain network.

ImageNet's Inception-v3 has never seen a blood smear, and a cluster node often cannot download it. So the
default features for FID/KID/precision-recall, and the class probabilities for a domain Inception Score
and class accuracy, come from a classifier trained on the train split of the real shard set:

    conv-BN-ReLU stages (widths 32, 64, 128, 256; one 3x3 convolution each, 2x2 max-pool between stages;
    images above 32 px first pass stride-2 stem convolutions down to ~32 px), global average pool ->
    256 features -> linear head -> one logit per class.

Training: AdamW with cosine decay, cross-entropy, random flips and 90-degree rotations (a cell on a slide
has no orientation); model selection on val-split accuracy (the best epoch is kept, the first one on a
tie); deterministic on the CPU for a seed. The train and val splits are decoded once into memory (uint8).
On the demo's shard set (~420 images of 32 px) the defaults take ~7 s on 2 CPU cores for ~0.9 val accuracy
(chance: 0.26, the largest class). The file (torch.save, written atomically) holds
{"format", "arch", "state_dict", "classes", "image_size", "manifest_sha256", "val_accuracy",
"train_accuracy", ...}; `ensure_cell_extractor` caches one per shard set, keyed by the sha256 of its
manifest.json (`cell-<sha[:16]>-<size>.pt`): a rebuilt shard set gets a new extractor.

Inputs follow the Extractor convention (uint8, any size, resized antialiased to the training size) and
are scaled to [-1, 1] exactly as hpcgan.data.loader feeds training ((x - 127.5) / 127.5).
"""
from __future__ import annotations

import copy
import io
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcgan import __version__
from hpcgan.data.shards import MANIFEST, read_manifest, sha256_file
from hpcgan.fsutil import atomic_write_bytes
from hpcgan.metrics.extractor import Extractor, resize_u8
from hpcgan.settings import MISSING, check_choice, check_range

logger = logging.getLogger(__name__)

FORMAT = 1
ARCH_NAME = "cellcnn"
ARCH_KEYS = {"name", "widths", "convs_per_stage", "stem_downsamples"}
WIDTHS = (32, 64, 128, 256)


@dataclass
class CellTrainSettings:
    """How a cell extractor is trained (the defaults: the demo's ~300 images of 32 px train in seconds on 2
    cores and reach well above chance; raise epochs for the real data sets)."""
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    backend: str = "auto"         # data loader backend (hpcgan.data.loader): auto | dali | webdataset
    num_threads: int | None = None  # decode threads; null = the loader's default

    def __post_init__(self):
        check_range("epochs", self.epochs, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("lr", self.lr, 0)
        check_range("weight_decay", self.weight_decay, 0)
        check_choice("backend", self.backend, ("auto", "dali", "webdataset"))
        if self.num_threads is not None:
            check_range("num_threads", self.num_threads, 1)


_D = CellTrainSettings  # defaults live in the dataclass only


# ---- the network ---------------------------------------------------------------------------------------

def default_arch(image_size: int) -> dict:
    return {"name": ARCH_NAME, "widths": list(WIDTHS), "convs_per_stage": 1,
            "stem_downsamples": max(0, round(math.log2(max(image_size, 1) / 32)))}


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CellNet(nn.Module):
    def __init__(self, num_classes: int, widths=WIDTHS, convs_per_stage: int = 1, stem_downsamples: int = 0):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for _ in range(stem_downsamples):
            layers += _conv(cin, widths[0], stride=2)
            cin = widths[0]
        for s, w in enumerate(widths):
            if s > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                layers += _conv(cin, w)
                cin = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        self.dim = cin

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_net(arch: dict, num_classes: int) -> CellNet:
    if arch.get("name") != ARCH_NAME or set(arch) != ARCH_KEYS:
        raise ValueError(f"unknown cell extractor architecture {arch}; this hpcgan reads {ARCH_NAME} with keys "
                         f"{sorted(ARCH_KEYS)}")
    return CellNet(num_classes, tuple(arch["widths"]), int(arch["convs_per_stage"]), int(arch["stem_downsamples"]))


def to_input(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> the network's input: resized to `size`, (x - 127.5) / 127.5 like the loader."""
    return resize_u8(images_u8, size).sub_(127.5).div_(127.5)


class CellExtractor(Extractor):
    """The trained CellNet as an Extractor: features [N, 256] (pooled), logits [N, classes]."""

    def __init__(self, net: CellNet, *, sha256: str, classes: list[str], image_size: int, path=None,
                 val_accuracy: float | None = None, manifest_sha256: str | None = None, features_list=None):
        super().__init__("cell", sha256=sha256, dim=net.dim, num_classes=len(classes), input_size=image_size,
                         classes=list(classes), path=path, features_list=features_list)
        self.net = net.eval()
        self.val_accuracy, self.manifest_sha256 = val_accuracy, manifest_sha256

    def _run(self, images_u8):
        f = self.net.features(to_input(images_u8, self.input_size))
        return f, self.net.head(f)


def load_cell_extractor(path: str | os.PathLike, device="cpu") -> CellExtractor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cell extractor {path} does not exist; train one with "
                                f"`python tools/train_features.py shards=DIR out={path}`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding objects a safe load refuses
        raise ValueError(f"{path} is not a cell extractor file ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(blob.get("arch"), dict):
        fmt = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path}: cell extractor format {fmt!r}, this hpcgan reads format {FORMAT}; retrain it with "
                         "tools/train_features.py")
    try:
        net = build_net(blob["arch"], len(blob["classes"]))
        net.load_state_dict(blob["state_dict"])
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path}: cannot load this cell extractor ({str(e).splitlines()[0]}); retrain it with "
                         "tools/train_features.py") from None
    return CellExtractor(net, sha256=sha256_file(path), classes=blob["classes"], image_size=int(blob["image_size"]),
                         path=path, val_accuracy=blob.get("val_accuracy"),
                         manifest_sha256=blob.get("manifest_sha256")).to(device).eval()


# ---- training ------------------------------------------------------------------------------------------

def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image of the batch under one of the 8 symmetries of the square (flips x 90-degree rotations)."""
    n = x.shape[0]
    k = torch.randint(0, 4, (n,), generator=gen)
    flip = torch.randint(0, 2, (n,), generator=gen).bool()
    out = x.clone()
    out[flip.to(x.device)] = out[flip.to(x.device)].flip(-1)
    for r in (1, 2, 3):
        sel = (k == r).to(x.device)
        if sel.any():
            out[sel] = torch.rot90(out[sel], r, dims=(-2, -1))
    return out


def load_split(shards, split: str, s: CellTrainSettings, dev: torch.device,
               index=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split (or its samples `index`, e.g. a scarce cut), decoded once through the project's loader:
    (uint8 [N, 3, S, S], int64 labels [N]) on `dev`. (A cell extractor trains many epochs over a few thousand to
    tens of thousands of images: decoding them once keeps an epoch to pure tensor work; 40k images of 128 px
    are 2 GB.)"""
    from hpcgan.data.loader import load_index, make_loader
    n = len(index if index is not None else load_index(shards, split))
    loader = make_loader(shards, split, min(256, n), shuffle=False, backend=s.backend, device=dev.type,
                         num_threads=s.num_threads, index=index)
    images, labels = [], []
    for x, y in loader:  # x = (u8 - 127.5) / 127.5, inverted exactly by the rounding
        images.append(x.to(dev).mul(127.5).add_(127.5).round_().to(torch.uint8))
        labels.append(y.to(dev))
    return torch.cat(images)[:n], torch.cat(labels)[:n]  # the loader pads the last batch: drop the repeats


@torch.no_grad()
def accuracy(net: CellNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Share of `images` (uint8) that `net` classifies as `labels`."""
    net.eval()
    size = images.shape[-1]
    right = sum(int((net(to_input(images[i:i + batch_size], size)).argmax(1) == labels[i:i + batch_size]).sum())
                for i in range(0, len(images), batch_size))
    return right / len(images)


def fit(net: CellNet, train_x: torch.Tensor, train_y: torch.Tensor, s: CellTrainSettings, *,
        class_weight: torch.Tensor | None = None, after_epoch=None) -> None:
    """Train `net` on uint8 images `train_x` (labels `train_y`) for s.epochs: AdamW, cosine decay per epoch,
    full batches of s.batch_size (capped at the set's size) in an order and under symmetries drawn from a
    generator seeded by s.seed; cross-entropy, weighted per class by `class_weight` when given.
    after_epoch(epoch, last loss) runs after each epoch (model selection, progress)."""
    size, dev = train_x.shape[-1], train_x.device
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs)
    gen = torch.Generator().manual_seed(s.seed)
    bs = min(s.batch_size, len(train_x))
    weight = None if class_weight is None else class_weight.to(dev)
    for epoch in range(s.epochs):
        net.train()
        order = torch.randperm(len(train_x), generator=gen).to(dev)
        for i in range(0, len(order) - bs + 1, bs):  # full batches only (BatchNorm, equal steps)
            idx = order[i:i + bs]
            x = augment(to_input(train_x[idx], size), gen)
            loss = F.cross_entropy(net(x), train_y[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if after_epoch is not None:
            after_epoch(epoch, float(loss.item()))


def _check_splits(shards) -> dict:
    man = read_manifest(shards)
    totals = man.get("totals", {})
    for split in ("train", "val"):
        if not totals.get(split):
            raise ValueError(f"{shards}: the {split} split is empty; a cell extractor trains on train and selects "
                             "on val (rebuild the shard set with more images)")
    return man


def train_cell_extractor(shards: str | os.PathLike, out: str | os.PathLike, *, epochs: int = _D.epochs,
                         batch_size: int = _D.batch_size, lr: float = _D.lr, weight_decay: float = _D.weight_decay,
                         seed: int = _D.seed, device: str = _D.device, backend: str = _D.backend,
                         num_threads: int | None = _D.num_threads, progress: bool = True) -> dict:
    """Train a CellNet on `shards`' train split, keep the epoch with the best val accuracy, save it to `out`
    (atomically). Returns info: path, sha256, val_accuracy, train_accuracy, best_epoch, seconds, ..."""
    from hpcgan import dist
    from hpcgan.progress import Progress
    s = CellTrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                          device=str(device), backend=backend, num_threads=num_threads)
    shards, out = Path(shards), Path(out)
    man = _check_splits(shards)
    classes, size = list(man["classes"]), int(man["image_size"])
    manifest_sha256 = sha256_file(shards / MANIFEST)
    dev = dist.resolve_device(s.device)
    t0 = time.time()
    arch = default_arch(size)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(s.seed)
        net = build_net(arch, len(classes)).to(dev)
    train_x, train_y = load_split(shards, "train", s, dev)
    val_x, val_y = load_split(shards, "val", s, dev)
    best = (-1.0, -1, None)  # (val accuracy, epoch, state)
    bar = Progress(s.epochs, "cell extractor", "epoch", bar=progress)

    def select(epoch: int, loss: float) -> None:
        nonlocal best
        val = accuracy(net, val_x, val_y)
        if val > best[0]:
            best = (val, epoch, copy.deepcopy(net.state_dict()))
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{val:.3f}", best=f"{best[0]:.3f}")
        bar.update()

    fit(net, train_x, train_y, s, after_epoch=select)
    bar.close()
    net.load_state_dict(best[2])
    train_acc = accuracy(net, train_x, train_y)
    blob = {
        "format": FORMAT, "arch": arch,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "classes": classes, "image_size": size,
        "manifest_sha256": manifest_sha256,
        "val_accuracy": best[0], "train_accuracy": train_acc, "best_epoch": best[1],
        "val_chance": _chance(man, "val"),
        "settings": asdict(s), "shards": str(shards.resolve()), "device": str(dev),
        "torch": str(torch.__version__), "hpcgan": __version__,
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(out, buf.getvalue())
    info = {k: blob[k] for k in ("classes", "image_size", "manifest_sha256", "val_accuracy", "train_accuracy",
                                 "best_epoch", "val_chance")}
    info.update(path=str(out), sha256=sha256_file(out), seconds=round(time.time() - t0, 1))
    logger.info("cell extractor -> %s: val accuracy %.3f (majority class %.3f), train %.3f, best epoch %d/%d",
                out, best[0], info["val_chance"], train_acc, best[1] + 1, s.epochs)
    return info


def _chance(man: dict, split: str) -> float:
    """Accuracy of always naming the split's largest class."""
    counts = man.get("counts", {}).get(split, {})
    total = sum(counts.values())
    return max(counts.values()) / total if total else float("nan")


# ---- the cache -----------------------------------------------------------------------------------------

def cell_extractor_path(shards: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Where the cached extractor of this shard set lives: keyed by its manifest's sha256 and image size."""
    man = read_manifest(shards)
    digest = sha256_file(Path(shards) / MANIFEST)
    return Path(cache_dir) / f"cell-{digest[:16]}-{int(man['image_size'])}.pt"


def ensure_cell_extractor(shards: str | os.PathLike, cache_dir: str | os.PathLike, **train_kw) -> tuple[Path, bool]:
    """(path of this shard set's cell extractor, trained_now): trains one (train_cell_extractor(**train_kw))
    only when the cache has none. A cached file is reused whatever train_kw say (its settings are in it)."""
    path = cell_extractor_path(shards, cache_dir)
    if path.is_file():
        return path, False
    logger.info("training a cell feature extractor for %s (no cached one at %s)", shards, path)
    train_cell_extractor(shards, path, **train_kw)
    return path, True


@dataclass
class TrainFeaturesSettings(CellTrainSettings):
    """Everything tools/train_features.py takes (configs/train_features.yaml): CellTrainSettings and these."""
    shards: str = MISSING         # the real shard set (its train and val splits)
    out: str = MISSING            # the extractor file to write (atomically)
    progress: bool = True
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("log_level", self.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"))

    def train_settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(CellTrainSettings)}
