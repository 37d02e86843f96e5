"""Class accuracy of generated images: does a classifier trained on real cells see the class each image was
generated for?

    class_accuracy(logits, labels)                   # share of rows with argmax(logits) == label
    per_class_accuracy(logits, labels, classes)      # {class: share, nan for a class without rows}
"""
from __future__ import annotations

import numpy as np

from hpcgan.metrics.prdc import as_numpy


def _hits(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, y = as_numpy(logits), as_numpy(labels).reshape(-1)
    if scores.ndim != 2 or len(scores) != len(y):
        raise ValueError(f"expected logits [N, C] and labels [N], got {scores.shape} and {y.shape}")
    return scores.argmax(axis=1) == y, y


def class_accuracy(logits, labels) -> float:
    """Share of rows whose argmax equals the label (nan for no rows)."""
    hits, _ = _hits(logits, labels)
    return float(hits.mean()) if len(hits) else float("nan")


def per_class_accuracy(logits, labels, classes) -> dict[str, float]:
    """{class name: accuracy over the rows labelled with it (label k is classes[k]); nan without rows}."""
    hits, y = _hits(logits, labels)
    return {name: float(hits[y == k].mean()) if np.any(y == k) else float("nan")
            for k, name in enumerate(classes)}
