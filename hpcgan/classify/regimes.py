"""The data regimes of the classifier study (the paper's Table 5 rows and the cheap rivals of GAN balancing).

regime              training images                                   sampling          loss            augment
original            the real train split                              shuffled          cross-entropy   -
synthetic           synthetic only, class-balanced (data.py)          shuffled          cross-entropy   -
aug1, aug2, aug3    the real train split                              shuffled          cross-entropy   recipe
original+synthetic  real + synthetic topping each class up to the     shuffled          cross-entropy   -
                    largest
balanced            the real train split                              classes uniform   cross-entropy   -
weighted_loss       the real train split                              shuffled          CE, n/(K n_c)   -
logit_adjust        the real train split                              shuffled          logit-adjusted  -

`synthetic` is the Classification Accuracy Score of Ravuri & Vinyals (2019). The class weights of
`weighted_loss` are scikit-learn's "balanced" ones, N / (K * n_c) over the classes present. `logit_adjust` is
the logit-adjusted loss of Menon et al. (ICLR 2021): cross-entropy of logits + tau * log(prior), prior = the
training class frequencies; at test time the plain logits are used, which is what makes it balance the
classes. Every regime trains the same number of optimisation steps with the same model selection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Regime:
    name: str
    data: str                 # "real" | "synthetic" | "real+synthetic"
    balanced_sampling: bool = False
    loss: str = "ce"          # "ce" | "weighted" | "logit_adjust"
    augment: str | None = None

    @property
    def reads_synthetic(self) -> bool:
        return "synthetic" in self.data


REGIMES: dict[str, Regime] = {r.name: r for r in (
    Regime("original", "real"),
    Regime("synthetic", "synthetic"),
    Regime("aug1", "real", augment="aug1"),
    Regime("aug2", "real", augment="aug2"),
    Regime("aug3", "real", augment="aug3"),
    Regime("original+synthetic", "real+synthetic"),
    Regime("balanced", "real", balanced_sampling=True),
    Regime("weighted_loss", "real", loss="weighted"),
    Regime("logit_adjust", "real", loss="logit_adjust"),
)}


def get_regime(name: str) -> Regime:
    if name not in REGIMES:
        raise ValueError(f"regime={name!r}: choose one of {', '.join(REGIMES)}")
    return REGIMES[name]


class RegimeLoss:
    """The training loss of a regime, given the training set's images per class."""

    def __init__(self, regime: Regime, class_counts, tau: float = 1.0, device="cpu"):
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        present = counts > 0
        self.kind, self.weight, self.log_prior = regime.loss, None, None
        if regime.loss == "weighted":
            w = torch.zeros_like(counts)
            w[present] = counts.sum() / (int(present.sum()) * counts[present])
            self.weight = w.float().to(device)
        elif regime.loss == "logit_adjust":
            prior = counts / counts.sum()
            # a class without training images gets a very low prior (not -inf: its logit must stay finite)
            self.log_prior = (tau * torch.log(prior.clamp_min(1e-12))).float().to(device)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.log_prior is not None:
            logits = logits + self.log_prior
        return F.cross_entropy(logits, y, weight=self.weight)
