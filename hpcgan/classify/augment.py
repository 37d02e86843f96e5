"""Classic augmentation recipes (regimes aug1, aug2, aug3), built from config with torchvision v2 transforms.

A recipe is a list of steps, each {"name": ..., its parameters..., "p": probability (optional, default 1)}:

  flip                 horizontal and vertical flips, each with probability 0.5
  rot90                a random multiple of 90 degrees (a cell on a slide has no orientation)
  color_jitter         brightness, contrast, saturation, hue (v2.ColorJitter)
  affine               degrees, translate (fraction), scale [lo, hi], fill (v2.RandomAffine)
  random_resized_crop  scale [lo, hi], ratio [lo, hi], back to the image size, antialiased (v2.RandomResizedCrop)
  blur                 kernel, sigma [lo, hi] (v2.GaussianBlur)
  rand_augment         num_ops, magnitude, fill (v2.RandAugment, Cubuk et al. 2020)

`fill` is the value of pixels moved in from outside the image: 255, the white background of a stained
smear. The three recipes of configs/classify.yaml (defaults: RECIPES) grow in strength: aug1 the eight
symmetries of the square; aug2 + colour jitter and a mild affine; aug3 + random resized crop, blur and
RandAugment.

Transforms act on one image at a time (v2 would draw one set of parameters for a whole batch) on uint8
tensors, from the global torch RNG, which the training loop seeds per step and rank: a resumed run draws the
same augmentations.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

RECIPES: dict[str, list[dict[str, Any]]] = {
    "aug1": [{"name": "flip"}, {"name": "rot90"}],
    "aug2": [{"name": "flip"}, {"name": "rot90"},
             {"name": "color_jitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02},
             {"name": "affine", "degrees": 15, "translate": 0.1, "scale": [0.9, 1.1], "fill": 255}],
    "aug3": [{"name": "flip"}, {"name": "rot90"},
             {"name": "random_resized_crop", "scale": [0.6, 1.0], "ratio": [0.8, 1.25]},
             {"name": "color_jitter", "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.04},
             {"name": "affine", "degrees": 30, "translate": 0.1, "scale": [0.85, 1.15], "fill": 255},
             {"name": "blur", "kernel": 3, "sigma": [0.1, 1.2], "p": 0.5},
             {"name": "rand_augment", "num_ops": 2, "magnitude": 9, "fill": 255}],
}


class _Flips(torch.nn.Module):
    def forward(self, x):
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        if torch.rand(()) < 0.5:
            x = x.flip(-2)
        return x


class _Rot90(torch.nn.Module):
    def forward(self, x):
        return torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))


def _pair(v) -> tuple[float, float]:
    lo, hi = v
    return float(lo), float(hi)


def _step(spec: dict, size: int) -> torch.nn.Module:
    from torchvision.transforms import v2
    args = {k: v for k, v in spec.items() if k not in ("name", "p")}
    name = spec.get("name")
    builders: dict[str, Callable[..., torch.nn.Module]] = {
        "flip": lambda: _Flips(),
        "rot90": lambda: _Rot90(),
        "color_jitter": lambda brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0: v2.ColorJitter(
            brightness, contrast, saturation, hue),
        "affine": lambda degrees=0.0, translate=0.0, scale=(1.0, 1.0), fill=255: v2.RandomAffine(
            degrees, translate=(translate, translate) if translate else None, scale=_pair(scale), fill=fill),
        "random_resized_crop": lambda scale=(0.6, 1.0), ratio=(0.75, 4 / 3): v2.RandomResizedCrop(
            size, scale=_pair(scale), ratio=_pair(ratio), antialias=True),
        "blur": lambda kernel=3, sigma=(0.1, 1.0): v2.GaussianBlur(int(kernel), sigma=_pair(sigma)),
        "rand_augment": lambda num_ops=2, magnitude=9, fill=255: v2.RandAugment(int(num_ops), int(magnitude),
                                                                                 fill=fill),
    }
    if name not in builders:
        raise ValueError(f"augmentation step {spec!r}: name must be one of {', '.join(builders)}")
    try:
        t = builders[name](**args)
    except TypeError as e:
        raise ValueError(f"augmentation step {spec!r}: {e}") from None
    p = float(spec.get("p", 1.0))
    if not 0 <= p <= 1:
        raise ValueError(f"augmentation step {spec!r}: p must be in [0, 1]")
    return t if p == 1.0 else v2.RandomApply([t], p=p)


def build_recipe(steps: list[dict], image_size: int) -> torch.nn.Module:
    """The recipe as one transform of a uint8 [3, S, S] tensor; ValueError naming a bad step."""
    from torchvision.transforms import v2
    if not isinstance(steps, (list, tuple)) or not steps:
        raise ValueError(f"an augmentation recipe is a non-empty list of steps, got {steps!r}")
    return v2.Compose([_step(dict(s), image_size) for s in steps])


def augment_batch(x: torch.Tensor, transform: torch.nn.Module) -> torch.Tensor:
    """Images in [-1, 1] (the loader's) -> each transformed on its own as uint8 -> back to [-1, 1]."""
    u8 = x.mul(127.5).add_(127.5).round_().clamp_(0, 255).to(torch.uint8)
    out = torch.stack([transform(img) for img in u8])
    return out.to(x.dtype).sub_(127.5).div_(127.5)


def recipe_sheet(shards, path, recipes: dict[str, list[dict]] | None = None, n: int = 8, seed: int = 0):
    """A picture of the recipes: the first `n` training images of `shards` as they are, then under each recipe
    (a row each; one draw, seeded), written to `path` (PNG). For the README and for checking a recipe."""
    from hpcgan.data.loader import make_loader
    from hpcgan.viz import contact_sheet
    recipes = RECIPES if recipes is None else recipes
    x, _ = next(iter(make_loader(shards, "train", n, shuffle=False, device="cpu")))
    rows = {"original": x}
    for name, steps in recipes.items():
        torch.manual_seed(seed)
        rows[name] = augment_batch(x, build_recipe(steps, x.shape[-1]))
    return contact_sheet(rows, path, title="augmentation recipes (configs/classify.yaml)", per_row=n,
                         tile=max(64, x.shape[-1]))


if __name__ == "__main__":  # python -m hpcgan.classify.augment SHARDS OUT.png
    import sys
    print(recipe_sheet(sys.argv[1], sys.argv[2]))
