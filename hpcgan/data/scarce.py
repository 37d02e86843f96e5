"""The scarce cut: named classes of a split reduced to N images, for the scarcity study.

    scarce={monocyte: 20, eosinophil: 20}      (scarce_seed: which cut; default the run's seed)

The images kept of class c are the first N of the class's images ordered by blake2b(f"{seed}/{content hash}"),
the content hash being each sample's `sha256` metadata (of its original file). So the cut
  * is fixed by (seed, the class's images): it does not depend on the shard files' order, the other classes
    or the number of ranks, and a GAN and a classifier given the same scarce= and seed cut alike;
  * is nested: for one seed the 10 kept are among the 30 kept (a prefix of the same order).
The classes not named are untouched. Asking for more images than a class has is an error.
`cut_record` is what a run writes (scarce.json): per class N, the images available and the content hashes
kept, in cut order.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np

from hpcgan.data.shards import shard_paths


class ScarceError(ValueError):
    """A scarce cut that cannot be made; the message says why."""


def sample_hashes(shard_dir: str | Path, split: str) -> list[str]:
    """The `sha256` metadata of every sample of a split, in file order (the order of hpcgan.data.loader's index)."""
    out = []
    for tar in shard_paths(shard_dir, split):
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    out.append(str(json.loads(tf.extractfile(m).read()).get("sha256") or ""))
    return out


def cut_order(hashes: list[str], seed: int) -> np.ndarray:
    """Positions of `hashes` in the cut's order for `seed`."""
    keys = [hashlib.blake2b(f"{seed}/{h}".encode(), digest_size=8).digest() for h in hashes]
    return np.array(sorted(range(len(hashes)), key=keys.__getitem__), dtype=np.int64)


def unknown_classes(scarce: dict[str, int] | None, classes: list[str]) -> str | None:
    """What is wrong with a cut naming classes that are not in `classes` (with the nearest name), or None."""
    import difflib
    unknown = sorted(set(scarce or {}) - set(classes), key=str)
    if not unknown:
        return None
    near = difflib.get_close_matches(str(unknown[0]), list(classes), n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"scarce: unknown classes {unknown}{hint}; the classes are {list(classes)}"


def scarce_keep(labels: np.ndarray, hashes: list[str], classes: list[str], scarce: dict[str, int] | None,
                seed: int) -> tuple[np.ndarray, dict]:
    """(positions kept, in file order; the cut record) of a split with `labels` and content `hashes`."""
    labels = np.asarray(labels)
    if len(hashes) != len(labels):
        raise ScarceError(f"{len(hashes)} content hashes for {len(labels)} samples: the shard set is inconsistent")
    if not scarce:
        return np.arange(len(labels)), {}
    problem = unknown_classes(scarce, classes)
    if problem:
        raise ScarceError(problem)
    drop, record = [], {"seed": int(seed), "classes": {}}
    for name, n in scarce.items():
        members = np.nonzero(labels == classes.index(name))[0]
        if int(n) < 1 or int(n) > len(members):
            raise ScarceError(f"scarce: {name}={n}, but its split has {len(members)} images; give 1..{len(members)}")
        member_hashes = [hashes[i] for i in members]
        if any(not h for h in member_hashes):
            raise ScarceError(f"scarce: some {name} samples carry no sha256 metadata; rebuild the shards with "
                              "tools/shard.py")
        order = members[cut_order(member_hashes, seed)]
        drop.append(order[int(n):])
        record["classes"][name] = {"n": int(n), "available": len(members),
                                   "sha256": [hashes[i] for i in order[:int(n)]]}
    keep = np.setdiff1d(np.arange(len(labels)), np.concatenate(drop))
    return keep, record


def cut_split(shard_dir: str | Path, split: str, scarce: dict[str, int] | None, seed: int):
    """(the split's ShardIndex with the scarce cut applied, the cut record): what a GAN (hpcgan.train) and a
    classifier (hpcgan.classify) given the same scarce= and seed both train on."""
    from hpcgan.data.loader import load_index
    index = load_index(shard_dir, split)
    if not scarce:
        return index, {}
    keep, record = scarce_keep(index.labels, sample_hashes(shard_dir, split), list(index.classes), scarce, seed)
    return index.subset(keep), record
