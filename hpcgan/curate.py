"""Curation of generated cells (issue 20): keep those a judge trained on exactly what the GAN saw assigns to their
class with confidence, and drop near-copies of one of its training cells.

    python tools/generate.py run=RUN out=DIR balance=max shards=REAL curate=true [curate_confidence=0.5 ...]

The judge is a `cell` network (hpcgan.metrics.cell: the evaluation's small CNN) trained from scratch on the GAN's
own training samples, read through its run config (hpcgan.generate.trained_on): its shard set, its split and its
scarce cut, so never a cell the cut removed, never val, never test. It trains a fixed number of epochs and keeps
the last (choosing an epoch on val would read val), with cross-entropy weighted by the inverse class counts (a
class cut to 20 of 280 still gets its share of the judge's attention). A generated cell of class c is
  dropped "low_confidence"   when the judge's softmax probability of c is below `confidence`;
  dropped "near_copy"        when, in the judge's 256 features, it lies closer to a training cell than the
                             `copy_percentile`-th percentile of the training cells' distances to their nearest
                             other training cell (hpcgan.metrics.memorisation's rule and threshold);
  kept                       otherwise.
Cells are drawn in the class's latent order (hpcgan.generate.class_images) until the planned number is kept or
`max_draws` x that many were drawn; a shortfall is said and recorded. The synthetic manifest's "curation" holds the
judge (its training samples per class, epochs, train accuracy, copy threshold) and per class: wanted, drawn,
kept and the drops by reason; each kept image's entry its judge probability and nearest-training-cell distance.
Same checkpoint, seed and settings -> the same judge and the same cells (deterministic on the CPU).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

REASONS = ("low_confidence", "near_copy")


class CurationError(ValueError):
    """Curation cannot be done as asked; the message says why and what to do."""


@dataclass
class ClassTally:
    """One class's curation: images wanted, drawn and kept, and the drops by reason."""
    wanted: int
    drawn: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def as_dict(self) -> dict:
        return {"wanted": self.wanted, "drawn": self.drawn, "kept": self.kept, "dropped": dict(self.dropped),
                "short": self.wanted - self.kept}


class Judge:
    """A trained cell network with the features of the GAN's training cells and the copy threshold."""

    def __init__(self, net, classes: list[str], image_size: int, train_features: torch.Tensor,
                 confidence: float, copy_percentile: float | None, info: dict):
        from hpcgan.metrics.memorisation import copy_threshold
        self.net, self.classes, self.image_size = net.eval(), list(classes), image_size
        self.train_features, self.confidence = train_features, float(confidence)
        self.threshold = None   # the memorisation metric's threshold over the training cells themselves
        if copy_percentile is not None:
            self.threshold = copy_threshold(train_features, float(copy_percentile))
        self.info = {**info, "confidence": self.confidence, "copy_percentile": copy_percentile,
                     "copy_threshold": self.threshold}

    @torch.no_grad()
    def verdicts(self, images_u8: torch.Tensor, label: int) -> tuple[list[str | None], np.ndarray, np.ndarray]:
        """(per image: None to keep or the reason to drop; probability of `label`; nearest training-cell distance)."""
        from hpcgan.metrics.cell import to_input
        from hpcgan.metrics.memorisation import is_copy
        from hpcgan.metrics.prdc import nearest
        f = self.net.features(to_input(images_u8, self.image_size))
        p = F.softmax(self.net.head(f), dim=1)[:, label].numpy()
        distance, _ = nearest(f, self.train_features)
        copy = np.zeros(len(p), bool) if self.threshold is None else is_copy(distance, self.threshold)
        reasons = ["low_confidence" if pi < self.confidence else "near_copy" if c else None
                   for pi, c in zip(p, copy)]
        return reasons, p, distance


def train_judge(seen: dict | None, classes: list[str], image_size: int, *, confidence: float,
                copy_percentile: float | None, epochs: int, seed: int) -> Judge:
    """The judge of a GAN that trained on `seen` (hpcgan.generate.trained_on of its checkpoint)."""
    from hpcgan.metrics.cell import CellTrainSettings, build_net, default_arch, fit, to_input
    s = CellTrainSettings(epochs=epochs, seed=seed, device="cpu", backend="webdataset")   # deterministic
    x, y, (shards, split) = training_cells(seen, classes, "curate=true")
    counts = torch.bincount(y, minlength=len(classes)).float()
    weight = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * int((counts > 0).sum())), 0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net(default_arch(image_size), len(classes))
    fit(net, x, y, s, class_weight=weight)
    net.eval()
    with torch.no_grad():   # one pass: the features, and the head on them for the train accuracy
        feats = torch.cat([net.features(to_input(x[i:i + 256], image_size)) for i in range(0, len(x), 256)])
        right = net.head(feats).argmax(1) == y
    info = {"trained_on": {"shards": shards, "split": split, "scarce": seen.get("scarce"),
                           "scarce_seed": seen.get("scarce_seed")},
            "samples": {c: int(n) for c, n in zip(classes, counts.tolist()) if n},
            "epochs": epochs, "seed": seed, "train_accuracy": round(float(right.float().mean()), 4)}
    logger.info("curation judge: %d training cells of the GAN, train accuracy %.3f", len(x), info["train_accuracy"])
    return Judge(net, classes, image_size, feats, confidence, copy_percentile, info)


def training_cells(seen: dict | None, classes: list[str], who: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Exactly the cells a GAN trained on (`seen`: hpcgan.generate.trained_on of its checkpoint): its shard set, its
    split and its scarce cut, so never a cell the cut removed, never val or test. (uint8 [N, 3, S, S], labels [N],
    (shards, split)), decoded deterministically on the CPU. `who` names the option asking, for the errors."""
    from hpcgan.data.scarce import ScarceError, cut_split
    from hpcgan.data.shards import read_manifest
    from hpcgan.metrics.cell import CellTrainSettings, load_split
    shards, split = training_source(seen, who)
    try:
        if list(read_manifest(shards)["classes"]) != list(classes):
            raise CurationError(f"{who}: the GAN's shard set {shards} has other classes than its checkpoint")
        index, _ = cut_split(shards, split, seen.get("scarce"), int(seen.get("scarce_seed") or 0))
    except (FileNotFoundError, ScarceError) as e:
        raise CurationError(f"{who} needs the GAN's training cells ({shards}, split {split}): {e}") from None
    s = CellTrainSettings(device="cpu", backend="webdataset")
    x, y = load_split(shards, split, s, torch.device("cpu"), index=index)
    return x, y, (shards, split)


def training_source(seen: dict | None, who: str) -> tuple[str, str]:
    """(shard set, split) the GAN trained on, or a CurationError saying why it cannot be read back."""
    if not seen:
        raise CurationError(f"{who} needs to know what the GAN trained on, and this checkpoint's config does not "
                            "say (a run from before trained_on was recorded): retrain it, or generate without it")
    shards, split = seen["shards"], seen.get("split", "train")
    if isinstance(shards, (list, tuple)) or not isinstance(split, str):
        raise CurationError(f"{who}: the GAN trained on {shards} split {split}; only one shard set and one split "
                            "are supported (what reads them must see exactly what the GAN saw)")
    return str(shards), split


def curated(batches, judge: Judge, label: int, wanted: int, tally: ClassTally):
    """From `batches` (uint8 [B, 3, S, S], in latent index order), yield (index, image, p, distance) of each cell
    kept, until `wanted` are kept or the batches end; `tally` counts what was drawn, kept and dropped why."""
    index = 0
    for batch in batches:
        reasons, p, distance = judge.verdicts(batch, label)
        for img, why, pi, di in zip(batch, reasons, p, distance):
            tally.drawn += 1
            if why is None:
                tally.kept += 1
                yield index, img, float(pi), float(di)
            else:
                tally.dropped[why] += 1
            index += 1
            if tally.kept == wanted:
                return
