"""The metric registry: every evaluation metric by name (StyleGAN2-ADA's metric_main is the model).

A metric is a small function over an `EvalData` (features, logits, labels and, only when asked for,
pixels of the real reference split and of the generated set) that returns a `MetricResult`. The same
functions run during a study, after training and in tests; `hpcgan.evaluate` decides which inputs to
compute (it asks `needs(names)`), and `compute(names, data)` runs them.

    name            what                                                             needs
    is              Inception Score of the generated set (a *domain* IS with the      logits
                    cell extractor: its class probabilities, not ImageNet's)
    fid             Frechet distance of generated vs real features                    features
    kid             kernel inception distance (mean, std over subsets)                features
    prdc            precision, recall (Kynkaanniemi 2019), their f1, density,         features
                    coverage (Naeem 2020); the paper's P, R, F1
    intra_fid       FID per class and its mean (class mix-ups that global FID misses) features, labels
    diversity       within-class spread of the features (mean pairwise distance),      features, labels
                    generated, real, and their ratio (collapse -> 0, as varied as real -> 1)
    lpips           mean pairwise LPIPS within a class (the paper's diversity column) pixels, lpips, labels
    nn_fidelity     l1, l2 (RMSE), PSNR, SSIM of each generated image vs its nearest   pixels, labels
                    real training image of the same class (the paper's Table 4)
    memorisation    share of generated images closer to a training image than the     features (+ pixels
                    1st percentile of real-to-real nearest-neighbour distances; a       for the sheet)
                    PNG sheet of the closest pairs
    class_accuracy  share of generated images that a classifier trained on real cells  classifier, labels
                    assigns to the class they were generated for (per class too)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class Side:
    """One image set as the metrics see it. labels is None for an unconditional generator's images."""
    features: np.ndarray                     # [N, D] float32, from the extractor of the evaluation
    logits: np.ndarray | None = None         # [N, C] the extractor's class logits (IS)
    labels: np.ndarray | None = None         # [N] int64
    images: np.ndarray | None = None         # [N, 3, S, S] uint8, only when a metric needs pixels
    classifier_logits: np.ndarray | None = None  # [N, C] the real-trained cell classifier's logits

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass
class EvalData:
    classes: list[str]
    real: Side                               # the real reference split (train unless set)
    fake: Side                               # the generated (or otherwise evaluated) set
    out_prefix: Path | None = None           # pictures a metric draws go to f"{out_prefix}-<metric>.png"
    lpips: Callable | None = None            # (a_u8, b_u8) -> distances, when LPIPS weights are staged
    lpips_missing: str = "LPIPS was not loaded"  # why not, when lpips is None
    seed: int = 0


@dataclass
class MetricResult:
    values: dict[str, float]                                      # row name -> value ("precision": 0.7)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # row name -> class -> value
    info: dict = field(default_factory=dict)                      # anything else worth keeping (paths, thresholds)


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[EvalData], MetricResult]
    needs: frozenset[str]        # features, logits, labels, pixels, lpips, classifier
    doc: str


METRICS: dict[str, Metric] = {}
DEFAULT_METRICS = ("fid", "kid", "prdc", "intra_fid", "diversity", "is", "class_accuracy", "nn_fidelity",
                   "memorisation", "lpips")


class MetricUnavailable(RuntimeError):
    """A metric cannot run with what this evaluation has (e.g. per-class metrics of an unconditional
    generator, LPIPS without its staged weights); the message says why. Recorded, never a number."""


def register_metric(name: str, needs: tuple[str, ...]):
    def deco(fn):
        METRICS[name] = Metric(name, fn, frozenset(needs), (fn.__doc__ or "").strip().splitlines()[0])
        return fn
    return deco


def check_names(names) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
    return names


def needs(names) -> frozenset[str]:
    return frozenset().union(*(METRICS[n].needs for n in check_names(names)))


def compute(names, data: EvalData) -> tuple[dict[str, MetricResult], dict[str, str]]:
    """(results by metric name, reasons by metric name for those that could not run)."""
    results, skipped = {}, {}
    for name in check_names(names):
        try:
            results[name] = METRICS[name].fn(data)
        except MetricUnavailable as e:
            skipped[name] = str(e)
    return results, skipped


# ---- the metrics ----------------------------------------------------------------------------------

def _labelled(data: EvalData, what: str) -> None:
    if data.fake.labels is None:
        raise MetricUnavailable(f"{what} needs class labels of the generated images; this generator is "
                                "unconditional")


@register_metric("is", needs=("logits",))
def _is(data: EvalData) -> MetricResult:
    """Inception Score of the generated set (domain IS when the extractor is not Inception)."""
    from hpcgan.metrics.isc import inception_score
    if data.fake.logits is None:
        raise MetricUnavailable("this feature extractor gives no class logits")
    mean, std = inception_score(data.fake.logits, splits=min(10, max(1, len(data.fake) // 50)), seed=data.seed)
    return MetricResult({"is": mean, "is_std": std})


@register_metric("fid", needs=("features",))
def _fid(data: EvalData) -> MetricResult:
    """Frechet distance between real and generated features."""
    from hpcgan.metrics.fid import fid
    return MetricResult({"fid": fid(data.real.features, data.fake.features)})


@register_metric("kid", needs=("features",))
def _kid(data: EvalData) -> MetricResult:
    """Kernel inception distance (polynomial kernel MMD, mean and std over subsets)."""
    from hpcgan.metrics.fid import kid
    mean, std = kid(data.real.features, data.fake.features, seed=data.seed)
    return MetricResult({"kid": mean, "kid_std": std})


@register_metric("prdc", needs=("features",))
def _prdc(data: EvalData) -> MetricResult:
    """Precision, recall, their F1, density and coverage on k-NN manifolds (k=3)."""
    from hpcgan.metrics.prdc import prdc
    return MetricResult(dict(prdc(data.real.features, data.fake.features, k=3)))


@register_metric("intra_fid", needs=("features", "labels"))
def _intra_fid(data: EvalData) -> MetricResult:
    """FID per class and its mean over the classes with images on both sides."""
    from hpcgan.metrics.fid import intra_fid
    _labelled(data, "intra-class FID")
    r = intra_fid(data.real.features, data.real.labels, data.fake.features, data.fake.labels, data.classes)
    return MetricResult({"intra_fid": r["mean"]}, {"intra_fid": r["per_class"]},
                        {"classes_scored": r["classes_scored"]})


@register_metric("diversity", needs=("features", "labels"))
def _diversity(data: EvalData) -> MetricResult:
    """Within-class feature spread of the generated images, of the real ones, and their ratio."""
    from hpcgan.metrics.diversity import class_spread
    _labelled(data, "within-class diversity")
    r = class_spread(data.fake.features, data.fake.labels, data.real.features, data.real.labels, data.classes,
                     seed=data.seed)
    return MetricResult(r["mean"], r["per_class"], {"classes_scored": r["classes_scored"]})


@register_metric("lpips", needs=("pixels", "lpips", "labels"))
def _lpips(data: EvalData) -> MetricResult:
    """Mean pairwise LPIPS between generated images of the same class (diversity)."""
    from hpcgan.metrics.lpips import lpips_diversity
    _labelled(data, "LPIPS within a class")
    if data.lpips is None:
        raise MetricUnavailable(data.lpips_missing)
    r = lpips_diversity(data.fake.images, data.fake.labels, data.lpips, data.classes, seed=data.seed)
    real = lpips_diversity(data.real.images, data.real.labels, data.lpips, data.classes, seed=data.seed)
    return MetricResult({"lpips": r["mean"], "lpips_real": real["mean"]}, {"lpips": r["per_class"]})


@register_metric("nn_fidelity", needs=("pixels", "labels"))
def _nn_fidelity(data: EvalData) -> MetricResult:
    """l1, l2 (RMSE), PSNR, SSIM against the nearest real image of the same class."""
    from hpcgan.metrics.pixel import nn_fidelity
    _labelled(data, "nearest-neighbour fidelity per class")
    r = nn_fidelity(data.fake.images, data.fake.labels, data.real.images, data.real.labels)
    return MetricResult({k: float(r[k]) for k in ("l1", "l2", "psnr", "ssim")},
                        info={k: r[k] for k in r if k not in ("l1", "l2", "psnr", "ssim")})


@register_metric("memorisation", needs=("features", "pixels"))
def _memorisation(data: EvalData) -> MetricResult:
    """Share of generated images closer to a training image than the 1st percentile of real-real distances."""
    from hpcgan.metrics.memorisation import closest_pairs_sheet, memorisation
    r = memorisation(data.fake.features, data.real.features, percentile=1.0)
    info = {"threshold": float(r["threshold"]), "flagged": int(np.sum(r["flagged"]))}
    if data.out_prefix is not None and data.fake.images is not None and data.real.images is not None:
        path = Path(f"{data.out_prefix}-memorisation.png")
        closest_pairs_sheet(data.fake.images, data.real.images, r, path,
                            title="generated | nearest real")
        info["sheet"] = str(path)
    return MetricResult({"memorisation": float(r["fraction"])}, info=info)


@register_metric("class_accuracy", needs=("classifier", "labels"))
def _class_accuracy(data: EvalData) -> MetricResult:
    """Share of generated images a classifier trained on real cells assigns to their class."""
    from hpcgan.metrics.accuracy import class_accuracy, per_class_accuracy
    _labelled(data, "class accuracy")
    logits = data.fake.classifier_logits
    if logits is None:
        raise MetricUnavailable("no classifier trained on real cells was loaded")
    return MetricResult({"class_accuracy": class_accuracy(logits, data.fake.labels)},
                        {"class_accuracy": per_class_accuracy(logits, data.fake.labels, data.classes)})
