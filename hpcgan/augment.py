"""DiffAugment (Zhao et al. 2020): differentiable colour / translation / cutout applied to BOTH real and
generated images before the critic, so a critic trained on few images (the scarce cell classes) cannot
memorise them while the generator still receives gradients through the augmentation.

Every random draw takes an explicit torch.Generator so that a resumed run repeats the same augmentations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def parse_policy(policy) -> tuple[str, ...]:
    """'color,translation' or ['color', 'translation'] (Hydra: diffaug=[color,translation,cutout])."""
    if not policy:
        return ()
    items = policy if isinstance(policy, (list, tuple)) else str(policy).split(",")
    parts = tuple(str(p).strip() for p in items if str(p).strip())
    bad = [p for p in parts if p not in POLICIES]
    if bad:
        raise ValueError(f"diffaug: unknown policy {bad}; use a comma list of {POLICIES}, e.g. 'color,translation,cutout'")
    return parts


def _rand(x, gen, *shape):
    return torch.rand(*shape, generator=gen, device=gen.device).to(x.dtype)


def color(x, gen):
    b = x.shape[0]
    x = x + (_rand(x, gen, b, 1, 1, 1) - 0.5)                                  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, gen, b, 1, 1, 1) * 2) + mean                    # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, gen, b, 1, 1, 1) + 0.5) + mean              # contrast


def translation(x, gen, ratio: float = 0.125):
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = torch.randint(-sh, sh + 1, (b, 1, 1), generator=gen, device=gen.device).to(x.device)
    ty = torch.randint(-sw, sw + 1, (b, 1, 1), generator=gen, device=gen.device).to(x.device)
    gb, gx, gy = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return padded.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2).contiguous()


def cutout(x, gen, ratio: float = 0.5):
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), generator=gen, device=gen.device).to(x.device)
    oy = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), generator=gen, device=gen.device).to(x.device)
    gb, gx, gy = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(ch, device=x.device),
                                torch.arange(cw, device=x.device), indexing="ij")
    gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


_FNS = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    for p in policy:
        x = _FNS[p](x, gen)
    return x
