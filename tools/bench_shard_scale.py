#!/usr/bin/env python
"""Sharding throughput against data-set size: is `tools/shard.py` as fast per image on 100,000 images as on 400?

Builds PBC-layout source folders of growing size from the simulator (each simulated cell also written in its
other dihedral orientations, `--variants`, so that 100,000 distinct files cost an eighth of the drawing;
the orientations are distinct files with distinct pixels and, mostly, distinct perceptual hashes), shards each
with the same settings and records images/s end to end and the seconds of every stage (walk, clean, dedupe,
split, write, finish: `hpcgan.data.build.build_shards(timings=)`). Flat images/s from the smallest to the
largest point means no stage grows faster than the data. Written as JSON; nothing is asserted.

    python tools/bench_shard_scale.py [--points 400 4000 20000 100000] [--workers 1] [--size 64]
                                      [--out tools/benchmarks/bench_shard_scale-cpu2.json] [--work DIR]
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan.data.build import ShardSettings, build_shards, near_pairs  # noqa: E402
from hpcgan.data.shards import SPLITS, iter_samples  # noqa: E402
from hpcgan.data.simulate import plan, simulate  # noqa: E402
from hpcgan.data.workers import cores, ordered_map  # noqa: E402
from hpcgan.jsonfile import write_json  # noqa: E402

logger = logging.getLogger("bench_shard_scale")
ORIENTATIONS = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
                Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE,
                Image.Transpose.TRANSVERSE]


def simulator_scale(images: int) -> float:
    """The simulator scale whose PBC layout has at least `images` images."""
    per_unit = sum(n for *_, n in plan(1.0, ("pbc",))["pbc"])
    scale = images / per_unit
    while sum(n for *_, n in plan(scale, ("pbc",))["pbc"]) < images:
        scale *= 1.02
    return scale


def _orient(task: tuple[str, str, int]) -> None:
    src, dst, variant = task
    if variant == 0:
        shutil.copyfile(src, dst)
        return
    with Image.open(src) as im:
        buf = io.BytesIO()
        im.transpose(ORIENTATIONS[variant]).save(buf, format="JPEG", quality=95)
    Path(dst).write_bytes(buf.getvalue())


def make_pool(work: Path, images: int, variants: int, workers: int) -> list[Path]:
    """>= `images` distinct PBC-layout files under work/pool, in a fixed class-mixed order."""
    sim = work / "sim"
    summary = simulate(sim, seed=0, scale=simulator_scale(-(-images // variants)), layouts=["pbc"],
                       workers=workers, progress=True)
    logger.info("simulated %d cells", summary["total"])
    pool = work / "pool"
    tasks = []
    for src in sorted((sim / "pbc").rglob("*.jpg")):
        folder = pool / src.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        prefix, number = src.stem.rsplit("_", 1)
        for v in range(variants):
            tasks.append((str(src), str(folder / f"{prefix}_{int(number) * variants + v}.jpg"), v))
    with ordered_map(workers, chunksize=64) as imap:
        for _ in imap(_orient, tasks):
            pass
    files = [Path(t[1]) for t in tasks]
    order = np.random.default_rng(0).permutation(len(files))
    return [files[i] for i in order]


def link_subset(files: list[Path], pool: Path, out: Path) -> None:
    """The first len(files) of the pool as hard links: the same bytes, no copy."""
    for f in files:
        dst = out / f.relative_to(pool)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, dst)


def dedupe_at(hashes: list[int], n: int, threshold: int = 4) -> dict:
    """The near-duplicate search (the one stage that compares images with each other) on `n` hashes: the
    measured ones, then copies of them with 5 of 64 bits flipped (beyond the threshold of their original),
    so the bucket sizes grow like a real data set's, from clustered cell hashes, not uniform random ones."""
    rng = np.random.default_rng(0)
    h = np.array(hashes, dtype=np.uint64)
    pick = rng.integers(0, len(h), max(n - len(h), 0))
    flips = np.zeros(len(pick), dtype=np.uint64)
    for _ in range(5):   # 5 distinct bits per copy
        bit = rng.integers(0, 64, len(pick)).astype(np.uint64)
        fresh = (flips >> bit) & np.uint64(1) == 0
        while not fresh.all():
            bit[~fresh] = rng.integers(0, 64, int((~fresh).sum())).astype(np.uint64)
            fresh = (flips >> bit) & np.uint64(1) == 0
        flips |= np.uint64(1) << bit
    pool = [int(x) for x in np.concatenate([h, h[pick] ^ flips])[:n]]
    t0 = time.perf_counter()
    pairs = near_pairs(pool, threshold)
    return {"hashes": n, "seconds": round(time.perf_counter() - t0, 2), "pairs": len(pairs), "threshold": threshold}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, nargs="*", default=[400, 4000, 20000, 100000],
                   help="source sizes to shard end to end (none: only the near-duplicate search)")
    p.add_argument("--workers", type=int, default=1, help="shard workers (1: per-worker throughput)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--variants", type=int, default=8, choices=range(1, 9), help="orientations per simulated cell")
    p.add_argument("--dedupe-points", type=int, nargs="*", default=[1_000_000],
                   help="also time the near-duplicate search alone on this many hashes (grown from the largest point's)")
    p.add_argument("--hashes-from", default=None,
                   help="a shard set whose perceptual hashes seed --dedupe-points (e.g. real cells' shards)")
    p.add_argument("--out", default="runs/bench/bench_shard_scale.json")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir, removed afterwards)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = {"tool": "tools/bench_shard_scale.py", "args": vars(args), "host": platform.node(), "cores": cores(),
              "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "points": []}
    out = Path(args.out)
    hashes: list[int] = []
    with tempfile.TemporaryDirectory(prefix="bench_shard_scale-", dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        files = make_pool(work, max(args.points), args.variants, args.workers) if args.points else []
        result["source_seconds"] = round(time.perf_counter() - t0, 1)
        for n in sorted(args.points):
            src = work / f"src-{n}"
            link_subset(files[:n], work / "pool", src)
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            manifest = build_shards(ShardSettings(pbc=str(src), out=str(work / f"shards-{n}"), size=args.size,
                                                  workers=args.workers, progress=True, contact_sheet=True),
                                    timings=timings)
            dt = time.perf_counter() - t0
            row = {"images": n, "kept": sum(manifest["totals"][s] for s in ("train", "val", "test")),
                   "seconds": round(dt, 2), "images_per_s": round(n / dt, 1),
                   "clean_images_per_s": round(n / timings["clean"], 1),
                   "stages_s": {k: round(v, 3) for k, v in timings.items()},
                   "loadavg": [round(x, 2) for x in os.getloadavg()]}
            logger.info("%d images: %.1f img/s end to end; stages %s", n, row["images_per_s"], row["stages_s"])
            result["points"].append(row)
            if n == max(args.points):
                hashes = [int(meta["phash"], 16) for split in SPLITS
                          for *_, meta in iter_samples(work / f"shards-{n}", split)]
            shutil.rmtree(src)
            shutil.rmtree(work / f"shards-{n}")
            write_json(out, result, indent=2)   # a partial result survives
    result["dedupe"] = []
    if args.hashes_from:
        hashes = [int(meta["phash"], 16) for split in SPLITS for *_, meta in iter_samples(args.hashes_from, split)]
        result["dedupe_hashes_from"] = {"shards": args.hashes_from, "hashes": len(hashes)}
    for n in args.dedupe_points if hashes else []:
        result["dedupe"].append(dedupe_at(hashes, n))
        logger.info("near-duplicate search alone: %s", result["dedupe"][-1])
    rates = [r["images_per_s"] for r in result["points"]]
    result["flatness"] = round(min(rates) / max(rates), 3) if rates else None   # 1.0: the same img/s at every size
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out, result, indent=2)
    logger.info("wrote %s: img/s %s, flatness %s", out, rates, result["flatness"])
    return result


if __name__ == "__main__":
    main()
