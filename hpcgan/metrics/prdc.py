"""Precision, recall, F1, density and coverage of a generated feature set against a real one, and the k-NN
geometry (blocked distances) that the other feature-space metrics share.

    r = prdc(real_features, fake_features, k=3)
    r["precision"], r["recall"], r["f1"], r["density"], r["coverage"]

Precision and recall (Kynkaanniemi et al. 2019: the share of generated samples inside the real k-NN
manifold, and of real samples inside the generated one) come from torch-fidelity's
`prc_features_to_metric` (its input 1 is the GENERATED set, input 2 the REAL one). Density and coverage
(Naeem et al. 2020) are not in torch-fidelity and are computed here: with r_i the distance of real sample
i to its k-th nearest other real sample and B(x, r) the closed ball,

    density  = 1/(k M) * sum_j sum_i 1[fake_j in B(real_i, r_i)]      (about 1 when fake ~ real; can be > 1)
    coverage = 1/N * sum_i 1[some fake_j in B(real_i, r_i)]            (N real, M generated samples)

All distances are Euclidean, computed with torch.cdist on `block` rows at a time, so 10k x 10k sets need
O(block x N) memory, never an N x N matrix. Features are computed in float32 (float64 inputs stay float64).
"""
from __future__ import annotations

import numpy as np
import torch

from hpcgan.progress import Progress

BLOCK = 1024   # rows per torch.cdist call: 1024 x 10k float32 distances = 40 MB


def as_numpy(x) -> np.ndarray:
    """A numpy array of a numpy array, torch tensor (any device) or sequence."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def as_features(x, name: str = "features") -> torch.Tensor:
    """2-D float CPU tensor [N, D]: float64 stays float64, anything else becomes float32."""
    t = torch.as_tensor(as_numpy(x))
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [N, D], got shape {tuple(t.shape)}")
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def _blocks(n: int, block: int, desc: str):
    starts = range(0, n, block)
    with Progress(len(starts), desc, "block", bar=len(starts) >= 8, leave=False) as p:
        for s in starts:
            yield s
            p.update()


def kth_neighbour_distance(x: torch.Tensor, k: int, block: int = BLOCK) -> torch.Tensor:
    """[N] distance of each row of `x` to its k-th nearest OTHER row (itself excluded by index, so an exact
    duplicate counts as distance 0)."""
    n = len(x)
    if n <= k:
        raise ValueError(f"need more than k={k} samples for k-nearest-neighbour radii, got {n}")
    out = []
    for s in _blocks(n, block, "k-NN radii"):
        d = torch.cdist(x[s:s + block], x)
        rows = torch.arange(len(d))
        d[rows, rows + s] = float("inf")
        out.append(d.kthvalue(k, dim=1).values)
    return torch.cat(out)


def nearest(query: torch.Tensor, ref: torch.Tensor, *, block: int = BLOCK, exclude_self: bool = False,
            dtype: torch.dtype | None = None, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(distance [Nq] float64, index into `ref` [Nq] int64) of each query row's nearest row of `ref`.

    Blocked over both sets, so memory is O(block^2 + block x D) whatever the sizes; rows are cast to `dtype`
    (default: float32, float64 stays float64) and multiplied by `scale` one block at a time (uint8 pixels:
    scale=1/255). With `exclude_self` (query is ref) a row's own index is skipped. The returned distance is
    recomputed directly as ||q - ref[idx]|| in float64, so an exact copy has distance exactly 0 (the
    matrix-product form torch.cdist uses for speed leaves ~1e-7 there)."""
    if len(ref) == 0 or (exclude_self and len(ref) < 2):
        raise ValueError(f"nearest: the reference set has {len(ref)} rows; need at least {1 + exclude_self}")
    dtype = dtype or (torch.float64 if query.dtype == torch.float64 else torch.float32)
    dist = np.empty(len(query), np.float64)
    idx = np.empty(len(query), np.int64)
    for qs in _blocks(len(query), block, "nearest neighbours"):
        q = query[qs:qs + block]
        qf = q.to(dtype) * scale
        best = torch.full((len(q),), float("inf"), dtype=dtype)
        arg = torch.zeros(len(q), dtype=torch.int64)
        for rs in range(0, len(ref), block):
            r = ref[rs:rs + block]
            d = torch.cdist(qf, r.to(dtype) * scale)
            lo, hi = max(qs, rs), min(qs + len(q), rs + len(r))
            if exclude_self and lo < hi:                        # this block holds some rows' own index
                i = torch.arange(lo, hi)
                d[i - qs, i - rs] = float("inf")
            m, j = d.min(dim=1)
            better = m < best
            best[better], arg[better] = m[better], j[better] + rs
        exact = (q.to(torch.float64) - ref[arg].to(torch.float64)) * scale
        dist[qs:qs + len(q)], idx[qs:qs + len(q)] = exact.norm(dim=1).numpy(), arg.numpy()
    return dist, idx


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 3, block: int = BLOCK) -> tuple[float, float]:
    """Density and coverage of Naeem et al. (2020); see the module docstring."""
    radii = kth_neighbour_distance(real, k, block)
    inside = torch.zeros(len(fake), dtype=torch.int64)          # real balls holding each fake
    covered = torch.zeros(len(real), dtype=torch.bool)          # real balls holding some fake
    for s in _blocks(len(fake), block, "density/coverage"):
        hit = torch.cdist(fake[s:s + block], real) <= radii[None, :]
        inside[s:s + block] = hit.sum(dim=1)
        covered |= hit.any(dim=0)
    return float(inside.sum()) / (k * len(fake)), float(covered.double().mean())


def prdc(real_features, fake_features, k: int = 3, block: int = BLOCK) -> dict[str, float]:
    """{"precision", "recall", "f1", "density", "coverage"} of the generated features against the real ones
    on k-NN manifolds (floats; f1 = harmonic mean of precision and recall, 0 when both are 0)."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    real = as_features(real_features, "real_features")
    fake = as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have {real.shape[1]} dimensions, generated ones {fake.shape[1]}: "
                         "extract both with the same extractor")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} real and generated samples, got "
                         f"{len(real)} real and {len(fake)} generated")
    dtype = torch.promote_types(real.dtype, fake.dtype)
    real, fake = real.to(dtype), fake.to(dtype)
    # torch-fidelity >= 0.4: input 1 = generated, input 2 = real (tests/test_metrics.py checks it).
    pr = prc_features_to_metric(fake, real, prc_neighborhood=k, prc_batch_size=block, save_cpu_ram=True,
                                verbose=False)
    # torch-fidelity averages in float32 (0.8333333134...): back to the exact shares of counted samples
    p = round(float(pr[KEY_METRIC_PRECISION]) * len(fake)) / len(fake)
    r = round(float(pr[KEY_METRIC_RECALL]) * len(real)) / len(real)
    density, coverage = density_coverage(real, fake, k, block)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0,
            "density": density, "coverage": coverage}
