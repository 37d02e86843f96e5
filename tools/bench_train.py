#!/usr/bin/env python
"""Training-throughput benchmark, written as JSON.

For each model and precision, training images/s (global, all ranks) of real `hpcgan.train` runs launched
with torchrun on the same CPU budget split two ways:
    1x2   one rank  with 2 threads   (OMP_NUM_THREADS=2)
    2x1   two ranks with 1 thread each (DDP over gloo)
DDP scaling efficiency = images/s(2x1) / images/s(1x2); target >= 0.8, reported, never asserted.
Throughput is measured from log.csv's cumulative `time` column between the end of the warm-up steps and
the last step, so start-up, the final checkpoint and the sample grid are excluded; data loading is in.

When CUDA is present, a GPU section: one rank on the GPU at fp32 vs bf16, and the loader's own images/s
(DALI, decode on the GPU) next to the training images/s, to show which one limits.

    python tools/bench_train.py [--out runs/bench/bench_train.json] [--models wgan_gp_ac wgan_gp dcgan]
                                [--precisions fp32 bf16] [--size 32] [--batch 64] [--width 64]
                                [--variant nchw=channels_last=false ...]
Variants run every configuration again with extra hpcgan.train overrides, to measure one lever at a time
(memory layout, lazy penalty, strict fp32 instead of TF32).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hpcgan.jsonfile import write_json

logger = logging.getLogger("bench_train")
TARGET_EFFICIENCY = 0.8


def make_shards(out: Path, n: int, size: int, classes: int = 12) -> Path:
    """Random-texture PNGs in the shard format (throughput does not depend on what the cells look like)."""
    from PIL import Image

    from hpcgan.data.shards import ShardWriter, write_manifest
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(classes)]
    with ShardWriter(out, "train", shard_size=500) as w:
        for i in range(n):
            arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            w.write(f"b{i:06d}", buf.getvalue(), "png", i % classes, {"class": names[i % classes]})
    counts = np.bincount(np.arange(n) % classes, minlength=classes).tolist()
    write_manifest(out, {"classes": names, "image_size": size, "counts": {"train": dict(zip(names, counts))},
                         "shards": {"train": w.shards}, "synthetic": True})
    return out


def best_run(repeats: int, run_dir: Path, **kw) -> dict:
    runs = [train_run(run_dir=run_dir.with_name(f"{run_dir.name}-r{i}"), **kw) for i in range(max(1, repeats))]
    ok = [r for r in runs if "images_per_s" in r]
    if not ok:
        return runs[-1]
    best = max(ok, key=lambda r: r["images_per_s"])
    return best | {"all_images_per_s": [r.get("images_per_s") for r in runs]}


def train_run(shards: Path, run_dir: Path, *, model: str, precision: str, nproc: int, threads: int, batch: int,
              width: int, warmup: int, steps: int, device: str = "cpu", backend: str = "auto",
              overrides: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "hpcgan.train", f"shards={shards}", f"run_dir={run_dir}", f"model={model}",
           f"precision={precision}", f"steps={warmup + steps}", f"batch_size={batch}", f"model.width={width}",
           "log_every=1", "ckpt_every=1000000", "sample_every=0", "progress=false", "tensorboard=false",
           f"num_threads={threads}", f"device={device}", f"backend={backend}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": p.stderr[-2000:], "returncode": p.returncode}
    with open(run_dir / "log.csv", newline="") as f:
        t = {int(r["step"]): float(r["time"]) for r in csv.DictReader(f)}
    dt = t[warmup + steps] - t[warmup]
    images = steps * batch * nproc
    return {"ranks": nproc, "threads_per_rank": threads, "timed_steps": steps, "global_batch": batch * nproc,
            "seconds": round(dt, 3), "images_per_s": round(images / dt, 2), "wall_s": round(wall, 1)}


def loader_throughput(shards: Path, batch: int, device: str, backend: str, threads: int, epochs: int = 2) -> dict:
    from hpcgan.data.loader import make_loader
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        loader = make_loader(shards, "train", batch, seed=0, epoch=epoch, backend=backend, device=device,
                             num_threads=threads)
        for images, _ in loader:
            n += images.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"backend": loader.backend, "device": device, "images": n, "images_per_s": round(n / dt, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/bench_train.json", help="JSON result path")
    p.add_argument("--models", nargs="+", default=["wgan_gp_ac", "wgan_gp", "dcgan"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--size", type=int, default=32, help="image size (32/64/128)")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch (paper: 64)")
    p.add_argument("--width", type=int, default=64, help="model width (the configs' default is 64)")
    p.add_argument("--images", type=int, default=None,
                   help="images in the benchmark shards (default: enough that no epoch ends inside a run, "
                        "so the timed window holds no loader rebuild)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--backend", default="auto", help="data loader backend")
    p.add_argument("--skip-cpu", action="store_true", help="only the GPU section (on a GPU machine)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDE[,OVERRIDE...]",
                   help="also run every configuration with these hpcgan.train overrides, keyed MODEL/PRECISION+NAME, "
                        "e.g. --variant nchw=channels_last=false --variant lazy4=model.gp_every=4 "
                        "--variant strict=tf32=false (repeatable)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per configuration; the fastest counts (other load only ever slows a run down)")
    args = p.parse_args(argv)
    variants = {"": ()}
    for v in args.variant:
        name, sep, overrides = v.partition("=")
        if not sep or not name or not overrides:
            p.error(f"--variant {v!r}: expected NAME=OVERRIDE[,OVERRIDE...], e.g. nchw=channels_last=false")
        variants["+" + name] = tuple(overrides.split(","))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    result = {"host": platform.node(), "torch": str(torch.__version__), "cpus": len(os.sched_getaffinity(0)),
              "load_avg_start": os.getloadavg(), "size": args.size, "batch_per_rank": args.batch,
              "width": args.width, "warmup_steps": args.warmup, "timed_steps": args.steps, "repeats": args.repeats,
              "target_ddp_efficiency": TARGET_EFFICIENCY, "variants": {k: list(v) for k, v in variants.items() if k},
              "cpu": {}, "gpu": None}
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        tmp = Path(tmp)
        images = args.images or 2 * args.batch * (args.warmup + args.steps + 1)
        result["images"] = images
        shards = make_shards(tmp / "shards", images, args.size)
        common = dict(batch=args.batch, width=args.width, warmup=args.warmup, steps=args.steps,
                      backend=args.backend)
        for model in ([] if args.skip_cpu else args.models):
            for precision in args.precisions:
                for vname, overrides in variants.items():
                    key = f"{model}/{precision}{vname}"
                    run = dict(shards=shards, model=model, precision=precision, overrides=overrides, **common)
                    logger.info("%s: 1 rank x 2 threads", key)
                    one = best_run(args.repeats, tmp / f"{model}-{precision}{vname}-1x2", nproc=1, threads=2, **run)
                    logger.info("%s: 2 ranks x 1 thread", key)
                    two = best_run(args.repeats, tmp / f"{model}-{precision}{vname}-2x1", nproc=2, threads=1, **run)
                    row = {"1x2": one, "2x1": two}
                    if "images_per_s" in one and "images_per_s" in two:
                        eff = two["images_per_s"] / one["images_per_s"]
                        row |= {"ddp_efficiency": round(eff, 3), "pass": eff >= TARGET_EFFICIENCY}
                    result["cpu"][key] = row
                    logger.info("%s: %s", key, json.dumps(row))
        for key, row in list(result["cpu"].items()):  # informative on CPUs (the bf16 target is a GPU one)
            model, _, rest = key.partition("/")
            if rest.startswith("bf16") and f"{model}/fp32{rest[4:]}" in result["cpu"]:
                b, f = row["1x2"].get("images_per_s"), result["cpu"][f"{model}/fp32{rest[4:]}"]["1x2"].get("images_per_s")
                if b and f:
                    result[f"cpu_1x2/{model}/bf16_over_fp32{rest[4:]}"] = round(b / f, 2)
        result["cpu_loader"] = loader_throughput(shards, args.batch, "cpu", args.backend, 2)
        if torch.cuda.is_available():
            gpu = {"name": torch.cuda.get_device_name(0), "train": {},
                   "loader": loader_throughput(shards, args.batch, "cuda", args.backend, 4)}
            for model in args.models:
                for precision in ("fp32", "bf16"):
                    for vname, overrides in variants.items():
                        gpu["train"][f"{model}/{precision}{vname}"] = best_run(
                            args.repeats, tmp / f"gpu-{model}-{precision}{vname}", shards=shards, model=model,
                            precision=precision, nproc=1, threads=4, device="cuda", overrides=overrides, **common)
            for model in args.models:
                for vname in variants:
                    tr = gpu["train"][f"{model}/fp32{vname}"]
                    b = gpu["train"][f"{model}/bf16{vname}"]
                    if "images_per_s" in tr and "images_per_s" in b:
                        gpu[f"{model}/bf16_over_fp32{vname}"] = round(b["images_per_s"] / tr["images_per_s"], 2)
                        gpu[f"{model}/loader_over_train_bf16{vname}"] = round(
                            gpu["loader"]["images_per_s"] / b["images_per_s"], 2)
            result["gpu"] = gpu
    effs = [r.get("pass") for r in result["cpu"].values()]
    result["all_targets_pass"] = all(e is True for e in effs) if effs else None  # None: no CPU section run
    result["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    write_json(out, result, indent=2)
    print(json.dumps(result, indent=2))
    logger.info("wrote %s", out)
    return result


if __name__ == "__main__":
    main()
