"""The one latent layout every generator input follows (models/registry.py's contract):

    z = [ noise: z_dim x N(0, 1) | one-hot categorical code: info_cat | continuous codes: info_cont x U(-1, 1)
          | class-embedding noise: TWIN_DIM x N(0, 1), only when spec.noisy_twins > 0 (hpcgan.models.twins) ]

plus the class labels y a conditional generator takes beside z. `sample_latent` draws all of it from one
torch.Generator in a fixed order (noise, with truncation redraws right after it; the categorical code;
the continuous codes; the labels; the class-embedding noise), so a seed means the same latents in training, sample grids and
generation. Codes or labels given by the caller are not drawn (a sample grid fixes both per row).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpcgan.models.twins import TWIN_DIM


@dataclass
class Latent:
    z: torch.Tensor                 # [B, latent_dim]: noise, then one-hot cat code, then continuous codes
    y: torch.Tensor | None          # [B] labels the generator is conditioned on (None: unconditional)
    cat: torch.Tensor | None = None   # [B] categorical code indices
    cont: torch.Tensor | None = None  # [B, info_cont] continuous codes


def sample_latent(spec, n: int, gen: torch.Generator, *, num_classes: int | None = None,
                  labels: torch.Tensor | None = None, y: torch.Tensor | None = None, cat: torch.Tensor | None = None,
                  truncation: float | None = None, pairs: bool = False, twins: bool = False, device=None) -> Latent:
    """n latents for `spec` (a GANSpec), drawn on `gen`'s device and returned on `device` (default: the same).

    y:   labels for a conditional spec; drawn uniformly from `labels` (a 1-D tensor of class indices: training
         draws only the classes it has images of), default range(num_classes), when not given. With every
         class in `labels` the draws are the same as from range(num_classes).
    cat: categorical code indices for an InfoGAN spec; drawn uniformly when not given.
    truncation: noise values beyond +-truncation are drawn again (fidelity over diversity).
    pairs: the second half of the batch repeats the first half's labels and codes with fresh noise (n even),
         so latent i and latent i + n/2 differ only in their noise: the pairs of mode-seeking regularisation
         (hpcgan/objectives.py, `mode_seeking`).
    twins: the second half repeats the first half's noise, codes and labels, and only the class-embedding noise
         is drawn for each (n even): NoisyTwins' twins (hpcgan/objectives.py, `noisy_twins`).
    """
    if pairs and twins:
        raise ValueError("sample_latent: pairs (mode seeking) and twins (NoisyTwins) exclude each other")
    if twins and (y is not None or cat is not None):
        raise ValueError("sample_latent: twins draw their labels and codes themselves (one per pair); give no y or cat")
    if (pairs or twins) and n % 2:
        what = "model.mode_seeking" if pairs else "model.noisy_twins"
        raise ValueError(f"paired latents ({what} > 0) need an even batch per rank, got {n}: set an even batch_size")
    draw = {"generator": gen, "device": gen.device}
    z = torch.randn(n // 2 if twins else n, spec.z_dim, **draw)
    if truncation is not None:
        out = z.abs() > truncation
        while out.any():
            z[out] = torch.randn(int(out.sum()), **draw)
            out = z.abs() > truncation
    parts, cont = [_paired(z, twins)], None
    pairs = pairs or twins               # from here on: codes and labels are shared by both halves
    half = n // 2 if pairs else n
    if spec.info_cat > 0:
        cat = _paired(torch.randint(0, spec.info_cat, (half,), **draw), pairs) if cat is None else cat.to(gen.device)
        parts.append(F.one_hot(cat, spec.info_cat).float())
    if spec.info_cont > 0:
        cont = _paired(torch.rand(half, spec.info_cont, **draw) * 2 - 1, pairs)
        parts.append(cont)
    if spec.conditional and y is None:
        if labels is not None:
            y = _paired(labels.to(gen.device)[torch.randint(0, len(labels), (half,), **draw)], pairs)
        elif num_classes is None:
            raise ValueError(f"{spec.name} is conditional: give labels y or num_classes to draw them from")
        else:
            y = _paired(torch.randint(0, num_classes, (half,), **draw), pairs)
    if spec.noisy_twins > 0:
        parts.append(torch.randn(n, TWIN_DIM, **draw))
    cat = cat if spec.info_cat > 0 else None
    return Latent(z=_to(torch.cat(parts, 1), device), y=_to(y, device), cat=_to(cat, device), cont=_to(cont, device))


def _paired(t: torch.Tensor, pairs: bool) -> torch.Tensor:
    return torch.cat([t, t]) if pairs else t


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return t if t is None or device is None else t.to(device)
