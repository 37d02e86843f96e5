"""Gauges of a GAN's health that a run logs and the demo reports: mode collapse (the spread of images within
and across classes) and whether the critic's auxiliary classifier tells the classes apart."""
from __future__ import annotations

import torch

DIVERSITY_COLUMNS = ("step", "within_row_std", "between_row_std")   # samples/diversity.csv
CLASS_SIGNAL_ADVICE = ("the critic does not tell the classes apart yet, so the generator gets no class signal; "
                       "train longer or raise model.ac_weight (README, Known limitations)")


def data_diversity(images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mode-collapse gauge of labelled images: within_row_std = per-pixel std within each class (classes with
    >= 2 images), averaged; between_row_std = per-pixel std of the class means. For real images it is the
    reference to read a sample grid's numbers against."""
    groups = [images[labels == c].float() for c in labels.unique()]
    within = [g.std(0).mean().item() for g in groups if len(g) > 1]
    means = torch.stack([g.mean(0) for g in groups])
    return {"within_row_std": sum(within) / len(within) if within else float("nan"),
            "between_row_std": means.std(0).mean().item() if len(groups) > 1 else float("nan")}


def grid_diversity(images: torch.Tensor, per_row: int) -> dict[str, float]:
    """The gauge of a sample grid (one row per class, a different noise vector per column): near 0 within
    rows, the generator ignores its noise; near 0 between rows, it ignores the class."""
    rows = torch.arange(images.shape[0] // per_row).repeat_interleave(per_row)
    return data_diversity(images, rows)


def class_signal(acc_real: list[float], class_counts: list[int], balanced: bool, last_rows: int = 4) -> dict | None:
    """Whether the critic's auxiliary classifier tells the classes of real images apart: the mean of the last
    logged accuracies against chance, i.e. always naming the largest class (1/classes under balanced
    sampling). Without it the generator gets no class signal. None for a model without a classifier."""
    if not acc_real:
        return None
    present = [c for c in class_counts if c > 0]
    chance = 1 / len(present) if balanced else max(present) / sum(present)
    tail = acc_real[-last_rows:]
    accuracy = sum(tail) / len(tail)
    return {"accuracy": accuracy, "chance": chance, "rows": len(tail),
            "learnt": accuracy >= chance + 0.25 * (1 - chance)}
