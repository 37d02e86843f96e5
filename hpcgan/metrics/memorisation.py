"""Memorisation: generated images that sit closer to a training image than real images sit to each other.

    r = memorisation(fake_features, real_features, percentile=1.0)
    r["fraction"], r["threshold"], r["flagged"], r["nearest"], r["distance"]
    closest_pairs_sheet(fake_u8, real_u8, r, "memorisation.png")

In feature space (Euclidean distance, blocked torch.cdist): the threshold is the `percentile`-th percentile
(0..100; default the 1st) of the distances from each real sample to its nearest OTHER real sample (itself
excluded by index; exact duplicates among the reals count as distance 0, so a training set with more than
`percentile` % duplicated images has threshold 0). A generated sample is flagged when its distance to the
nearest real sample is below the threshold (strictly); when the threshold is 0, `<=` is used so an exact
copy is still flagged. Nearest distances are recomputed exactly (no matrix-product rounding), so an exact
copy with bit-identical features has distance exactly 0; features of a copy extracted in a different batch
on a GPU may differ in the last bits and then only count when the threshold is above that noise.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcgan.metrics.prdc import as_features, as_numpy, nearest


def memorisation(fake_features, real_features, percentile: float = 1.0) -> dict:
    """{"fraction": share of generated samples flagged, "threshold": float, "flagged": bool [N_fake],
    "nearest": index into the reals [N_fake], "distance": nearest-real distance [N_fake]} (module docstring)."""
    fake = as_features(fake_features, "fake_features")
    real = as_features(real_features, "real_features")
    if fake.shape[1] != real.shape[1]:
        raise ValueError(f"generated features have {fake.shape[1]} dimensions, real ones {real.shape[1]}")
    threshold = copy_threshold(real, percentile)
    distance, idx = nearest(fake, real)
    flagged = is_copy(distance, threshold)
    return {"fraction": float(flagged.mean()) if len(flagged) else float("nan"), "threshold": threshold,
            "flagged": flagged, "nearest": idx, "distance": distance}


def copy_threshold(real_features, percentile: float = 1.0) -> float:
    """The `percentile`-th percentile (0..100) of each real sample's distance to its nearest OTHER real sample."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile={percentile}: expected a value in 0..100 (1.0 = the 1st percentile)")
    real = as_features(real_features, "real_features")
    real_nn, _ = nearest(real, real, exclude_self=True)
    return float(np.percentile(real_nn, percentile))


def is_copy(distance: np.ndarray, threshold: float) -> np.ndarray:
    """Flagged as a copy: nearer than the threshold (strictly), or at distance 0 when the threshold is 0."""
    return distance <= threshold if threshold == 0 else distance < threshold


def closest_pairs_sheet(fake_images, real_images, result: dict, path, n: int = 16, title: str | None = None,
                        min_tile: int = 64) -> Path:
    """PNG of the `n` closest generated/real pairs of a `memorisation` result, one pair per row (generated
    left, its nearest real image right), flagged pairs first, then by distance; the row label gives the
    generated index, the distance and FLAGGED. Images uint8 [N, 3, H, W]; tiles blown up to `min_tile` px."""
    from hpcgan.viz import contact_sheet

    fake, real = as_numpy(fake_images), as_numpy(real_images)
    flagged, distance, idx = (np.asarray(result[k]) for k in ("flagged", "distance", "nearest"))
    if len(fake) != len(distance):
        raise ValueError(f"{len(fake)} generated images but a memorisation result for {len(distance)}")
    order = np.lexsort((distance, ~flagged))[:n]          # flagged first, then the closest
    rows = {}
    for i in order:
        label = f"#{i} d={distance[i]:.4g}" + ("  FLAGGED" if flagged[i] else "")
        rows[label] = np.stack([fake[i], real[idx[i]]]).transpose(0, 2, 3, 1)
    if not rows:
        raise ValueError("closest_pairs_sheet: no generated images to show")
    tile = max(min_tile, fake.shape[2])
    return contact_sheet(rows, path, title=title, per_row=2, tile=tile)
