#!/usr/bin/env python
"""Classifier training throughput per architecture and image size, with the loader's next to it, as JSON.

For each architecture x image size x precision:
  train_images_per_s   one rank's optimisation steps (forward, cross-entropy, backward, AdamW) on batches already
                       in memory: the compute the classifier stage spends per image (hpcgan.classify's model
                       build, memory layout and autocast rules)
  loader_images_per_s  the training loader alone (hpcgan.classify.data.epoch_loader: DALI decode, on the GPU
                       when there is one, else the CPU; the webdataset fallback where DALI cannot run)
  bound                which of the two limits a real run (the slower one)
on random-texture PNG shards of that size (throughput does not depend on what the cells look like). Each
figure is timed over `--seconds` after `--warmup` steps; the machine's load average is recorded beside it.

    python tools/bench_classify.py [--archs small_cnn resnet50 ...] [--sizes 64 128] [--batch 32]
                                   [--precisions fp32 bf16] [--seconds 10] [--out FILE.json]
(default out: tools/benchmarks/bench_classify-<cpuN or GPU name>.json)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan.classify.archs import ARCHS, build_classifier  # noqa: E402
from hpcgan.classify.data import TrainingSet, epoch_loader  # noqa: E402
from hpcgan.data.loader import load_index, resolve_backend  # noqa: E402
from hpcgan.jsonfile import write_json  # noqa: E402


def random_shards(out: Path, n: int, size: int, classes: int = 12) -> Path:
    from PIL import Image

    from hpcgan.data.shards import ShardWriter, write_manifest
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(classes)]
    with ShardWriter(out, "train", shard_size=500) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
            w.write(f"b{i:06d}", buf.getvalue(), "png", i % classes, {"class": names[i % classes]})
    per = np.bincount(np.arange(n) % classes, minlength=classes).tolist()
    write_manifest(out, {"classes": names, "image_size": size, "counts": {"train": dict(zip(names, per))},
                         "shards": {"train": w.shards}, "synthetic": True})
    return out


def loader_rate(shards: Path, batch: int, seconds: float, device: str) -> dict:
    index = load_index(shards, "train")
    ts = TrainingSet(index, index.classes, index.image_size, {}, False)
    n, t0, epoch = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for x, _ in epoch_loader(ts, batch, 0, 1, seed=0, epoch=epoch, device=device):
            n += len(x)
        epoch += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return {"loader_images_per_s": round(n / (time.perf_counter() - t0), 1), "backend": resolve_backend("auto")}


def train_rate(arch: str, size: int, batch: int, precision: str, device: torch.device, seconds: float,
               warmup: int) -> dict:
    torch.manual_seed(0)
    model, info = build_classifier(arch, 12, size)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 12, (batch,), device=device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"train_images_per_s": round(n * batch / dt, 1), "steps_timed": n, "input_size": info["input_size"],
            "parameters": info["parameters"], "timm": info["timm"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--images", type=int, default=512, help="images in the benchmark shards")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu{len(os.sched_getaffinity(0))}"
    out = Path(a.out or Path(__file__).parent / "benchmarks" / f"bench_classify-{where.replace(' ', '_')}.json")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            shards = random_shards(Path(tmp) / f"s{size}", a.images, size)
            loader = loader_rate(shards, a.batch, a.seconds, device.type)
            for arch in a.archs:
                for precision in a.precisions:
                    r = {"arch": arch, "size": size, "batch": a.batch, "precision": precision,
                         **train_rate(arch, size, a.batch, precision, device, a.seconds, a.warmup), **loader,
                         "load_average": round(os.getloadavg()[0], 2)}
                    r["bound"] = "loader" if r["loader_images_per_s"] < r["train_images_per_s"] else "compute"
                    results.append(r)
                    print(json.dumps(r), flush=True)
    doc = {"device": where, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    write_json(out, doc, indent=1)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
