#!/usr/bin/env python
"""make demo: the whole hpcgan flow on the embedded simulator, small enough for a laptop.

    simulate -> shard -> contact sheet -> train WGAN-GP-AC (torchrun, 2 ranks) -> generate balanced shards

Settings: configs/demo.yaml (e.g. `python tools/demo.py train.steps=50 size=32`). Re-running resumes:
training continues from its newest checkpoint, and a finished run is not trained again.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan import CONFIG_DIR, REPO_ROOT  # noqa: E402
from hpcgan.data.build import build, summary_line  # noqa: E402
from hpcgan.data.shards import SPLITS  # noqa: E402
from hpcgan.data.simulate import simulate  # noqa: E402

logger = logging.getLogger("demo")


def manifest_table(manifest: dict, synthetic: dict | None = None) -> str:
    """Counts per class and split (+ synthetic), as a fixed-width table."""
    cols = list(SPLITS) + (["synthetic"] if synthetic else [])
    counts = {s: manifest["counts"].get(s, {}) for s in SPLITS}
    if synthetic:
        counts["synthetic"] = synthetic["counts"].get("train", {})
    width = max(len(c) for c in manifest["classes"]) + 2
    lines = ["class".ljust(width) + "".join(c.rjust(10) for c in cols)]
    for cls in manifest["classes"]:
        lines.append(cls.ljust(width) + "".join(str(counts[c].get(cls, 0)).rjust(10) for c in cols))
    lines.append("total".ljust(width) + "".join(str(sum(counts[c].values())).rjust(10) for c in cols))
    return "\n".join(lines)


def train(cfg: DictConfig, shards: Path, run_dir: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.train.nproc}",
           "-m", "hpcgan.train", f"shards={shards}", f"run_dir={run_dir}", f"model={cfg.train.model}",
           f"steps={cfg.train.steps}", f"precision={cfg.train.precision}", f"seed={cfg.seed}",
           *[str(x) for x in cfg.train.extra]]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    logger.info("training: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env, cwd=REPO_ROOT)


def diversity_report(run_dir: Path, shards: Path) -> str:
    """The last sample grid's collapse gauge next to the same numbers for the training images."""
    import csv

    import torch

    from hpcgan.data.loader import make_loader
    from hpcgan.train import data_diversity
    with open(run_dir / "samples" / "diversity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return "Sample diversity: no sample grid yet"
    last = rows[-1]
    images, labels = zip(*make_loader(shards, "train", 1, backend="webdataset", num_threads=1, shuffle=False))
    real = data_diversity(torch.cat(images), torch.cat(labels))
    gen = {k: float(last[k]) for k in real}
    lines = [f"Sample diversity (samples/diversity.csv, step {last['step']}): within a class {gen['within_row_std']:.3f} "
             f"(training images {real['within_row_std']:.3f}), across classes {gen['between_row_std']:.3f} "
             f"(training images {real['between_row_std']:.3f})"]
    ignored = [what for what, k in (("its noise", "within_row_std"), ("the class", "between_row_std"))
               if gen[k] < 0.25 * real[k]]
    if ignored:
        lines.append(f"  the generator ignores {' and '.join(ignored)}: a collapse that short runs often show "
                     "(README, Known limitations); train longer (train.steps=...)")
    return "\n".join(lines)


def class_signal_report(run_dir: Path) -> list[str]:
    """The critic's auxiliary classifier on real images against chance, as the finished run judged it
    (status.json's class_signal, from hpcgan.train.class_signal); nothing for a model without a classifier."""
    from hpcgan.train import CLASS_SIGNAL_ADVICE, read_status
    signal = read_status(run_dir).get("class_signal")
    if signal is None:
        return []
    lines = [f"Auxiliary classifier on real images (log.csv, last {signal['rows']} rows): accuracy "
             f"{signal['accuracy']:.2f} (chance {signal['chance']:.2f})"]
    if not signal["learnt"]:
        lines.append(f"  {CLASS_SIGNAL_ADVICE}")
    return lines


@hydra.main(config_path=str(CONFIG_DIR), config_name="demo", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    out = Path(to_absolute_path(cfg.out))
    sim, shards, run_dir, synth = out / "sim", out / "shards", out / "run", out / "synthetic"

    logger.info("1/5 simulating cell images -> %s", sim)
    simulate(sim, seed=cfg.seed, scale=cfg.scale)

    logger.info("2/5 sharding -> %s", shards)
    manifest = build({s: str(sim / s) for s in ("pbc", "aml", "lab")}, shards, size=cfg.size, seed=cfg.seed)
    print(summary_line(manifest, shards))

    sheet = Path(shutil.copyfile(shards / "contact_sheet.png", out / "contact_sheet.png"))  # build() drew it
    logger.info("3/5 contact sheet -> %s", sheet)

    synthetic = None
    if cfg.train.enabled:
        logger.info("4/5 training %s for %d steps on %d ranks -> %s", cfg.train.model, cfg.train.steps,
                    cfg.train.nproc, run_dir)
        train(cfg, shards, run_dir)
        from hpcgan.generate import generate  # torch is only needed from here on
        logger.info("5/5 generating synthetic images to balance the classes -> %s", synth)
        synthetic = generate(run_dir=run_dir, out=synth, balance=cfg.generate.balance, shards=shards, seed=cfg.seed)

    print()
    print(f"Shards: {shards}  ({manifest['image_size']} px, {len(manifest['classes'])} classes)")
    print(manifest_table(manifest, synthetic))
    print()
    print(f"Contact sheet:   {out / 'contact_sheet.png'}")
    if synthetic is not None:
        grids = sorted((run_dir / "samples").glob("step-*.png"))
        if grids:
            print(f"Training samples: {grids[-1]}")
        print(f"Training log:    {run_dir / 'log.csv'}  (drawn: {run_dir / 'curves.png'})")
        print(diversity_report(run_dir, shards))
        for line in class_signal_report(run_dir):
            print(line)
        if (synth / "contact_sheet.png").exists():
            print(f"Synthetic sheet: {synth / 'contact_sheet.png'}")
        print(f"Synthetic shards: {synth}  (read them with the real ones: make_loader([shards, synthetic], 'train', ...))")


if __name__ == "__main__":
    main()
