"""Inception Score from class logits.

    mean, std = inception_score(logits)      # logits [N, C] of the generated images

IS = exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits), computed by torch-fidelity's
isc_features_to_metric on `splits` shuffled chunks (mean and std over the chunks). It lies between 1 (every
image gets the same class distribution) and C (confident predictions spread evenly over all C classes).
With logits of an extractor other than ImageNet-Inception (e.g. the cell classifier of
hpcgan.metrics.cell) this is a *domain* IS over that classifier's classes: useful to compare generators
with each other, not comparable with Inception Scores in the literature.
"""
from __future__ import annotations

import torch

from hpcgan.metrics.prdc import as_features


def inception_score(logits, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` chunks of the rows, shuffled with
    np.random.RandomState(seed); logits [N, C] (pre-softmax), N >= splits."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    x = as_features(logits, "logits").to(torch.float64)
    if splits < 1 or len(x) < splits:
        raise ValueError(f"inception_score: {len(x)} images cannot fill {splits} splits; use splits between 1 "
                         "and the number of images")
    out = isc_features_to_metric(x, splits=splits, shuffle=True, rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])
