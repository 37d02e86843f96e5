"""Stream a shard split into training batches: `make_loader` is the one function training calls.

Design (why it is built this way)
---------------------------------
Training must resume mid-epoch bit-identically, so the *sample plan* of an epoch -- which sample, in
which order, on which rank, mirrored or not -- is computed up front in numpy from
(seed, epoch, rank, world_size) alone (`epoch_plan`).  Both backends execute the same plan:

* ``dali``        (default where DALI imports): the plan feeds encoded image bytes, read by offset
                  through the ``.idx`` index, into a DALI pipeline via ``fn.external_source``; DALI
                  decodes (``mixed`` = nvJPEG on GPU, ``cpu`` without one), mirrors and normalises.
                  ``dali_source="reader"`` instead uses ``fn.readers.webdataset`` (``shard_id/num_shards``,
                  ``pad_last_batch``, reader shuffling, ``fn.random.coin_flip``); see dali_pipeline.py
                  for what that mode guarantees and what it does not.
* ``webdataset``  (fallback where DALI cannot run): the same plan through a PyTorch DataLoader that
                  reads the WebDataset tar members by offset and decodes with PIL.

Because the plan is shared, both backends yield the same samples in the same order (images equal up
to JPEG decoder rounding; PNG is exact), and ``skip_batches=k`` skips k batches *without decoding*.

Epoch plan semantics
--------------------
* N = samples of the split over all shard dirs (``.num_samples``).  An epoch draws N samples:
  - shuffle=True: a permutation of all N from ``np.random.default_rng([seed, epoch])``;
    shuffle=False: file order (dir, shard, sample);
  - balance_classes=True: each of the N draws picks a class uniformly among the classes present in
    the split, then the next sample of that class from a per-class shuffled cycle (a class is
    exhausted before any of its samples repeats; scarce classes repeat, abundant ones are
    subsampled).  Random (seeded) even when shuffle=False.
* Padding: with B = batch_size and W = world_size, every rank gets ceil(ceil(N / W) / B) full
  batches; the epoch order is extended to W * that * B samples by repeating it from its start
  (the first samples of the epoch's order are the ones seen twice, like torch's DistributedSampler).
* Rank r takes positions r, r + W, r + 2W, ... of the padded order, so ranks are disjoint apart
  from the padding and together cover the split.
* Flips (flip=True): a per-position coin from the same seeded generator, so a resumed epoch mirrors
  the same samples.
* ``len(loader)`` = batches this loader yields = epoch batches - skip_batches; the full count is
  ``.epoch_batches`` (identical on every rank).
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hpcgan import dist
from hpcgan.data.shards import IMAGE_EXTS, decode_label, read_manifest, shard_paths

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "dali", "webdataset")
_logged_once: set[str] = set()


def _log_once(key: str, level: int, msg: str, *args) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        logger.log(level, msg, *args)


# ----------------------------------------------------------------------------------------------
# Sample index: where every sample's image and label live (from the .idx files)
# ----------------------------------------------------------------------------------------------

@dataclass
class ShardIndex:
    """All samples of one split over one or more shard dirs, in file order."""

    tars: list[Path]           # every tar, in order
    tar_of: np.ndarray         # [N] int32 index into tars
    offset: np.ndarray         # [N] int64 image member data offset in its tar
    size: np.ndarray           # [N] int64 image member size
    ext: list[str]             # [N] "png" | "jpg"
    labels: np.ndarray         # [N] int64
    classes: list[str]
    image_size: int

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep) -> "ShardIndex":
        """The samples `keep` (positions, in this order)."""
        keep = np.asarray(keep, np.int64)
        return ShardIndex(self.tars, self.tar_of[keep], self.offset[keep], self.size[keep],
                          [self.ext[i] for i in keep], self.labels[keep], self.classes, self.image_size)

    def concat(self, other: "ShardIndex") -> "ShardIndex":
        """This index's samples, then `other`'s (same classes and image size, else ValueError)."""
        if self.classes != other.classes or self.image_size != other.image_size:
            raise ValueError(f"shard sets disagree: classes {self.classes} / {other.classes}, size "
                             f"{self.image_size} / {other.image_size}; use a synthetic set generated for these "
                             "real shards")
        return ShardIndex(self.tars + other.tars,
                          np.concatenate([self.tar_of, other.tar_of + len(self.tars)]).astype(np.int32),
                          np.concatenate([self.offset, other.offset]), np.concatenate([self.size, other.size]),
                          self.ext + other.ext, np.concatenate([self.labels, other.labels]), self.classes,
                          self.image_size)

    def read_image_bytes(self, i: int, files: dict) -> bytes:
        """Encoded image of sample i; `files` caches open file descriptors (per process/thread)."""
        t = int(self.tar_of[i])
        fd = files.get(t)
        if fd is None:
            fd = files[t] = os.open(self.tars[t], os.O_RDONLY)
        return os.pread(fd, int(self.size[i]), int(self.offset[i]))

    @staticmethod
    def close_files(files: dict) -> None:
        """Close the descriptors read_image_bytes opened (plain ints: garbage collection does not close them)."""
        for fd in files.values():
            os.close(fd)
        files.clear()


def _parse_idx(idx_path: Path) -> list[dict[str, tuple[int, int]]]:
    """wds2idx v1.2: header 'v1.2 N', then per sample 'ext offset size name' repeated."""
    lines = idx_path.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2"):
        raise ValueError(f"{idx_path}: not a DALI webdataset index (v1.2); rebuild the shards with tools/shard.py")
    out = []
    for line in lines[1:]:
        if not line.strip():
            continue
        parts = line.split()
        comps = {}
        for j in range(0, len(parts), 4):
            comps[parts[j]] = (int(parts[j + 1]), int(parts[j + 2]))
        out.append(comps)
    return out


def _as_dirs(shards) -> list[Path]:
    if isinstance(shards, (str, os.PathLike)):
        return [Path(shards)]
    dirs = [Path(s) for s in shards]
    if not dirs:
        raise ValueError("make_loader: empty list of shard directories")
    return dirs


_INDEX_CACHE: dict[tuple, ShardIndex] = {}


def as_splits(split: str | Sequence[str]) -> tuple[str, ...]:
    """One split name or several (e.g. ["train", "val"] for a GAN that no classifier will be scored with)."""
    splits = (split,) if isinstance(split, str) else tuple(split)
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"split={split!r}: give a split name or a list of distinct names")
    return splits


def load_index(shards, split: str | Sequence[str]) -> ShardIndex:
    """Read manifests and .idx files of `split` (one name or several) in every dir; check they agree on
    classes and size. With several splits a dir contributes those it has (a synthetic set has only train),
    in the order given; a dir with none of them is an error.

    Cached per process (training builds a loader every epoch): the key includes every tar's and
    index's size and mtime, so a rebuilt shard set is read again.
    """
    dirs, splits = _as_dirs(shards), as_splits(split)
    key = (splits, *(_dir_state(d, sp) for d in dirs for sp in splits))
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()  # keep one entry per process: the split in use
        _INDEX_CACHE[key] = _load_index(dirs, splits)
    return _INDEX_CACHE[key]


def _dir_state(d: Path, split: str) -> tuple:
    files = [d / "manifest.json", *shard_paths(d, split)] if d.is_dir() else []
    files += [f.with_suffix(".idx") for f in files[1:]]
    return (str(d.resolve()),) + tuple((f.name, st.st_size, st.st_mtime_ns) for f in files
                                       if (st := _stat(f)) is not None)


def _stat(f: Path):
    try:
        return f.stat()
    except OSError:
        return None


def _load_index(dirs: list[Path], splits: tuple[str, ...]) -> ShardIndex:
    classes = image_size = None
    tars: list[Path] = []
    tar_of, offs, sizes, exts, label_locs = [], [], [], [], []
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"shard directory {d} does not exist; build it with tools/shard.py")
        man = read_manifest(d)
        if classes is None:
            classes, image_size, first = list(man["classes"]), int(man["image_size"]), d
        elif list(man["classes"]) != classes:
            raise ValueError(f"shard dirs disagree on classes: {first} has {classes}, {d} has {man['classes']}; "
                             "only shard sets built with the same taxonomy can be mixed")
        elif int(man["image_size"]) != image_size:
            raise ValueError(f"shard dirs disagree on image size: {first} is {image_size}px, {d} is "
                             f"{man['image_size']}px; shard both at the same size")
        paths, listed = _split_tars(d, man, splits)
        for tar in paths:
            idx = tar.with_suffix(".idx")
            if not idx.is_file():
                raise FileNotFoundError(f"{idx} missing: every tar needs its DALI index "
                                        "(hpcgan.data.shards.write_idx)")
            t = len(tars)
            tars.append(tar)
            samples = _parse_idx(idx)
            if listed.get(tar.name) not in (None, len(samples)):
                raise ValueError(f"{idx}: {len(samples)} samples but the manifest says {listed[tar.name]}; "
                                 "the index is stale, rebuild the shard set")
            for k, comps in enumerate(samples):
                ext = next((e for e in IMAGE_EXTS if e in comps), None)
                if ext is None or "label" not in comps:
                    raise ValueError(f"{tar}: sample {k} lacks an image ({'/'.join(IMAGE_EXTS)}) or label member")
                tar_of.append(t)
                offs.append(comps[ext][0])
                sizes.append(comps[ext][1])
                exts.append(ext)
                label_locs.append(comps["label"][0])
    labels = _read_labels(tars, np.asarray(tar_of), np.asarray(label_locs))
    bad = (labels < 0) | (labels >= len(classes))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} samples have labels outside 0..{len(classes) - 1}")
    return ShardIndex(tars, np.asarray(tar_of, np.int32), np.asarray(offs, np.int64),
                      np.asarray(sizes, np.int64), exts, labels, classes, image_size)


def _split_tars(d: Path, man: dict, splits: tuple[str, ...]) -> tuple[list[Path], dict]:
    """The tars of the wanted splits in `d` (checked against its manifest) and their listed counts."""
    paths, listed = [], {}
    for split in splits:
        found = shard_paths(d, split)
        names = {s["name"]: s.get("count") for s in (man.get("shards") or {}).get(split, [])}
        if names and sorted(names) != [p.name for p in found]:
            raise ValueError(f"{d}: manifest lists {split} shards {sorted(names)} but the directory has "
                             f"{[p.name for p in found]}; the shard set is incomplete or mixed, rebuild it")
        paths += found
        listed.update(names)
    if not paths:
        have = sorted({p.name.split("-")[0] for p in d.glob("*-[0-9]*.tar")})
        wanted = splits[0] if len(splits) == 1 else list(splits)
        raise FileNotFoundError(f"{d}: no shards for split {wanted!r} (found splits: {have or 'none'})")
    return paths, listed


def _read_labels(tars: list[Path], tar_of: np.ndarray, locs: np.ndarray) -> np.ndarray:
    labels = np.empty(len(locs), np.int64)
    for t, tar in enumerate(tars):
        sel = np.nonzero(tar_of == t)[0]
        with open(tar, "rb") as f:
            for i in sel:
                f.seek(int(locs[i]))
                labels[i] = decode_label(f.read(8))
    return labels


# ----------------------------------------------------------------------------------------------
# Epoch plan: the deterministic function of (seed, epoch, rank, world_size)
# ----------------------------------------------------------------------------------------------

@dataclass
class EpochPlan:
    indices: np.ndarray  # [epoch_batches * B] sample indices for this rank, in order
    flips: np.ndarray    # [epoch_batches * B] uint8, 1 = mirror horizontally
    epoch_batches: int


def batches_per_rank(n: int, batch_size: int, world_size: int) -> int:
    per_rank = -(-n // world_size)
    if batch_size > per_rank:
        raise ValueError(f"batch_size {batch_size} exceeds the samples per rank: the split has {n} samples "
                         f"over {world_size} rank(s) = {per_rank} per rank, which cannot fill one batch; "
                         "lower batch_size, use fewer ranks, or add data")
    return -(-per_rank // batch_size)


def _cycle(members: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws from `members`: shuffled cycles, each member used once before any repeats."""
    reps = -(-n // len(members))
    return np.concatenate([rng.permutation(members) for _ in range(reps)])[:n]


def _balanced_order(labels: np.ndarray, n: int, rng: np.random.Generator,
                    share: tuple[np.ndarray, float] | None = None) -> np.ndarray:
    """Classes uniformly; within a class, with `share` = (group, f): a draw is from the class's group-0 members
    (real images) with probability f, else from its group-1 ones (synthetic), each group in its own cycle."""
    present = np.unique(labels)
    draws = present[rng.integers(len(present), size=n)]
    order = np.empty(n, np.int64)
    for c in present:
        where = np.nonzero(draws == c)[0]
        members = np.nonzero(labels == c)[0]
        if share is None:
            order[where] = _cycle(members, len(where), rng)
            continue
        group, f = share
        real, syn = members[group[members] == 0], members[group[members] == 1]
        from_real = rng.random(len(where)) < f if len(real) and len(syn) else np.full(len(where), len(real) > 0)
        for pick, pool in ((from_real, real), (~from_real, syn)):
            if pick.any():
                order[where[pick]] = _cycle(pool, int(pick.sum()), rng)
    return order


def epoch_plan(labels: np.ndarray, batch_size: int, rank: int, world_size: int, *, seed: int, epoch: int,
               shuffle: bool, flip: bool, balance_classes: bool,
               balance_share: tuple[np.ndarray, float] | None = None) -> EpochPlan:
    n = len(labels)
    nb = batches_per_rank(n, batch_size, world_size)
    rng = np.random.default_rng([seed, epoch])
    if balance_classes:
        order = _balanced_order(labels, n, rng, balance_share)
    elif shuffle:
        order = rng.permutation(n)
    else:
        order = np.arange(n)
    total = nb * batch_size * world_size
    padded = np.resize(order, total)  # repeats the order from its start
    # Flip coins for every padded position, drawn on every rank alike, so they depend on position only.
    coins = rng.integers(0, 2, size=total, dtype=np.uint8) if flip else np.zeros(total, np.uint8)
    return EpochPlan(padded[rank::world_size].astype(np.int64), coins[rank::world_size], nb)


# ----------------------------------------------------------------------------------------------
# Backend / device choice
# ----------------------------------------------------------------------------------------------

def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (missing shared libs) on this platform
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}")
    if backend == "webdataset":
        return backend
    ok, why = dali_available()
    if ok:
        return "dali"
    if backend == "dali":
        raise RuntimeError(f"backend='dali' requested but DALI cannot be imported here ({why}); "
                           "install nvidia-dali for this platform or use backend='webdataset'")
    _log_once("fallback", logging.WARNING,
              "DALI unavailable (%s): falling back to the webdataset backend (PIL decode, slower)", why)
    return "webdataset"


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda': where decoded batches go (hpcgan.dist.resolve_device's rule; the GPU is the current one)."""
    return dist.resolve_device(device).type


def default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


# ----------------------------------------------------------------------------------------------
# The loader object
# ----------------------------------------------------------------------------------------------

class ShardLoader:
    """One epoch of one rank. Iterate to get (images float32 [B,3,S,S] in [-1,1], labels int64 [B])."""

    def __init__(self, index: ShardIndex, plan: EpochPlan | None, *, split: str, batch_size: int, rank: int,
                 world_size: int, seed: int, epoch: int, shuffle: bool, flip: bool, balance_classes: bool,
                 backend: str, device: str, num_threads: int, skip_batches: int, dali_source: str):
        self.index = index
        self.plan = plan
        self.split = split
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch = seed, epoch
        self.shuffle, self.flip, self.balance_classes = shuffle, flip, balance_classes
        self.backend = backend
        self.device = device
        self.num_threads = num_threads
        self.skip_batches = skip_batches
        self.dali_source = dali_source
        self.classes = index.classes
        self.image_size = index.image_size
        self.num_samples = len(index)
        self.epoch_batches = plan.epoch_batches if plan is not None else batches_per_rank(
            len(index), batch_size, world_size)

    def __len__(self) -> int:
        return self.epoch_batches - self.skip_batches

    def planned_batches(self):
        """(indices, flips) of each batch still to come -- what the backends execute."""
        b = self.batch_size
        for k in range(self.skip_batches, self.epoch_batches):
            yield self.plan.indices[k * b:(k + 1) * b], self.plan.flips[k * b:(k + 1) * b]

    def __iter__(self):
        if self.backend == "dali":
            from hpcgan.data.dali_pipeline import iterate_dali
            return iterate_dali(self)
        return _iterate_torch(self)

    def __repr__(self) -> str:
        return (f"ShardLoader(split={self.split!r}, backend={self.backend!r}, device={self.device!r}, "
                f"samples={self.num_samples}, batches={len(self)}/{self.epoch_batches}, "
                f"rank={self.rank}/{self.world_size})")


def make_loader(shards: str | os.PathLike | Sequence[str | os.PathLike], split: str | Sequence[str], batch_size: int,
                rank: int = 0, world_size: int = 1, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                flip: bool = False, balance_classes: bool = False, backend: str = "auto",
                device: str = "auto", num_threads: int | None = None, skip_batches: int = 0,
                dali_source: str = "index", index: ShardIndex | None = None,
                balance_share: tuple[np.ndarray, float] | None = None) -> ShardLoader:
    """One epoch of `split` (a name, or several read as one: ["train", "val"]) for `rank` of `world_size`
    (see the module docstring for the exact semantics).

    index: the samples to read instead of the whole split (load_index(shards, split) with .subset/.concat:
    a scarce cut, real + synthetic); `split` then only names them.
    balance_share: with balance_classes, (group [N] of 0/1, f): a class's draws come from its group-0 samples
    with probability f (a classifier's real share of real + synthetic).

    dali_source: "index" (default; exact plan, skip without decode, balance_classes) or "reader"
    (fn.readers.webdataset; order decided by DALI, see dali_pipeline.py).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    if dali_source not in ("index", "reader"):
        raise ValueError(f"dali_source={dali_source!r}: choose 'index' or 'reader'")
    if index is None:
        index = load_index(shards, split)
    backend = resolve_backend(backend)
    device = resolve_device(device)
    threads = default_threads() if num_threads is None else int(num_threads)
    use_reader = backend == "dali" and dali_source == "reader"
    if use_reader and balance_classes:
        raise ValueError("balance_classes needs weighted sampling, which fn.readers.webdataset cannot do; "
                         "use dali_source='index'")
    plan = None if use_reader else epoch_plan(
        index.labels, batch_size, rank, world_size, seed=seed, epoch=epoch, shuffle=shuffle, flip=flip,
        balance_classes=balance_classes, balance_share=balance_share)
    nb = plan.epoch_batches if plan is not None else batches_per_rank(len(index), batch_size, world_size)
    if not (0 <= skip_batches <= nb):
        raise ValueError(f"skip_batches={skip_batches} outside [0, {nb}] (batches in this epoch)")
    loader = ShardLoader(index, plan, split=split, batch_size=batch_size, rank=rank, world_size=world_size,
                         seed=seed, epoch=epoch, shuffle=shuffle, flip=flip, balance_classes=balance_classes,
                         backend=backend, device=device, num_threads=threads, skip_batches=skip_batches,
                         dali_source=dali_source if backend == "dali" else "index")
    if backend == "dali":
        decode = "mixed (GPU)" if device == "cuda" else "cpu"
        _log_once(f"dali-{decode}-{loader.dali_source}", logging.INFO,
                  "data loader: DALI backend (%s source), decode on %s", loader.dali_source, decode)
    else:
        _log_once(f"wds-{device}", logging.INFO, "data loader: webdataset backend, PIL decode, output on %s", device)
    return loader


# ----------------------------------------------------------------------------------------------
# webdataset backend: the plan through a PyTorch DataLoader, PIL decode
# ----------------------------------------------------------------------------------------------

class _PlannedSamples(torch.utils.data.Dataset):
    """Map-style view of the shard tars: item (sample index, flip) -> (uint8 CHW tensor, label)."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self._files: dict = {}  # per worker process: opened lazily after fork

    def __len__(self):
        return len(self.index)

    def close(self):
        self.index.close_files(self._files)

    def __getitem__(self, item):
        import io

        from PIL import Image
        i, mirror = item
        data = self.index.read_image_bytes(i, self._files)
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
        s = self.index.image_size
        if arr.shape[:2] != (s, s):
            raise ValueError(f"{self.index.tars[self.index.tar_of[i]]}: image is {arr.shape[1]}x{arr.shape[0]}, "
                             f"manifest says {s}x{s}")
        if mirror:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), int(self.index.labels[i])


def _collate(items):
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items], dtype=torch.int64)
    return images, labels


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT/SIGUSR2 to the training process, which checkpoints and then
    stops them: Slurm signals every process of a job step, and a worker dying of it would fail the run.
    The workers are forked with these signals blocked (see _start_workers), so one that arrives while a
    worker starts is discarded here instead of killing it."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _start_workers(dl: torch.utils.data.DataLoader):
    """iter(dl) with the stop signals blocked while the workers fork; the parent gets any pending one after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(dl)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _iterate_torch(loader: ShardLoader):
    batches = [list(zip(idx.tolist(), fl.tolist())) for idx, fl in loader.planned_batches()]
    if not batches:
        return
    workers = min(loader.num_threads, len(batches)) if loader.num_threads > 1 else 0
    cuda = loader.device == "cuda"
    samples = _PlannedSamples(loader.index)  # workers get copies and their own descriptors
    dl = torch.utils.data.DataLoader(samples, batch_sampler=batches, num_workers=workers,
                                     collate_fn=_collate, pin_memory=cuda, worker_init_fn=_ignore_stop_signals,
                                     persistent_workers=False, prefetch_factor=4 if workers else None)
    it = None
    try:
        it = _start_workers(dl)
        for images, labels in it:
            if cuda:
                images = images.to("cuda", non_blocking=True)
                labels = labels.to("cuda", non_blocking=True)
            # Same arithmetic as DALI's normalisation: (x - 127.5) / 127.5 maps 0..255 onto [-1, 1].
            yield images.float().sub_(127.5).div_(127.5), labels
    finally:
        # stop the workers now, not when the iterator is collected: a traceback that keeps this frame (a bad
        # image's error, caught and kept by the caller) would keep them alive and hang the interpreter's exit
        try:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        finally:
            samples.close()
