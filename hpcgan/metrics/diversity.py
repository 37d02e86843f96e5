"""Within-class diversity in feature space: how spread out the images of one class are.

The spread of a class is the mean Euclidean distance between two of its images' features (over every pair,
or over `max_pairs` random pairs of a large class). A collapsed generator that draws one image per class has
spread 0; one as varied as the real cells has the real images' spread, so the generated-to-real ratio (per
class, then the mean over classes scored) is the number to read: the issue's target is >= 0.6. It needs
no extra weights (the evaluation's own extractor), so it runs where LPIPS (the paper's diversity column,
which needs staged AlexNet weights) cannot.
"""
from __future__ import annotations

import numpy as np


def spread(features: np.ndarray, max_pairs: int = 20000, seed: int = 0) -> float:
    """Mean pairwise Euclidean distance of the rows of `features` (nan with fewer than 2 rows)."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    if n < 2:
        return float("nan")
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, size=max_pairs)
        j = (i + rng.integers(1, n, size=max_pairs)) % n   # never i itself
    return float(np.linalg.norm(x[i] - x[j], axis=1).mean())


def class_spread(fake: np.ndarray, fake_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
                 classes: list[str], seed: int = 0) -> dict:
    """Per class: generated spread, real spread and their ratio; means over the classes with >= 2 images on
    both sides (the others are left out, and listed)."""
    per = {"diversity": {}, "diversity_real": {}, "diversity_ratio": {}}
    for c, name in enumerate(classes):
        f, r = fake[np.asarray(fake_labels) == c], real[np.asarray(real_labels) == c]
        if len(f) < 2 or len(r) < 2:
            continue
        sf, sr = spread(f, seed=seed), spread(r, seed=seed)
        per["diversity"][name], per["diversity_real"][name] = sf, sr
        per["diversity_ratio"][name] = sf / sr if sr > 0 else float("nan")
    scored = list(per["diversity_ratio"])
    means = {k: float(np.mean(list(v.values()))) if v else float("nan") for k, v in per.items()}
    return {"mean": means, "per_class": per, "classes_scored": scored,
            "classes_left_out": [c for c in classes if c not in scored]}
