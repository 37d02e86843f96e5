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

A regime is the composition of its axes; the names above are presets, and each axis can override its
preset (`compose`; tools/classify.py takes them as settings, a study's grid as "PRESET axis=value ..."):
  sampling         shuffled | balanced (every class equally often in a batch)
  loss             ce | weighted | logit_adjust
  augment          none | a recipe name (aug1, aug2, aug3)
  synthetic_count  how many synthetic images join each class the real train split has (real+synthetic data):
                   topup (up to the largest real class), N (N more), Nx (N times the class's real count)
  real_share       with balanced sampling and real+synthetic data: the share of a class's draws taken from its
                   real images (default: in proportion to its real and synthetic counts)
  prior            with real+synthetic data and loss weighted or logit_adjust: the class counts the loss weighs by,
                   all (default: every training image) | real (the real images only: a class's synthetic cells
                   then count as augmentations of its real ones, and a scarce class keeps its full adjustment)
  synthetic_bn     with real+synthetic data: shared (one set of batch-norm layers) | split (the synthetic cells
                   through batch-norm layers of their own, AdvProp's auxiliary BN; scoring uses the real cells'
                   layers alone: hpcgan.classify.splitbn)
A composed regime is named by its preset when its axes are a preset's, else by its parts
("balanced+aug2", "original+synthetic(3x)+balanced+aug2"); every axis is recorded with the results.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F


SAMPLING = ("shuffled", "balanced")
LOSSES = ("ce", "weighted", "logit_adjust")
PRIOR_LOSSES = LOSSES[1:]   # the losses that weigh by the class counts (and so by the `prior` axis)
AXES = ("sampling", "loss", "augment", "synthetic_count", "real_share", "prior", "synthetic_bn")
PRIORS = ("all", "real")
SYNTHETIC_BN = ("shared", "split")
NEWER_AXES = {"prior": "all", "synthetic_bn": "shared"}   # axes that records (checkpoints, results) may predate: their value there
_COUNT = re.compile(r"(topup)|(\d+)|(\d+(?:\.\d+)?)x")


@dataclass(frozen=True)
class Regime:
    name: str
    data: str                 # "real" | "synthetic" | "real+synthetic"
    balanced_sampling: bool = False
    loss: str = "ce"          # "ce" | "weighted" | "logit_adjust"
    augment: str | None = None
    synthetic_count: str = "topup"    # real+synthetic: topup | N | Nx
    real_share: float | None = None   # balanced sampling of real+synthetic: share of a class's draws from real
    prior: str = "all"                # weighted / logit_adjust loss: the class counts of all | real images
    synthetic_bn: str = "shared"      # real+synthetic: the synthetic cells' batch norm, shared | split

    @property
    def reads_synthetic(self) -> bool:
        return "synthetic" in self.data

    @property
    def sampling(self) -> str:
        return "balanced" if self.balanced_sampling else "shuffled"

    def axes(self) -> dict:
        """Every axis of the regime (recorded with its results)."""
        return {"data": self.data, "sampling": self.sampling,
                "loss": self.loss, "augment": self.augment or "none", "synthetic_count": self.synthetic_count,
                "real_share": self.real_share, "prior": self.prior, "synthetic_bn": self.synthetic_bn}

    def synthetic_per_class(self, real_count: int, largest: int) -> int:
        """Synthetic images a class with `real_count` real ones takes (real+synthetic data)."""
        kind, value = parse_count(self.synthetic_count)
        if kind == "topup":
            return largest - real_count
        return int(value) if kind == "n" else int(math.floor(value * real_count + 0.5))   # halves round up


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
    """A preset, or a spec "PRESET axis=value ..." (a study grid's form) composed."""
    preset, axes = parse_spec(name)
    if preset not in REGIMES:
        raise ValueError(f"regime={preset!r}: choose one of {', '.join(REGIMES)}")
    return compose(preset, **axes) if axes else REGIMES[preset]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """"original+synthetic sampling=balanced augment=aug2" -> ("original+synthetic", {sampling:..., augment:...})."""
    first, *rest = str(spec).split()
    axes = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq or key not in AXES:
            raise ValueError(f"regime={spec!r}: {item!r} is not axis=value (axes: {', '.join(AXES)})")
        axes[key] = value
    return first, axes


def parse_count(value) -> tuple[str, float | None]:
    """synthetic_count: ("topup", None) | ("n", N) | ("x", F)."""
    m = _COUNT.fullmatch(str(value).strip())
    if not m:
        raise ValueError(f"synthetic_count={value!r}: topup, a number of images (90) or a multiple of the real "
                         "count (3x)")
    return ("topup", None) if m.group(1) else ("n", float(m.group(2))) if m.group(2) else ("x", float(m.group(3)))


def compose(preset: str, sampling: str | None = None, loss: str | None = None, augment: str | None = None,
            synthetic_count=None, real_share=None, prior=None, synthetic_bn=None, recipes=("aug1", "aug2", "aug3")) -> Regime:
    """The preset with the axes given (None: the preset's) overriding it; ValueError naming a bad one."""
    r = get_regime(preset)
    if sampling is not None and sampling not in SAMPLING:
        raise ValueError(f"sampling={sampling!r}: choose one of {', '.join(SAMPLING)}")
    if loss is not None and loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: choose one of {', '.join(LOSSES)}")
    if augment is not None and augment != "none" and augment not in recipes:
        raise ValueError(f"augment={augment!r}: choose none or a recipe ({', '.join(recipes)})")
    if synthetic_count is not None:
        parse_count(synthetic_count)
        _mixed_only(r, preset, f"synthetic_count={synthetic_count}")
    r = replace(r, balanced_sampling=r.balanced_sampling if sampling is None else sampling == "balanced",
                loss=loss or r.loss, augment=r.augment if augment is None else (None if augment == "none" else augment),
                synthetic_count=str(synthetic_count if synthetic_count is not None else r.synthetic_count).strip(),
                real_share=None if real_share is None else float(real_share), prior=prior or r.prior,
                synthetic_bn=synthetic_bn or r.synthetic_bn)
    if r.real_share is not None and not (r.balanced_sampling and r.data == "real+synthetic" and 0 < r.real_share <= 1):
        raise ValueError(f"real_share={real_share}: a share in (0, 1], with sampling=balanced and real+synthetic data")
    if r.prior not in PRIORS:
        raise ValueError(f"prior={prior!r}: choose one of {', '.join(PRIORS)}")
    if r.prior == "real":
        _mixed_only(r, preset, "prior=real changes nothing here")
    if r.synthetic_bn not in SYNTHETIC_BN:
        raise ValueError(f"synthetic_bn={synthetic_bn!r}: choose one of {', '.join(SYNTHETIC_BN)}")
    if r.synthetic_bn == "split":
        _mixed_only(r, preset, "synthetic_bn=split splits real from synthetic cells")
    return replace(r, name=label(r))


def _mixed_only(r: Regime, preset: str, setting: str) -> None:
    """ValueError unless `r` trains on real and synthetic data, the only data `setting` (an axis value) acts on."""
    if r.data != "real+synthetic":
        raise ValueError(f"{setting}: only for real+synthetic data (regime original+synthetic), not {preset}")


def check_final(r: Regime) -> Regime:
    """A regime as it will train (its loss final: after a rival's recipe filled it): ValueError where an axis
    changes nothing."""
    if r.prior == "real" and r.loss not in PRIOR_LOSSES:
        raise ValueError(f"prior=real changes nothing with loss={r.loss}: it weighs a weighted or logit_adjust loss "
                         f"(regime {r.name})")
    return r


def label(r: Regime) -> str:
    """The preset's name when the axes are a preset's, else its parts."""
    for name, p in REGIMES.items():
        if {**asdict(p), "name": None} == {**asdict(r), "name": None}:
            return name
    data = {"real": [], "synthetic": ["synthetic"], "real+synthetic": ["original+synthetic"]}[r.data]
    if r.data == "real+synthetic" and r.synthetic_count != "topup":
        data = [f"original+synthetic({r.synthetic_count})"]
    parts = [*data, *(["balanced"] if r.balanced_sampling else []),
             *({"weighted": ["weighted_loss"], "logit_adjust": ["logit_adjust"]}.get(r.loss, [])),
             *([r.augment] if r.augment else []),
             *([f"real_share={r.real_share:g}"] if r.real_share is not None else []),
             *(["real_prior"] if r.prior == "real" else []),
             *(["split_bn"] if r.synthetic_bn == "split" else [])]
    return "+".join(parts) or "original"


class RegimeLoss:
    """The training loss of a regime, given the training set's images per class (and its real images per class,
    which a regime with prior=real weighs by instead)."""

    def __init__(self, regime: Regime, class_counts, tau: float = 1.0, device="cpu", real_counts=None):
        if regime.prior == "real" and real_counts is None:
            raise ValueError(f"regime {regime.name}: prior=real needs the real images per class (real_counts)")
        counts = torch.as_tensor(real_counts if regime.prior == "real" else class_counts, dtype=torch.float64)
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
