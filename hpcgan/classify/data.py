"""What a classifier trains on (one index over real and synthetic shards) and the splits it is judged on.

Training set of a regime (hpcgan.classify.regimes):
  real part       the real shard set's `train` split, whole, or with the scarce cut (hpcgan.data.scarce:
                  named classes reduced to N images) when `scarce` is given; a refit adds the whole `val` split
  synthetic part  from a synthetic shard set's `train` split, the first n images of each class in generation
                  order (tools/generate.py draws each class from its own stream, so the first n are exactly
                  what `per_class=n` would have written: the choice does not depend on the classifier seed):
                    original+synthetic  n_c by the regime's synthetic_count: topup (the default) = (largest
                                        real class) - (real images of c), real topped up to balance; N; or
                                        F x (real images of c); a synthetic set with fewer is an error
                                        naming the fix (classes the real train split lacks are never
                                        taken, in either)
                    synthetic           n = synthetic_per_class, default the smallest class of the set: every
                                        class equally; a class with none is an error
The result is one ShardIndex (hpcgan.data.loader) over the chosen samples, read with the loader's own epoch
plan (seeded by seed, epoch, rank; resumable mid-epoch with skip_batches; DALI or webdataset).
The `val` split selects the model (with `cut_val`, cut as the train split is: `val_cut`); the `test` split is decoded
only for the final score (`decode_split`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpcgan.classify.regimes import Regime
from hpcgan.data.loader import ShardIndex, ShardLoader, load_index, make_loader
from hpcgan.data.shards import MANIFEST, read_manifest, sha256_file

TRAIN_SPLIT = "train"


class DataError(ValueError):
    """The shards cannot make this regime's training set; the message says what to do."""


@dataclass
class TrainingSet:
    index: ShardIndex
    classes: list[str]
    image_size: int
    counts: dict[str, dict[str, int]]    # {"real": {class: n}, "synthetic": {class: n}}
    balanced_sampling: bool
    scarce: dict = field(default_factory=dict)   # the cut record (hpcgan.data.scarce), {} without a cut
    synthetic: np.ndarray | None = None          # [N] 1 where the sample is synthetic (real+synthetic data)
    real_share: float | None = None              # balanced sampling: share of a class's draws from real images

    def balance_share(self) -> tuple[np.ndarray, float] | None:
        """(group, share) for the loader's balanced sampling with the regime's real_share; None otherwise (a
        class's draws then fall on its real and synthetic images in proportion to their counts)."""
        if not self.balanced_sampling or self.synthetic is None or self.real_share is None:
            return None
        return self.synthetic, self.real_share

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.index.labels, minlength=len(self.classes))

    def describe(self) -> dict:
        """Images per class and source (the cut's content hashes go to their own file: scarce_record)."""
        cut = {c: {k: v for k, v in r.items() if k != "sha256"} for c, r in self.scarce.get("classes", {}).items()}
        return {"counts": self.counts, "n_train": len(self.index), "balanced_sampling": self.balanced_sampling,
                "per_class": dict(zip(self.classes, self.class_counts.tolist())),
                "scarce": {"seed": self.scarce["seed"], "classes": cut} if self.scarce else None}


def manifest_sha256(shards: str | Path) -> str:
    return sha256_file(Path(shards) / MANIFEST)


def first_per_class(labels: np.ndarray, wanted: dict[int, int]) -> np.ndarray:
    """Positions of the first wanted[c] samples of each class c (file order = generation order)."""
    return np.sort(np.concatenate([np.nonzero(labels == c)[0][:n] for c, n in wanted.items()] or [np.zeros(0, int)]))


def _counts(classes: list[str], labels: np.ndarray) -> dict[str, int]:
    return dict(zip(classes, np.bincount(labels, minlength=len(classes)).tolist()))


def synthetic_wanted(regime: Regime, real_counts: np.ndarray, syn_counts: np.ndarray, classes: list[str],
                     per_class: int | None) -> dict[int, int]:
    """How many synthetic images of each class (label -> n) the regime takes. Only classes the real train split
    has are taken: a GAN never saw the others (tools/generate.py skips them), and the test split has none."""
    present = [c for c in range(len(classes)) if real_counts[c] > 0]
    if regime.data == "real+synthetic":
        largest = int(real_counts.max())
        need = {c: regime.synthetic_per_class(int(real_counts[c]), largest) for c in present}
        short = {classes[c]: f"{int(syn_counts[c])} < {n}" for c, n in need.items() if syn_counts[c] < n}
        if short:
            how = ("top every class up to the largest real class" if regime.synthetic_count == "topup" else
                   f"give every class synthetic_count={regime.synthetic_count}")
            raise DataError(f"the synthetic set is too small to {how}: {short}; generate more with "
                            "`tools/generate.py per_class=N` or `balance=max shards=REAL`")
        return {c: n for c, n in need.items() if n > 0}
    empty = [classes[c] for c in present if syn_counts[c] == 0]
    if empty:
        raise DataError(f"regime {regime.name} trains on synthetic images of every class but the synthetic set has "
                        f"none of {empty}; generate one with `tools/generate.py per_class=N` (balance=max leaves "
                        "the largest class out)")
    fewest = int(min(syn_counts[c] for c in present))
    n = fewest if per_class is None else int(per_class)
    if fewest < n:
        raise DataError(f"synthetic_per_class={n} but the synthetic set has only {fewest} images of some class; "
                        "lower it or generate more")
    return {c: n for c in present}


def training_set(regime: Regime, shards: str | Path, synthetic: str | Path | None = None,
                 synthetic_per_class: int | None = None, scarce: dict[str, int] | None = None,
                 scarce_seed: int = 0, with_val: bool = False) -> TrainingSet:
    """The regime's training samples as one index (see the module docstring); `with_val`: the real part is the
    train split and then the whole val split (a refit, hpcgan.classify.refit; never with a scarce cut)."""
    from hpcgan.data.scarce import ScarceError, cut_split
    if with_val and scarce:
        raise DataError("a training set with the val split cannot keep a scarce cut (val's cells of a cut class "
                        "would undo it)")
    try:
        real, cut = cut_split(shards, TRAIN_SPLIT, scarce, scarce_seed)
    except ScarceError as e:
        raise DataError(str(e)) from None
    classes = list(real.classes)
    real_counts = np.bincount(real.labels, minlength=len(classes))   # the train split's: they size the synthetic part
    if with_val:
        real = real.concat(load_index(shards, "val"))
    counts = {"real": _counts(classes, real.labels) if "real" in regime.data else {},
              "synthetic": {}}
    index = real if "real" in regime.data else None
    if regime.reads_synthetic:
        if synthetic is None:
            raise DataError(f"regime {regime.name} needs synthetic=DIR (a synthetic shard set from tools/generate.py)")
        syn = load_index(synthetic, TRAIN_SPLIT)
        if list(syn.classes) != classes or syn.image_size != real.image_size:
            raise DataError(f"synthetic set {synthetic} has classes {syn.classes} at {syn.image_size} px, the real "
                            f"shards {classes} at {real.image_size} px: generate it for these shards")
        syn_counts = np.bincount(syn.labels, minlength=len(classes))
        chosen = syn.subset(first_per_class(syn.labels, synthetic_wanted(regime, real_counts, syn_counts, classes,
                                                                          synthetic_per_class)))
        counts["synthetic"] = _counts(classes, chosen.labels)
        mixed = None if index is None else np.r_[np.zeros(len(index), np.int8), np.ones(len(chosen), np.int8)]
        index = chosen if index is None else index.concat(chosen)
        return TrainingSet(index, classes, int(real.image_size), counts, regime.balanced_sampling, cut, mixed,
                           regime.real_share)
    if synthetic is not None:
        raise DataError(f"regime {regime.name} does not read a synthetic set: drop synthetic=")
    return TrainingSet(index, classes, int(real.image_size), counts, regime.balanced_sampling, cut)


def epoch_loader(ts: TrainingSet, batch_size: int, rank: int, world_size: int, *, seed: int, epoch: int,
                 skip_batches: int = 0, backend: str = "auto", device: str = "auto",
                 num_threads: int | None = None) -> ShardLoader:
    """One epoch of the training set, as make_loader would give it for a whole split (same plan, backends)."""
    return make_loader(None, TRAIN_SPLIT, batch_size, rank, world_size, seed=seed, epoch=epoch, shuffle=True,
                       balance_classes=ts.balanced_sampling, balance_share=ts.balance_share(), backend=backend,
                       device=device,
                       num_threads=num_threads, skip_batches=skip_batches, index=ts.index)


def val_cut(shards: str | Path, scarce: dict[str, int] | None) -> dict[str, int] | None:
    """The scarce cut carried to the val split: a class cut to N of its T train images keeps round(N V / T) of its V
    val images (halves up), at least 1 (what a lab with that few cells would validate on); a class with no val
    image is left out. None without a cut."""
    if not scarce:
        return None
    counts = read_manifest(shards).get("counts") or {}
    train, val = counts.get(TRAIN_SPLIT, {}), counts.get("val", {})
    share = {c: int(n) * val.get(c, 0) / train[c] if train.get(c) else int(n) for c, n in scarce.items()}
    return {c: min(val.get(c, 0), max(1, math.floor(x + 0.5))) for c, x in share.items() if val.get(c, 0)}


def decode_split(shards: str | Path, split: str, device: torch.device, backend: str = "auto",
                 num_threads: int | None = None, scarce: dict[str, int] | None = None,
                 scarce_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split decoded once through the loader: (uint8 [N, 3, S, S], int64 [N]) on `device`; with `scarce`,
    only what that cut of the split keeps (hpcgan.data.scarce, nested by `scarce_seed` as the train cut is)."""
    from hpcgan.data.scarce import ScarceError, cut_split
    from hpcgan.metrics.cell import CellTrainSettings, load_split
    man = read_manifest(shards)
    if not sum((man.get("counts") or {}).get(split, {}).values()):
        raise DataError(f"{shards}: the {split} split is empty; the classifier selects on val and scores on test "
                        "(shard with val_fraction > 0 and test_fraction > 0)")
    index = None
    if scarce:
        try:
            index = cut_split(shards, split, scarce, scarce_seed)[0]
        except ScarceError as e:
            raise DataError(f"the {split} split's cut: {e}") from None
    return load_split(shards, split, CellTrainSettings(backend=backend, num_threads=num_threads), device, index)
