"""Classifier scores from a confusion matrix: accuracy, macro-F1, balanced accuracy and per class precision,
recall (= sensitivity), specificity, F1 and one-vs-rest accuracy (the paper's Tables 5-6).

The confusion matrix is the one thing ranks sum (all_reduce), so every score is a function of it: the
matrix is expanded back to (true, predicted) label lists and handed to scikit-learn; specificity, which
scikit-learn has no function for, is TN / (TN + FP) from the matrix. Conventions:
  * cm[i, j] = images of true class i predicted as j.
  * Macro averages (and balanced accuracy = macro recall) run over the classes the scored split has
    (support > 0): a class absent from the test split has no recall to average.
  * A class that is never predicted has precision 0 (scikit-learn's zero_division=0), so a classifier that
    ignores a scarce class is charged for it, not excused.
  * Per class, a class without test images gets None for recall, sensitivity, F1 and accuracy (nothing
    measured), and for precision too when it was never predicted; never a zero.
  * Per-class accuracy is one-vs-rest: (TP + TN) / N.
"""
from __future__ import annotations

import numpy as np

OVERALL = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "balanced_accuracy", "weighted_f1")
PER_CLASS = ("precision", "recall", "sensitivity", "specificity", "f1", "accuracy", "support")


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def expand(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) with cm[i, j] pairs (i, j): the label lists a confusion matrix stands for."""
    k = cm.shape[0]
    flat = np.asarray(cm, np.int64).ravel()
    pairs = np.repeat(np.arange(k * k), flat)
    return pairs // k, pairs % k


def scores(cm: np.ndarray, classes: list[str]) -> dict:
    """{"overall": {metric: value}, "per_class": {metric: {class: value or None}}} of a confusion matrix."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, precision_recall_fscore_support

    cm = np.asarray(cm, np.int64)
    k = len(classes)
    if cm.shape != (k, k) or cm.sum() == 0:
        raise ValueError(f"confusion matrix of shape {cm.shape} with {int(cm.sum())} images: need ({k}, {k}), "
                         "non-empty")
    y_true, y_pred = expand(cm)
    support = cm.sum(axis=1)
    present = [int(c) for c in np.nonzero(support)[0]]
    all_labels = list(range(k))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=all_labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average="macro", zero_division=0)
    wf = precision_recall_fscore_support(y_true, y_pred, labels=present, average="weighted", zero_division=0)[2]
    n = cm.sum()
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = support - tp
    tn = n - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        specificity = tn / (tn + fp)
    one_vs_rest = (tp + tn) / n
    overall = {"accuracy": accuracy_score(y_true, y_pred), "macro_precision": mp, "macro_recall": mr,
               "macro_f1": mf, "balanced_accuracy": balanced_accuracy_score(y_true, y_pred), "weighted_f1": wf}

    predicted = cm.sum(axis=0)

    def per(values, defined) -> dict:
        return {c: float(values[i]) if defined[i] and np.isfinite(values[i]) else None for i, c in enumerate(classes)}

    seen = support > 0
    per_class = {"precision": per(p, seen | (predicted > 0)), "recall": per(r, seen), "sensitivity": per(r, seen),
                 "specificity": per(specificity, np.ones(k, bool)), "f1": per(f, seen),
                 "accuracy": per(one_vs_rest, seen),
                 "support": {c: int(support[i]) for i, c in enumerate(classes)}}
    return {"overall": {k_: float(v) for k_, v in overall.items()}, "per_class": per_class}


def confusion_csv(cm: np.ndarray, classes: list[str]) -> str:
    """Rows = true class, columns = predicted class, with a header row and column of class names."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["true \\ predicted", *classes])
    for c, row in zip(classes, np.asarray(cm, np.int64)):
        w.writerow([c, *row.tolist()])
    return buf.getvalue()


def confusion_png(cm: np.ndarray, classes: list[str], title: str) -> bytes:
    """The confusion matrix as a PNG: rows normalised to recall (colour), counts written in the cells."""
    import io

    from matplotlib.figure import Figure  # no pyplot: no backend or global state, no display needed
    cm = np.asarray(cm, np.int64)
    k = len(classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    side = 1.2 + 0.55 * k
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
