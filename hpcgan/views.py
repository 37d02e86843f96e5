"""Generative views of the GAN's training cells (issue 20; tools/generate.py views=true, view_from=own|others).

A class cut to 20 real cells gets, from a GAN trained on them, the GAN's own version of the class, which the lever
studies found unlike the real cells (docs/studies.md). Views stay near the real cells instead. Each training cell x
of a class is inverted into the generator by optimisation (Creswell & Bharath 2016, "Inverting the generator of a
GAN"):

    z_x = argmin_z  mean (G(z, y) - x)^2  +  weight * mean z^2        (Adam, `steps` steps, from 0.1 x a draw)

and the class's synthetic cells are G(z_x + sigma * eps, y), eps ~ N(0, I), the class's anchors taken in turn:
latent i of the class's stream (hpcgan.generate.class_images) becomes anchor i mod k plus sigma times itself.
That is Chai et al.'s "generative views" (CVPR 2021: perturbed latents of an inverted real image), used as training
data. sigma = 0 gives the reconstructions themselves.

Class-swapped views (`source="others"`, tools/generate.py view_from=others) borrow the common classes' variety for
a cut class: the anchors are the inverted training cells of every class *not* drawn as views, each inverted under
its own label, taken in turn across those classes (one of each, then the next of each, ...), and every view class's
cells are G(anchor + sigma * eps, y) under the view class's label y. What the latent holds of a cell (its place,
size, outline, neighbours; under BAGAN's prior, its offset from its class's mean code) is drawn as the view class.

Only the cells the GAN trained on are read (hpcgan.curate.training_cells: the shard set, split and scarce cut its
checkpoint records), never a cell the cut removed, val or test. Each class inverts up to `anchors` of its training
cells (null: all), the first in shard order. The synthetic manifest's "views" records sigma, steps, weight, the
source, the view classes and, per inverted class (with "others": the classes borrowed from), the anchors and their
reconstruction error. Same checkpoint, settings and seed -> the same anchors on the
CPU (a GPU's convolution gradients need not be bitwise repeatable). Views near their real cell may be near-copies
to curate=true's copy filter.
"""
from __future__ import annotations

import logging

import torch

from hpcgan.latent import sample_latent

logger = logging.getLogger(__name__)

INIT_SCALE = 0.1   # the inversion starts from 0.1 x a latent draw: near the prior's centre, not at one point
LR = 0.05          # Adam's step size for the latents (per-latent problems of a few hundred dimensions)
SOURCES = ("own", "others")   # whose training cells a view class's anchors are (fit_views' source)


class ViewsError(ValueError):
    """Views asked for what they cannot do; the message says what to change."""


def check_source(source: str) -> None:
    """The one check of `source` (tools/generate.py's view_from)."""
    if source not in SOURCES:
        raise ViewsError(f"view_from={source!r}: choose own (a class's own training cells) or others (the other "
                         "classes' cells, drawn as the view class)")


class Views:
    """Per view class label, its anchors (inverted latents of its own training cells, or with source "others" of the
    other classes'), and how far views stray (sigma)."""

    def __init__(self, anchors: dict[int, torch.Tensor], sigma: float, record: dict):
        self.anchors, self.sigma, self.record = anchors, float(sigma), record

    def move(self, z: torch.Tensor, label: int | None) -> torch.Tensor:
        """The class's latent stream z [n, D] -> its views: anchor i mod k + sigma * z_i (other classes: z)."""
        a = self.anchors.get(label)
        if a is None:
            return z
        return a[torch.arange(len(z)) % len(a)].to(z) + self.sigma * z


def invert(G, spec, x: torch.Tensor, label: int, *, steps: int, weight: float, seed: int,
           batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """Latents [n, D] whose images G(z, label) best match x (float [n, 3, S, S] in [-1, 1]) in mean squared error,
    with `weight` x mean z^2 keeping each near the prior; and that error over all n. Each cell's problem is its
    own (the loss sums the cells' losses, Adam is per element), solved `batch_size` cells at a time. G is run in
    eval mode (BatchNorm statistics untouched) and left as it was, weights, mode and requires_grad alike."""
    n = len(x)
    start = sample_latent(spec, n, torch.Generator().manual_seed(seed),
                          y=torch.full((n,), label, dtype=torch.int64)).z.to(x.device)
    mode, grads = G.training, [p.requires_grad for p in G.parameters()]
    G.eval()
    try:
        for p in G.parameters():
            p.requires_grad_(False)
        chunks = [_invert_chunk(G, x[i:i + batch_size], INIT_SCALE * start[i:i + batch_size], label, steps, weight)
                  for i in range(0, n, batch_size)]
    finally:
        G.train(mode)
        for p, g in zip(G.parameters(), grads):
            p.requires_grad_(g)
    z = torch.cat([c[0] for c in chunks])
    return z, sum(c[1] for c in chunks) / n


def _invert_chunk(G, x: torch.Tensor, z0: torch.Tensor, label: int, steps: int, weight: float):
    """(fitted latents, summed per-cell error) of one chunk of cells (see invert)."""
    y = torch.full((len(x),), label, dtype=torch.int64, device=x.device)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=LR)
    for _ in range(steps):
        per_cell = (G(z, y).float() - x).pow(2).flatten(1).mean(1) + weight * z.pow(2).mean(1)
        opt.zero_grad(set_to_none=True)
        per_cell.sum().backward()
        opt.step()
    with torch.no_grad():
        error = (G(z, y).float() - x).pow(2).flatten(1).mean(1).sum().item()
    return z.detach(), error


def fit_views(G, spec, seen: dict | None, classes: list[str], chosen: list[str], *, sigma: float, steps: int,
              weight: float, anchors: int | None, seed: int, batch_size: int = 64, source: str = "own") -> Views:
    """The views of the `chosen` classes from the training cells of the GAN that trained on `seen`: each class's
    own cells (source "own"; a chosen class without any is drawn as without views, with a warning), or the cells
    of every other class (source "others": class-swapped views, the same anchors for every chosen class)."""
    from hpcgan.curate import training_cells
    check_source(source)
    swapped = source == "others"
    inverted = [c for c in classes if c not in chosen] if swapped else chosen
    if swapped and not inverted:
        raise ViewsError(f"view_from=others: every class is a view class ({chosen}), so none is left to borrow "
                         "cells from; name fewer view classes (view_classes=scarce), or view_from=own")
    x_u8, y, (shards, split) = training_cells(seen, classes, "views=true")
    fitted, per_class = _invert_classes(G, spec, x_u8, y, classes, inverted, steps=steps, weight=weight,
                                        anchors=anchors, seed=seed, batch_size=batch_size)
    if swapped:
        if not fitted:
            raise ViewsError(f"view_from=others: no class outside the view classes {chosen} has training cells to "
                             "borrow from; name fewer view classes, or view_from=own")
        shared = interleave(list(fitted.values()))
        fitted = {classes.index(c): shared for c in chosen}
    lent = "lent no cell (none in the training split)" if swapped else "drawn as without views (no training cell)"
    for cls in (c for c in inverted if c not in per_class):
        (logger.info if swapped else logger.warning)("views: %s %s", cls, lent)
    record = {"sigma": sigma, "steps": steps, "weight": weight, "anchors": anchors, "seed": seed, "source": source,
              "view_classes": list(chosen),
              "from": {"shards": shards, "split": split, "scarce": seen.get("scarce"),
                       "scarce_seed": seen.get("scarce_seed")},
              "classes": per_class}
    return Views(fitted, sigma, record)


def _invert_classes(G, spec, x_u8: torch.Tensor, y: torch.Tensor, classes: list[str], names: list[str], *,
                    steps: int, weight: float, anchors: int | None, seed: int, batch_size: int):
    """({label: latents} of the named classes that have training cells, {class: anchors and reconstruction error});
    each class's first `anchors` cells, inverted under its own label with seed + label."""
    device = next(G.parameters()).device
    fitted, per_class = {}, {}
    for cls in names:
        label = classes.index(cls)
        cells = x_u8[y == label][:anchors]
        if not len(cells):
            continue
        x = cells.to(device).float().sub_(127.5).div_(127.5)
        fitted[label], error = invert(G, spec, x, label, steps=steps, weight=weight, seed=seed + label,
                                      batch_size=batch_size)
        per_class[cls] = {"anchors": len(cells), "reconstruction_mse": round(error, 6)}
        logger.info("views: %s, %d training cells inverted, reconstruction MSE %.4f", cls, len(cells), error)
    return fitted, per_class


def interleave(groups: list[torch.Tensor]) -> torch.Tensor:
    """Rows taken in turn across the groups: the first of each, then the second of each (groups running out drop
    out), so the first k anchors of class-swapped views span the source classes."""
    rows, longest = [], max(len(g) for g in groups)
    for i in range(longest):
        rows.extend(g[i] for g in groups if i < len(g))
    return torch.stack(rows)
