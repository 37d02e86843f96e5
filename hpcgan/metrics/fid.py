"""Frechet distance (FID), kernel distance (KID) and per-class FID of feature sets.

    fid(real_features, fake_features)                       # float
    kid(real_features, fake_features)                       # (mean, std) over random subsets
    intra_fid(real_f, real_y, fake_f, fake_y, classes)      # {"mean", "per_class", "classes_scored"}

Features are float arrays [N, D] (numpy or torch) from one extractor; the statistics and distances are
torch-fidelity's (fid_features_to_statistics / fid_statistics_to_metric, kid_features_to_metric), in float64.
Called "FID"/"KID" whatever the extractor: with the cell extractor they are domain Frechet/kernel distances,
not comparable with numbers computed on ImageNet-Inception features.
"""
from __future__ import annotations

import numpy as np
import torch

from hpcgan.metrics.prdc import as_features, as_numpy


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features [N, D] in float64; N >= 2."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    x = as_features(features).to(torch.float64)
    if len(x) < 2:
        raise ValueError(f"feature statistics need at least 2 samples, got {len(x)}")
    st = fid_features_to_statistics(x)
    d = x.shape[1]
    return np.asarray(st["mu"], np.float64).reshape(d), np.asarray(st["sigma"], np.float64).reshape(d, d)


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu1, mu2 = (np.asarray(m, np.float64).reshape(-1) for m in (mu1, mu2))
    d = len(mu1)
    sigma1, sigma2 = (np.asarray(s, np.float64).reshape(d, d) for s in (sigma1, sigma2))
    if mu2.shape != mu1.shape:
        raise ValueError(f"statistics of different dimension: {len(mu1)} vs {len(mu2)}")
    out = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)
    return float(out[KEY_METRIC_FID])


def fid(features_a, features_b) -> float:
    """FID between two feature sets [N, D] (symmetric)."""
    return fid_from_stats(*feature_stats(features_a), *feature_stats(features_b))


def kid(features_a, features_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance (unbiased MMD^2, cubic polynomial kernel): (mean, std) over `subsets`
    random subsets of `subset_size` samples of each set, drawn with np.random.RandomState(seed).
    `subset_size` is clipped to the smaller set, so small sets are scored on all their samples (every
    subset then equal, std 0). Can be slightly negative when the sets match."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    a = as_features(features_a, "features_a").to(torch.float64)
    b = as_features(features_b, "features_b").to(torch.float64)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {len(a)} and {len(b)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    out = kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def intra_fid(real_features, real_labels, fake_features, fake_labels, classes: list[str],
              min_count: int = 2) -> dict:
    """FID per class (label k is classes[k]) and its mean over the scored classes.

    {"mean": mean over the classes scored (nan if none), "per_class": {class: FID, or nan when either side
    has fewer than `min_count` samples of it}, "classes_scored": int}. A class mix-up (images of class a
    generated for label b) leaves the global FID unchanged but shows here."""
    real, fake = as_numpy(real_features), as_numpy(fake_features)
    ry, fy = as_numpy(real_labels).reshape(-1), as_numpy(fake_labels).reshape(-1)
    if len(real) != len(ry) or len(fake) != len(fy):
        raise ValueError(f"features and labels differ in length: real {len(real)} vs {len(ry)}, "
                         f"generated {len(fake)} vs {len(fy)}")
    per_class = {}
    for k, name in enumerate(classes):
        r, f = real[ry == k], fake[fy == k]
        ok = min(len(r), len(f)) >= max(2, min_count)
        per_class[name] = fid(r, f) if ok else float("nan")
    scored = [v for v in per_class.values() if not np.isnan(v)]
    return {"mean": float(np.mean(scored)) if scored else float("nan"), "per_class": per_class,
            "classes_scored": len(scored)}
