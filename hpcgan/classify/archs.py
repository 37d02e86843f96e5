"""Classifier architectures by name: the paper's five from `timm`, and `small_cnn` for CPUs.

| arch           | network                                           | input                          |
|----------------|---------------------------------------------------|--------------------------------|
| small_cnn      | hpcgan.metrics.cell's CellNet (the `cell` feature  | the shard size                 |
|                | extractor's network, ~0.4 M parameters)            |                                |
| small_resnet   | SmallResNet: a CIFAR-style ResNet, 3x3 stem, four  | the shard size (a stride-2 stem|
|                | residual stages of widths 16-128 (~0.3 M)          | conv per doubling above 32 px) |
| inception_v3   | timm inception_v3 (~22 M)                          | >= 75 px: 32/64 px resized up  |
| resnet50       | timm resnet50 (~24 M)                              | the shard size (>= 32)         |
| vgg16, vgg19   | timm vgg16_bn, vgg19_bn (~134/140 M)               | the shard size (>= 32)         |
| xception       | timm legacy_xception (Chollet's Xception, ~21 M)   | the shard size (>= 32)         |
| timm:NAME      | any other timm model, as timm builds it            | the shard size (>= 32)         |

VGG without batch norm (timm's plain vgg16/vgg19, reachable as `timm:vgg16`) was trained by its authors
stage-wise from shallower nets; from scratch in one go with AdamW it tends to stall at chance, so the paper's
names map to the `_bn` variants. Inputs smaller than an architecture's minimum are resized (bilinear,
antialiased) inside the model (`Resized`), so training and scoring see the same thing.

Weights: from scratch (seeded by the caller). `timm.create_model(..., pretrained=True)` is never called while
training: it would download. ImageNet weights come only from a file (`load_pretrained`), whose sha256 is
recorded; its classification head (1000 classes) is replaced by a fresh one. The file is given by path
(`pretrained_file=`) or staged by name (hpcgan.classify.pretrained: `tools/stage_weights.py timm:resnet50`
on a machine with internet, then `pretrained=true`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpcgan.data.shards import sha256_file

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class Arch:
    name: str
    timm: str | None      # the timm model name; None: small_cnn
    min_size: int         # the smallest input it takes; smaller images are resized up to this
    pretrained: str | None = None   # timm's pretrained tag of its ImageNet weights (tools/stage_weights.py timm:NAME)


# The one place the paper's names map to timm models and ImageNet weights (torchvision's, as Keras's
# applications the paper used are; Xception: the TensorFlow port, timm's only one).
ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("small_cnn", None, 8),
    Arch("small_resnet", None, 8),
    Arch("inception_v3", "inception_v3", 75, "tv_in1k"),
    Arch("resnet50", "resnet50", 32, "tv_in1k"),
    Arch("vgg16", "vgg16_bn", 32, "tv_in1k"),
    Arch("vgg19", "vgg19_bn", 32, "tv_in1k"),
    Arch("xception", "legacy_xception", 32, "tf_in1k"),
)}


def get_arch(name: str) -> Arch:
    """The architecture called `name` (ARCHS, or `timm:NAME` for any timm model); ValueError otherwise."""
    if name in ARCHS:
        return ARCHS[name]
    if name.startswith(TIMM_PREFIX):
        import timm
        model = name[len(TIMM_PREFIX):]
        if not timm.is_model(model):
            raise ValueError(f"arch={name}: timm has no model {model!r} (timm.list_models() lists them)")
        return Arch(name, model, 32)
    raise ValueError(f"arch={name!r}: choose one of {', '.join(ARCHS)} or timm:NAME")


def input_size(arch: Arch, image_size: int) -> int:
    return max(int(image_size), arch.min_size)


class Resized(nn.Module):
    """`net` fed images resized (bilinear, antialiased) to `size` when they come in another size."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net, self.size = net, int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.net(x)


def build_classifier(name: str, num_classes: int, image_size: int) -> tuple[nn.Module, dict]:
    """(model taking [B, 3, image_size, image_size] in [-1, 1] -> logits [B, num_classes], description).
    Randomly initialised from the global torch RNG (seed it first)."""
    arch = get_arch(name)
    size = input_size(arch, image_size)
    if arch.name == "small_resnet":
        net = SmallResNet(num_classes, stem_downsamples=max(0, round(math.log2(size / 32))))
    elif arch.timm is None:
        from hpcgan.metrics.cell import build_net, default_arch
        net = build_net(default_arch(size), num_classes)
    else:
        import timm
        net = timm.create_model(arch.timm, pretrained=False, num_classes=num_classes)
    info = {"arch": arch.name, "timm": arch.timm, "input_size": size,
            "parameters": sum(p.numel() for p in net.parameters())}
    return (Resized(net, size) if size != image_size else net), info


class _Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a 1x1 strided conv when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class SmallResNet(nn.Module):
    """The study's default classifier: a 3x3 stem and four residual stages (the first at full resolution, each
    next one halving it), global average pooling, a linear head. Strong enough at 32 px to show the gaps between
    regimes that small_cnn compresses (README, issue 19), and minutes on CPU."""

    def __init__(self, num_classes: int, widths=(16, 32, 64, 128), stem_downsamples: int = 0):
        super().__init__()
        stem: list[nn.Module] = []
        cin = 3
        for k in range(stem_downsamples + 1):
            stem += [nn.Conv2d(cin, widths[0], 3, 2 if k < stem_downsamples else 1, 1, bias=False),
                     nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
            cin = widths[0]
        self.stem = nn.Sequential(*stem)
        self.stages = nn.Sequential(*(_Block(widths[max(i - 1, 0)], w, 1 if i == 0 else 2)
                                      for i, w in enumerate(widths)))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def _state_dict_of(blob) -> dict:
    for key in ("state_dict", "model", "state"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            return blob[key]
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob
    raise ValueError("it holds no state dict (a mapping of parameter names to tensors)")


def _read_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return _state_dict_of(torch.load(path, map_location="cpu", weights_only=True))


def _head_prefixes(net: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the classification head (replaced, never loaded)."""
    if hasattr(net, "head") and isinstance(getattr(net, "head"), nn.Linear):  # small_cnn
        return ("head.",)
    head = getattr(net, "pretrained_cfg", {}).get("classifier")
    heads = head if isinstance(head, (list, tuple)) else [head] if head else []
    return tuple(f"{h}." for h in heads)


def load_pretrained(model: nn.Module, path: str | Path) -> dict:
    """Load ImageNet (or any) weights from a staged file into `model` (from build_classifier), all but its
    classification head. Every other parameter and buffer must be in the file with the same shape: a file of
    another architecture is refused. Returns {"path", "sha256", "loaded", "head_kept_fresh"}."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_file={path} does not exist: stage the ImageNet weights file there "
                                "first (compute nodes cannot download)")
    net = model.net if isinstance(model, Resized) else model
    try:
        weights = _read_weights(path)
    except Exception as e:  # noqa: BLE001 - not a weights file, or one a safe load refuses
        raise ValueError(f"pretrained_file={path} cannot be read as weights ({type(e).__name__}: {e})") from None
    heads = _head_prefixes(net)
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(heads)}
    missing = [k for k in own if k not in weights]
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in weights and weights[k].shape != v.shape]
    if missing or wrong:
        raise ValueError(f"pretrained_file={path} does not fit this architecture: {len(missing)} tensors missing "
                         f"(e.g. {missing[:3]}), {len(wrong)} of another shape (e.g. {wrong[:2]}); stage the weights "
                         "of this very timm model (for timm's plain VGG without batch norm use arch=timm:vgg16)")
    net.load_state_dict({**net.state_dict(), **{k: weights[k] for k in own}})
    return {"path": str(path.resolve()), "sha256": sha256_file(path), "loaded": len(own),
            "head_kept_fresh": list(heads)}
