"""LPIPS (Zhang et al. 2018) from staged weights, and the paper's LPIPS diversity within a class.

    distance = load_lpips("alex", weights_dir=DIR)      # callable(a_u8, b_u8) -> [N] distances
    lpips_diversity(images_u8, labels, distance, classes)

The `lpips` pip package (0.1.x) provides the network and its linear calibration layers (they ship inside
the package: lpips/weights/v0.1/{alex,vgg}.pth). Its backbone would come from torchvision's download; here
it is built untrained (`pnet_rand=True`, no download) and loaded from the staged torchvision file
(`python tools/stage_weights.py lpips_alex`; hpcgan.metrics.weights). Inputs are uint8 [N, 3, H, W],
scaled to [-1, 1] as LPIPS expects. Images smaller than 64 px are first upsampled to 64 px (bilinear;
antialiasing only acts when shrinking): AlexNet's stride-4 11x11 first layer and its pools leave a 32 px
image a 1x1 map by the third layer, so LPIPS of tiny images would compare hardly more than colours.
Both images of a pair are resized alike, so the distance stays symmetric and d(x, x) = 0.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from hpcgan import dist
from hpcgan.metrics import weights
from hpcgan.metrics.extractor import check_images, resize_u8

logger = logging.getLogger(__name__)

NETS = {"alex": "lpips_alex", "vgg": "lpips_vgg"}
MIN_SIZE = 64


def _backbone_state(lp, state: dict, source) -> dict:
    """torchvision's `features.<i>.<param>` keys -> lpips' `sliceK.<i>.<param>` keys of `lp.net`."""
    out = {}
    for key in lp.net.state_dict():
        _, index, param = key.split(".")
        src = f"features.{index}.{param}"
        if src not in state:
            raise ValueError(f"{source}: no {src} in this file; is it the torchvision backbone LPIPS needs?")
        out[key] = state[src]
    return out


def load_lpips_module(net: str = "alex", weights_dir=None, *, path=None):
    """The lpips.LPIPS module (eval, on the CPU) with its backbone from the staged file (hash-checked) or from
    the torchvision weights file `path`."""
    if net not in NETS:
        raise ValueError(f"LPIPS net {net!r}: choose one of {', '.join(NETS)}")
    path, _ = weights.resolve(NETS[net], weights_dir, path)
    import lpips
    with warnings.catch_warnings():  # lpips 0.1.4 calls torchvision's deprecated pretrained=False
        warnings.simplefilter("ignore", UserWarning)
        lp = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)  # linear layers: the package's
    state = torch.load(path, map_location="cpu", weights_only=True)
    lp.net.load_state_dict(_backbone_state(lp, state, path))
    return lp.eval().requires_grad_(False)


def to_lpips_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], upsampled to MIN_SIZE px when smaller."""
    size = max(MIN_SIZE, images_u8.shape[-1], images_u8.shape[-2])
    return resize_u8(images_u8, size).div_(127.5).sub_(1.0)


def load_lpips(net: str = "alex", weights_dir=None, device="cpu", *, path=None) -> Callable:
    """callable(a_u8, b_u8) -> float32 CPU tensor [N]: LPIPS between a[i] and b[i]. Missing backbone file ->
    MissingWeightsError (with the staging command)."""
    dev = dist.resolve_device(str(device))
    lp = load_lpips_module(net, weights_dir, path=path).to(dev)

    @torch.no_grad()
    def distance(a_u8: torch.Tensor, b_u8: torch.Tensor) -> torch.Tensor:
        check_images(a_u8)
        check_images(b_u8)
        if a_u8.shape != b_u8.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {tuple(a_u8.shape)} and {tuple(b_u8.shape)}")
        a, b = to_lpips_input(a_u8.to(dev)), to_lpips_input(b_u8.to(dev))
        return lp(a, b).reshape(-1).float().cpu()

    distance.net = net
    return distance


def lpips_diversity(images_u8, labels, distance: Callable, classes: Sequence[str], pairs_per_class: int = 50,
                    seed: int = 0, batch_size: int = 64) -> dict:
    """Mean LPIPS between random pairs of distinct images of the same class (the paper's diversity column).

    Per class c (label index into `classes`): `pairs_per_class` pairs (i, j), i != j, drawn with replacement
    from np.random.default_rng([seed, c]). {"mean": unweighted mean over the classes with >= 2 images (nan if
    none), "per_class": {class: mean, or nan for classes with < 2 images}}."""
    images = torch.as_tensor(images_u8)
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    per_class = {}
    for c, name in enumerate(classes):
        members = np.nonzero(labels == c)[0]
        if len(members) < 2:
            per_class[name] = float("nan")
            continue
        rng = np.random.default_rng([seed, c])
        i = rng.integers(len(members), size=pairs_per_class)
        j = (i + rng.integers(1, len(members), size=pairs_per_class)) % len(members)  # j != i
        a, b = members[i], members[j]
        d = [distance(images[a[k:k + batch_size]], images[b[k:k + batch_size]])
             for k in range(0, pairs_per_class, batch_size)]
        per_class[name] = float(torch.cat(d).double().mean())
    values = [v for v in per_class.values() if not np.isnan(v)]
    return {"mean": float(np.mean(values)) if values else float("nan"), "per_class": per_class}
