"""Images as every stage sees them: the sizes the GANs are built for, and [-1, 1] floats to 8-bit pixels.

    check_image_size(256, "size")   # SettingsError: size=256: ... 32, 64 or 128 px ...
    to_uint8(G(z, y))               # float [B, 3, S, S] in [-1, 1] -> uint8 [B, 3, S, S], same device

Shard building refuses other sizes (so a shard set the GANs cannot train on is never written), the model
registry builds only these, and generation and evaluation read them from checkpoints and manifests.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hpcgan.settings import SettingsError

if TYPE_CHECKING:
    import torch

IMAGE_SIZES = (32, 64, 128)   # side in px: 4x4 doubled 3, 4 or 5 times by the generators (models/blocks.py)


def check_image_size(size, name: str = "image_size") -> int:
    """`size` when it is one of IMAGE_SIZES, else a one-line SettingsError (a ValueError) naming `name`."""
    if isinstance(size, bool) or size not in IMAGE_SIZES:
        sizes = ", ".join(map(str, IMAGE_SIZES[:-1])) + f" or {IMAGE_SIZES[-1]}"
        raise SettingsError(f"{name}={size!r}: the GANs are built for {sizes} px images; choose one of those")
    return int(size)


def to_uint8(images: "torch.Tensor") -> "torch.Tensor":
    """Float images in [-1, 1] -> uint8 0..255, same shape, layout and device.

    One rounding everywhere (sample grids, PNGs, metrics): v = (x + 1) * 127.5 rounded half up, i.e.
    floor(v + 0.5); values outside [-1, 1] are clamped and NaN counts as -1 (black).
    """
    import torch

    x = torch.nan_to_num(images.detach().float(), nan=-1.0).clamp(-1, 1)
    return ((x + 1) * 127.5 + 0.5).floor_().clamp_(0, 255).to(torch.uint8)
