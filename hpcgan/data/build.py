"""Build a shard set from the cell-image sources: walk, clean, de-duplicate, split, write.

    manifest = build({"pbc": "/data/PBC", "lab": "/data/ours"}, "shards/real128", size=128)

Decisions (also in configs/shard.yaml):
- Exact duplicates: identical decoded RGB pixels (so the same image saved as PNG and TIFF is caught);
  each sample still records the sha256 of its original file bytes.
- Near duplicates: perceptual hash (imagehash.phash of the decoded original) within `near_dup`
  Hamming distance (-1 disables). Duplicates form groups (connected components); the first member
  by sorted path is kept. A group whose members carry different 12-class labels is dropped entirely:
  we cannot know which label is right.
- Split per 12-class, deterministic by seed: test = round(test_fraction * n) (default 30%) but at least 1
  when the class has any image (unless test_fraction = 0) and at most n-1 when it has 2 or more (so 1 image
  -> test, 2 -> 1 train + 1 test); val = round(val_fraction * the rest) (default 20%) but at most rest-1
  (train keeps at least one).
- Output appears atomically (hpcgan.fsutil.atomic_dir); with on_bad=strict any bad file aborts
  the run before anything is written.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

import hpcgan
from hpcgan.data.clean import CleanSettings, process_file
from hpcgan.data.shards import MANIFEST, SPLITS, ShardWriter, write_manifest
from hpcgan.data.sources import Rejection, SourceError, SourceFile, walk_source
from hpcgan.data.taxonomy import SOURCES, Taxonomy
from hpcgan.data.workers import cores, ordered_map
from hpcgan.fsutil import atomic_dir, sweep_stale_staging
from hpcgan.images import check_image_size
from hpcgan.progress import Progress
from hpcgan.settings import MISSING, SettingsError, check_choice, check_range

logger = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The dataset cannot be built as asked; the message says what to fix. Nothing was written."""


@dataclass(frozen=True)
class BuildSettings:
    """How source images become shards; recorded as the manifest's `settings`. The defaults are these
    (configs/shard.yaml documents the same values, tests/test_settings_files.py keeps them equal)."""
    size: int = 128
    seed: int = 0
    shard_size: int = 1000
    stain: str = "macenko"
    encoding: str = "png"
    quality: int = 95
    near_dup: int = 4
    min_size: int = 32
    on_bad: str = "skip"
    test_fraction: float = 0.3      # per class; 0 = no test split (e.g. shards only a GAN will ever read)
    val_fraction: float = 0.2       # of what is left after test; 0 = no val split
    crop: float = 1.0               # the centred square's side kept before the resize: < 1 zooms on the
                                    # centred cell (PBC: the cell fills about the central half of the field)

    def __post_init__(self) -> None:
        check_image_size(self.size, "size")
        check_range("test_fraction", self.test_fraction, 0.0, 0.9)
        check_range("val_fraction", self.val_fraction, 0.0, 0.9)
        check_range("seed", self.seed, 0)
        check_range("shard_size", self.shard_size, 1)
        check_choice("stain", self.stain, ("macenko", "none"))
        check_choice("encoding", self.encoding, ("png", "jpg"))
        check_range("quality", self.quality, 1, 100)
        check_range("near_dup", self.near_dup, -1, 64)   # -1: near-duplicate detection off
        check_range("min_size", self.min_size, 1)
        check_choice("on_bad", self.on_bad, ("skip", "strict"))
        check_range("crop", self.crop, 0.1, 1.0)

    def clean(self) -> CleanSettings:
        return CleanSettings(self.size, self.stain, self.encoding, self.quality, self.min_size, self.crop)


@dataclass(frozen=True)
class ShardSettings(BuildSettings):
    """Everything tools/shard.py takes (configs/shard.yaml): the sources, the output and how to run."""
    pbc: str | None = None
    aml: str | None = None
    lab: str | None = None
    out: str = MISSING
    workers: int | None = None      # None: all cores
    progress: bool = True
    contact_sheet: bool = True
    taxonomy: str | None = None     # None: configs/data/taxonomy.yaml
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.workers is not None:
            check_range("workers", self.workers, 1)
        check_choice("log_level", self.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"))

    @property
    def sources(self) -> dict[str, str]:
        return {k: str(getattr(self, k)) for k in SOURCES if getattr(self, k) not in (None, "")}

    def build_settings(self) -> BuildSettings:
        return BuildSettings(**{f.name: getattr(self, f.name) for f in fields(BuildSettings)})


# ---------------------------------------------------------------- small pure helpers

def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_counts(n: int, test_fraction: float = 0.3, val_fraction: float = 0.2) -> tuple[int, int, int]:
    """(train, val, test) sizes for a class of n images (rule in the module docstring)."""
    if n <= 0:
        return 0, 0, 0
    n_test = max(1, round_half_up(test_fraction * n)) if test_fraction > 0 else 0
    if n >= 2:
        n_test = min(n_test, n - 1)
    rest = n - n_test
    n_val = min(round_half_up(val_fraction * rest), max(rest - 1, 0))
    return rest - n_val, n_val, n_test


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):          # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    return _POPCOUNT8[x.view(np.uint8).reshape(-1, 8)].sum(axis=1)


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def near_pairs(hashes: list[int], threshold: int) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming distance <= threshold, exactly, sorted.

    Pigeonhole: split the 64 bits into threshold+1 blocks; two hashes within the threshold agree
    on at least one block, so only hashes sharing a block value are compared. Vectorised: per block the
    hashes are sorted by block value and each is compared with the 1st, 2nd, ... next member of its group,
    so the work is the number of candidate pairs (not n^2) and no Python loop runs per pair.
    """
    n = len(hashes)
    if threshold < 0 or n < 2:
        return []
    h = np.array(hashes, dtype=np.uint64)
    n_blocks = min(threshold + 1, 64)
    edges = [int(e) for e in np.linspace(0, 64, n_blocks + 1)]
    found = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        key = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        end = np.repeat(np.r_[starts[1:], n], np.diff(np.r_[starts, n]))   # group end of each sorted position
        pos = np.arange(n)
        for d in range(1, n):
            pos = pos[pos + d < end[pos]]       # positions whose group has a member d further on
            if not len(pos):
                break
            a, b = order[pos], order[pos + d]
            dist = _popcount(h[a] ^ h[b])
            close = dist <= threshold
            if close.any():
                found.append(np.stack([np.minimum(a, b)[close], np.maximum(a, b)[close], dist[close]], axis=1))
    if not found:
        return []
    pairs = np.unique(np.concatenate(found), axis=0)    # a pair agreeing on several blocks is found once each
    return [(int(i), int(j), int(d)) for i, j, d in pairs]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)   # root = smallest index = first by sorted path


# ---------------------------------------------------------------- stages

def _walk_all(sources: dict[str, str], taxonomy: Taxonomy, on_bad: str):
    files: list[SourceFile] = []
    rejected: list[Rejection] = []
    for name in sorted(sources):
        try:
            f, r = walk_source(name, sources[name], taxonomy)
        except SourceError as e:
            raise BuildError(str(e)) from None
        if not f:
            msg = f"source {name}={sources[name]} has no image files in class folders"
            if on_bad == "strict":
                raise BuildError(msg + " (on_bad=strict)")
            logger.warning(msg)
        files += f
        rejected += r
    if not files:
        raise BuildError("no image files found in any source: " +
                         ", ".join(f"{k}={v}" for k, v in sorted(sources.items())))
    files.sort(key=lambda s: s.path)
    return files, rejected


def _process_all(files: list[SourceFile], spool: Path, settings: BuildSettings, workers: int,
                 progress: bool) -> list[dict]:
    """Decode, normalise, resize and hash every file; results in `files` order whatever the workers do."""
    clean = settings.clean()
    tasks = [(i, f.abspath, str(spool / f"{i:08d}"), clean) for i, f in enumerate(files)]
    results: list[dict] = []
    chunk = max(1, min(32, len(tasks) // (max(workers, 1) * 8)))
    bar = Progress(len(tasks), "shard", "img", bar=progress)
    try:
        with ordered_map(workers, chunksize=chunk) as pmap:
            for r in pmap(process_file, tasks):
                results.append(r)
                bar.update()
    finally:
        bar.close()
    return results


def _dedupe(items: list[dict], threshold: int) -> tuple[list[dict], list[dict], int]:
    """items sorted by path -> (kept items, duplicates.csv rows, conflicting-label groups)."""
    uf = _UnionFind(len(items))
    by_pixels: dict[str, int] = {}
    for i, it in enumerate(items):
        first = by_pixels.setdefault(it["pixel_sha256"], i)
        if first != i:
            uf.union(first, i)
    hashes = [int(it["phash"], 16) for it in items]
    reps = sorted(set(by_pixels.values()))   # exact copies add nothing to the near search but pairs
    for a, b, _ in near_pairs([hashes[r] for r in reps], threshold):
        uf.union(reps[a], reps[b])
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(items)):
        groups[uf.find(i)].append(i)
    kept, rows, conflicts = [], [], 0
    for root in sorted(groups):
        members = groups[root]
        if len(members) == 1:
            kept.append(items[root])
            continue
        first = items[members[0]]
        labels = sorted({items[m]["class"] for m in members})
        conflict = len(labels) > 1
        conflicts += conflict
        if not conflict:
            kept.append(first)
        for m in members if conflict else members[1:]:
            it = items[m]
            # compared with the kept image, or (conflict: nothing kept) with its closest group member
            ref = members[0] if not conflict else min(
                (o for o in members if o != m),
                key=lambda o: (items[o]["pixel_sha256"] != it["pixel_sha256"], hamming(hashes[m], hashes[o]), o))
            exact = it["pixel_sha256"] == items[ref]["pixel_sha256"]
            dist = hamming(hashes[m], hashes[ref])
            if conflict:
                reason = (f"group of {len(members)} duplicates with conflicting classes {labels}: all dropped "
                          f"(closest: {items[ref]['path']})")
            elif exact:
                reason = "exact duplicate (identical pixels) of kept"
            else:
                reason = f"near duplicate of kept (phash distance {dist}, threshold {threshold}" + \
                         (")" if dist <= threshold else ", via a chain of near duplicates)")
            rows.append({"kept": "" if conflict else first["path"], "dropped": it["path"],
                         "kind": "exact" if exact else "near", "distance": dist, "reason": reason})
    return kept, rows, conflicts


def _split(items: list[dict], s: BuildSettings) -> dict[str, list[dict]]:
    seed = s.seed
    by_class: dict[int, list[dict]] = defaultdict(list)
    for it in items:
        by_class[it["label"]].append(it)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda it: it["path"])
        order = np.random.default_rng([seed, label]).permutation(len(members))
        n_train, n_val, n_test = split_counts(len(members), s.test_fraction, s.val_fraction)
        shuffled = [members[k] for k in order]
        out["test"] += shuffled[:n_test]
        out["val"] += shuffled[n_test:n_test + n_val]
        out["train"] += shuffled[n_test + n_val:]
    for k, split in enumerate(SPLITS):   # class-mixed order inside each split's tars
        members = sorted(out[split], key=lambda it: it["path"])
        order = np.random.default_rng([seed, 1000 + k]).permutation(len(members))
        out[split] = [members[i] for i in order]
    return out


def _meta(it: dict) -> dict:
    keys = ("source", "source_label", "fine", "class", "label", "path", "sha256", "phash",
            "orig_size", "stain", "note")
    return {**{k: it[k] for k in keys}, "synthetic": False}


def _write_shard(task: tuple) -> list[dict]:
    """Worker entry: one tar (+ .idx) of one split from spooled images -> its manifest entry."""
    stage, split, number, shard_size, encoding, spool, rows = task
    writer = ShardWriter(stage, split, shard_size, first=number)
    for key, index, label, meta in rows:
        writer.write(key, (spool / f"{index:08d}").read_bytes(), encoding, label, meta)
    return writer.close()


def _write_shards(stage: Path, splits: dict[str, list[dict]], spool: Path, settings: BuildSettings,
                  workers: int) -> dict[str, list[dict]]:
    """Every shard is independent (its samples, keys and number follow from the split order), so the
    workers write them in parallel; the bytes are the same for any worker count."""
    size = settings.shard_size
    tasks = [(stage, split, k, size, settings.encoding, spool,
              [(f"{split}{i:07d}", it["index"], it["label"], _meta(it))
               for i, it in enumerate(splits[split][lo:lo + size], start=lo)])
             for split in SPLITS for k, lo in enumerate(range(0, len(splits[split]), size))]
    shards: dict[str, list[dict]] = {split: [] for split in SPLITS}
    with ordered_map(min(workers, len(tasks)), chunksize=1) as imap:
        for task, written in zip(tasks, imap(_write_shard, tasks)):
            shards[task[1]] += written
    return shards


def _csv_bytes(rows: list[dict], columns: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def _check_out(out: Path, sources: dict[str, str]) -> None:
    """Refuse outputs that would replace something that is not a previous shard set, or an input."""
    out = out.resolve()
    for name, src in sources.items():
        src_p = Path(src).expanduser().resolve()
        if out == src_p or src_p.is_relative_to(out) or out.is_relative_to(src_p):
            raise BuildError(f"out={out} overlaps source {name}={src_p}; write the shards elsewhere")
    if out.exists():
        if not out.is_dir():
            raise BuildError(f"out={out} exists and is not a directory")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise BuildError(f"out={out} exists, is not empty and has no {MANIFEST}: refusing to replace "
                             "a directory that is not a shard set; choose another out or remove it yourself")
    sweep_stale_staging(out)  # before any work: a killed earlier run's staging dir is removed (or named)


def _bad_summary(bad: list[Rejection], limit: int | None = None) -> str:
    lines = [f"  {r.path}: {r.reason}" for r in bad[:limit]]
    if limit is not None and len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def _counts(splits, classes, sources):
    counts = {s: {c: 0 for c in classes} for s in SPLITS}
    by_source = {s: {src: {c: 0 for c in classes} for src in sorted(sources)} for s in SPLITS}
    for split, items in splits.items():
        for it in items:
            counts[split][it["class"]] += 1
            by_source[split][it["source"]][it["class"]] += 1
    return counts, by_source


# ---------------------------------------------------------------- entry point

def build(sources: dict[str, str], out: str | Path, **options) -> dict:
    """Build a shard set in `out` (replaced atomically) and return its manifest.

    sources: {"pbc"|"aml"|"lab": directory}, at least one. options: the other ShardSettings fields
    (size=128, seed=0, shard_size=1000, stain, encoding, quality, near_dup, min_size, on_bad, workers,
    progress, contact_sheet, taxonomy; configs/shard.yaml says what each means). Raises BuildError with a
    clear message (nothing written, a previous `out` left as it was) for a bad setting, unusable input
    or, with on_bad="strict", any bad file.
    """
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise BuildError(f"unknown source(s) {unknown}: give pbc=DIR, aml=DIR and/or lab=DIR")
    try:
        settings = ShardSettings(**{k: None if v in (None, "") else str(v) for k, v in sources.items()},
                                 out=str(out), **options)
    except SettingsError as e:
        raise BuildError(str(e)) from None
    return build_shards(settings)


class _Stopwatch:
    """Seconds per stage, in the order the stages ran."""

    def __init__(self, laps: dict[str, float]):
        self.laps, self._t = laps, time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage], self._t = now - self._t, now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in self.laps.items())


def _usable(files: list[SourceFile], results: list[dict], rejected: list[Rejection], s: ShardSettings,
            out: Path) -> list[dict]:
    """Clean results -> items of the images that decoded; the others join `rejected` (strict: an error)."""
    items = []
    for f, r in zip(files, results):
        if not r["ok"]:
            rejected.append(Rejection(f.path, f.source, r["reason"]))
            continue
        rs = f.resolved
        items.append({**r, "path": f.path, "source": f.source, "source_label": rs.source_label,
                      "fine": rs.fine, "class": rs.cls, "label": rs.label})
    rejected.sort(key=lambda r: r.path)
    bad = [r for r in rejected if not r.ignored]
    if bad and s.on_bad == "strict":
        raise BuildError(f"{len(bad)} bad input file(s), on_bad=strict, nothing written:\n" + _bad_summary(bad))
    if bad:
        logger.warning("%d file(s) rejected (listed in %s/rejected.csv):\n%s", len(bad), out, _bad_summary(bad, 20))
    return items


def build_shards(s: ShardSettings, timings: dict[str, float] | None = None) -> dict:
    """build() for checked settings (tools/shard.py parses them from the command line).

    `timings`, when given, receives the seconds of each stage (walk, clean, dedupe, split, write, finish);
    they are also logged, so a slow run says where its time went.
    """
    clock = _Stopwatch({} if timings is None else timings)
    sources = s.sources
    if not sources:
        raise BuildError("no sources given: pass at least one of pbc=DIR aml=DIR lab=DIR")
    out = Path(s.out).expanduser()
    _check_out(out, sources)
    tax = Taxonomy.load(s.taxonomy)
    files, rejected = _walk_all(sources, tax, s.on_bad)
    n_walk_rejected = len(rejected)
    workers = max(1, s.workers or cores())
    logger.info("%d candidate files from %s; %d workers", len(files), ", ".join(sorted(sources)), workers)
    clock.lap("walk")

    with atomic_dir(out, sweep=False) as stage:
        spool = stage / ".spool"
        spool.mkdir()
        results = _process_all(files, spool, s.build_settings(), workers, s.progress)
        clock.lap("clean")
        items = _usable(files, results, rejected, s, out)
        kept, dup_rows, conflicts = _dedupe(items, s.near_dup)
        clock.lap("dedupe")
        if not kept:
            raise BuildError("no usable images left after rejecting bad files and duplicates")
        splits = _split(kept, s)
        clock.lap("split")
        shards = _write_shards(stage, splits, spool, s, workers)
        clock.lap("write")
        shutil.rmtree(spool)
        (stage / "rejected.csv").write_bytes(
            _csv_bytes([{"path": r.path, "source": r.source, "reason": r.reason} for r in rejected],
                       ["path", "source", "reason"]))
        (stage / "duplicates.csv").write_bytes(
            _csv_bytes(dup_rows, ["kept", "dropped", "kind", "distance", "reason"]))
        bad = [r for r in rejected if not r.ignored]
        manifest = write_manifest(stage, _manifest(s, tax, splits, kept, shards, rejected, bad, dup_rows, conflicts,
                                                   files_seen=len(files) + n_walk_rejected))
        if s.contact_sheet:
            from hpcgan.viz import shard_contact_sheet
            shard_contact_sheet(stage, "train", stage / "contact_sheet.png",
                                title="train split: the first images of every class")
    clock.lap("finish")
    logger.info(summary_line(manifest, out))
    logger.info("seconds per stage: %s (clean: %.1f img/s with %d workers)", clock,
                len(files) / max(clock.laps["clean"], 1e-9), workers)
    return manifest


def _manifest(s: ShardSettings, tax: Taxonomy, splits, kept, shards, rejected, bad, dup_rows, conflicts,
              files_seen: int) -> dict:
    counts, by_source = _counts(splits, tax.classes, s.sources)
    return {
        "classes": tax.classes,
        "image_size": s.size,
        "counts": counts,
        "counts_by_source": by_source,
        "totals": {k: len(splits[k]) for k in SPLITS} | {"all": len(kept)},
        "shards": shards,
        "settings": asdict(s.build_settings()) | {
            "sources": {k: str(Path(v).expanduser().resolve()) for k, v in sorted(s.sources.items())},
            "split": {"test": s.test_fraction, "val_of_rest": s.val_fraction, "by": "class", "seed": s.seed},
            "exact_duplicates": "identical decoded RGB pixels",
            "near_duplicates": "imagehash.phash Hamming distance <= near_dup (-1: off)",
        },
        "taxonomy": tax.spec,
        "synthetic": False,
        "files_seen": files_seen,
        "rejected": {"total": len(rejected), "bad": len(bad), "ignored": len(rejected) - len(bad),
                     "by_reason": dict(sorted(Counter(r.reason.split(":")[0] for r in rejected).items()))},
        "duplicates": {"dropped": len(dup_rows),
                       "exact": sum(r["kind"] == "exact" for r in dup_rows),
                       "near": sum(r["kind"] == "near" for r in dup_rows),
                       "conflicting_label_groups": conflicts},
        "stain_skipped": sum(1 for it in kept if s.stain == "macenko" and it["stain"] != "macenko"),
        "hpcgan_version": hpcgan.__version__,
    }


def summary_line(manifest: dict, out: str | Path) -> str:
    t, rj, d = manifest["totals"], manifest["rejected"], manifest["duplicates"]
    return (f"shard: {t['all']} images -> {out} (train {t['train']}, val {t['val']}, test {t['test']}); "
            f"{manifest['files_seen']} files seen, {rj['bad']} rejected, {rj['ignored']} ignored, "
            f"{d['dropped']} duplicates dropped ({d['exact']} exact, {d['near']} near, "
            f"{d['conflicting_label_groups']} conflicting-label groups), "
            f"{manifest['stain_skipped']} kept without stain normalisation")
