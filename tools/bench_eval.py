#!/usr/bin/env python
"""Evaluation benchmark, written as JSON.

  1. feature extraction img/s of each extractor (`cell`; `inception` when its weights are staged, else
     recorded as not staged) on the CPU, and on the GPU when there is one: batches of uint8 images already
     in memory, so this is the network alone;
  2. an N-vs-N FID (default 10,000 real vs 10,000 other images, `tools/evaluate.py fake=... metrics=[fid]`):
     wall time with a cold cache (real features computed: decode + extract) and a warm one (read back).

The images are smooth random textures in the shard format (throughput does not depend on what the cells
look like); the cell extractor is trained for one epoch on them (only its speed is used here).

    python tools/bench_eval.py [--out tools/benchmarks/bench_eval-cpu2.json] [--n 10000] [--size 64]
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan.fsutil import atomic_write_bytes  # noqa: E402
from hpcgan.jsonfile import dumps  # noqa: E402

logger = logging.getLogger("bench_eval")


def texture_shards(out: Path, n: int, size: int, classes: int = 8) -> Path:
    """`n` images in each of the train and val splits: low-resolution noise upsampled (PNG sizes like cells')."""
    from PIL import Image

    from hpcgan.data.shards import ShardWriter, write_manifest
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(classes)]
    shards, counts = {}, {}
    for split in ("train", "val"):
        with ShardWriter(out, split, shard_size=1000) as w:
            for i in range(n):
                small = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((size, size), Image.BILINEAR).save(buf, format="PNG")
                w.write(f"{split}{i:06d}", buf.getvalue(), "png", i % classes, {"class": names[i % classes]})
        shards[split] = w.shards
        counts[split] = dict(zip(names, np.bincount(np.arange(n) % classes, minlength=classes).tolist()))
    write_manifest(out, {"classes": names, "image_size": size, "counts": counts, "shards": shards,
                         "totals": {s: n for s in counts}, "synthetic": True})
    return out


def extraction_speed(extractor, size: int, device: torch.device, batch: int = 64, seconds: float = 10.0) -> dict:
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    extractor.extract(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        extractor.extract(x)
        n += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"images_per_s": round(n / (time.perf_counter() - t0), 1), "batch": batch, "device": str(device)}


def fid_wall_time(shards: Path, extractor_file: Path, cache: Path) -> dict:
    from hpcgan.evaluate import evaluate
    out = {}
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        doc = evaluate({"shards": str(shards), "fake": str(shards), "fake_split": "val", "metrics": ["fid"],
                        "feature_file": str(extractor_file), "cache_dir": str(cache), "device": "cpu",
                        "out": str(cache / f"{label}.json"), "progress": False})
        out[label] = {"seconds": round(time.perf_counter() - t0, 2), "cache_hit": doc["real"]["cache_hit"],
                      "fid": doc["metrics"]["fid"]["fid"], "n_real": doc["real"]["n"], "n_fake": doc["n_fake"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tools/benchmarks/bench_eval-cpu2.json")
    ap.add_argument("--n", type=int, default=10000, help="images per side of the FID")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--weights-dir", default=None, help="staged weights (inception); default $HPCGAN_WEIGHTS")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hpcgan.metrics.cell import train_cell_extractor
    from hpcgan.metrics.features import load_extractor
    from hpcgan.metrics.weights import MissingWeightsError

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    result = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "n": args.n, "size": args.size, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              # throughput is only as good as the machine's idle time: keep the load beside it
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "extraction": {}}
    with tempfile.TemporaryDirectory(prefix="bench_eval-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        shards = texture_shards(tmp / "shards", args.n, args.size)
        result["make_shards_seconds"] = round(time.perf_counter() - t0, 1)
        cell_file = tmp / "cell.pt"
        train_cell_extractor(shards, cell_file, epochs=1, progress=False)
        for dev in devices:
            result["extraction"][f"cell/{dev.type}"] = extraction_speed(load_extractor("cell", path=cell_file,
                                                                                       device=dev), args.size, dev)
            try:
                inc = load_extractor("inception", weights_dir=args.weights_dir, device=dev)
                result["extraction"][f"inception/{dev.type}"] = extraction_speed(inc, args.size, dev, batch=32)
            except MissingWeightsError as e:
                result["extraction"][f"inception/{dev.type}"] = {"not_staged": str(e).splitlines()[0]}
        result["fid_cell_cpu"] = fid_wall_time(shards, cell_file, tmp / "cache")
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = dumps(result, indent=2) + "\n"
    atomic_write_bytes(args.out, text.encode())
    print(text)


if __name__ == "__main__":
    main()
