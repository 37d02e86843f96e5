#!/usr/bin/env python
"""make demo: the whole hpcgan flow on the embedded simulator, small enough for a laptop.

    simulate -> shard -> contact sheet -> train WGAN-GP-AC (torchrun, 2 ranks) -> generate balanced shards
    -> evaluate (cell extractor): the run next to real-vs-real (the floor) and an untrained generator (the ceiling)

Settings: configs/demo.yaml (e.g. `python tools/demo.py train.steps=50 size=32`). Re-running resumes:
training continues from its newest checkpoint, and a finished run is not trained again.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan import CONFIG_DIR, REPO_ROOT  # noqa: E402
from hpcgan.data.build import BuildError, build, summary_line  # noqa: E402
from hpcgan.data.shards import SPLITS  # noqa: E402
from hpcgan.data.simulate import simulate  # noqa: E402
from hpcgan.images import check_image_size  # noqa: E402
from hpcgan.evaluate import FEATURES  # noqa: E402
from hpcgan.metrics import DEFAULT_METRICS, METRICS  # noqa: E402
from hpcgan.settings import SettingsError, check_choice, check_range, exit_on_error, parse  # noqa: E402

logger = logging.getLogger("demo")


@dataclass
class DemoTrain:
    enabled: bool = True
    nproc: int = 2
    steps: int = 800
    model: str = "wgan_gp_ac"
    precision: str = "fp32"
    extra: list[str] = field(default_factory=lambda: [
        "batch_size=16", "model.width=16", "model.ac_weight=10", "model.ac_twin=true", "log_every=50",
        "sample_every=200", "ckpt_every=100"])


@dataclass
class DemoGenerate:
    balance: Any = "max"


@dataclass
class DemoEvaluate:
    enabled: bool = True
    features: str = "cell"    # the offline extractor, trained on the demo's own train split
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))


@dataclass
class DemoStudy:
    enabled: bool = True
    name: str = "tiny"         # configs/study/<name>.yaml, run here (executor=local) on the demo's shards
    overrides: list[str] = field(default_factory=list)   # more tools/sweep.py overrides


@dataclass
class DemoSettings:
    """The demo's settings; these defaults are the ones (configs/demo.yaml documents the same values)."""
    out: str = "demo"
    seed: int = 0
    scale: float = 1.0
    size: int = 32
    train: DemoTrain = field(default_factory=DemoTrain)
    generate: DemoGenerate = field(default_factory=DemoGenerate)
    evaluate: DemoEvaluate = field(default_factory=DemoEvaluate)
    study: DemoStudy = field(default_factory=DemoStudy)

    def __post_init__(self) -> None:
        check_image_size(self.size, "size")
        check_range("train.nproc", self.train.nproc, 1)
        check_range("train.steps", self.train.steps, 1)
        check_choice("evaluate.features", self.evaluate.features, FEATURES)
        unknown = [m for m in self.evaluate.metrics if m not in METRICS]
        if unknown:
            raise SettingsError(f"evaluate.metrics: unknown {unknown}; known: {', '.join(METRICS)}")


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


def train(cfg: DemoSettings, shards: Path, run_dir: Path) -> None:
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
    from hpcgan.gauges import data_diversity
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
    (status.json's class_signal, from hpcgan.gauges.class_signal); nothing for a model without a classifier."""
    from hpcgan.gauges import CLASS_SIGNAL_ADVICE
    from hpcgan.rundir import read_status
    signal = read_status(run_dir).get("class_signal")
    if signal is None:
        return []
    lines = [f"Auxiliary classifier on real images (log.csv, last {signal['rows']} rows): accuracy "
             f"{signal['accuracy']:.2f} (chance {signal['chance']:.2f})"]
    if not signal["learnt"]:
        lines.append(f"  {CLASS_SIGNAL_ADVICE}")
    return lines


# the columns of the evaluation table, in the order of the paper's Tables 3-4, then the newer measures
TABLE_ROWS = ("is", "fid", "kid", "precision", "recall", "f1", "density", "coverage", "intra_fid", "lpips",
              "class_accuracy", "l1", "l2", "psnr", "ssim", "memorisation")


def evaluate_demo(cfg: DemoSettings, out: Path, shards: Path, run_dir: Path) -> dict[str, dict]:
    """The run, real val vs real train (the floor: what a perfect generator would score on this little data)
    and the untrained generator (the ceiling), with the same extractor and cached real features."""
    from hpcgan.evaluate import evaluate
    common = {"shards": str(shards), "features": cfg.evaluate.features, "metrics": list(cfg.evaluate.metrics),
              "cache_dir": str(out / "cache"), "seed": cfg.seed, "progress": False}
    return {
        "real val (floor)": evaluate({**common, "fake": str(shards), "fake_split": "val", "tag": "floor",
                                      "out": str(out / "eval" / "floor.json")}),
        f"{cfg.train.model} (this run)": evaluate({**common, "run": str(run_dir)}),
        "untrained (ceiling)": evaluate({**common, "run": str(run_dir), "weights": "init", "tag": "ceiling",
                                         "out": str(out / "eval" / "ceiling.json")}),
    }


def evaluation_table(docs: dict[str, dict]) -> str:
    """One row per number, one column per evaluated set; '-' where a metric was not computed."""
    values = {name: {k: v for m in doc["metrics"].values() for k, v in m.items()} for name, doc in docs.items()}
    width = max(len(n) for n in docs) + 2
    lines = ["metric".ljust(16) + "".join(n.rjust(width) for n in docs)]
    for key in TABLE_ROWS:
        if any(key in v for v in values.values()):
            lines.append(key.ljust(16) + "".join((f"{v[key]:.4g}" if key in v else "-").rjust(width)
                                                  for v in values.values()))
    skipped = {name: why for doc in docs.values() for name, why in doc["skipped"].items()}
    lines += [f"  {name}: not computed: {why}" for name, why in skipped.items()]
    return "\n".join(lines)


@hydra.main(config_path=str(CONFIG_DIR), config_name="demo", version_base=None)
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    with exit_on_error("demo", BuildError):
        demo(parse(DemoSettings, dcfg))


def demo(cfg: DemoSettings) -> None:
    out = Path(to_absolute_path(cfg.out))
    sim, shards, run_dir, synth = out / "sim", out / "shards", out / "run", out / "synthetic"

    logger.info("1/7 simulating cell images -> %s", sim)
    simulate(sim, seed=cfg.seed, scale=cfg.scale)

    logger.info("2/7 sharding -> %s", shards)
    manifest = build({s: str(sim / s) for s in ("pbc", "aml", "lab")}, shards, size=cfg.size, seed=cfg.seed)
    print(summary_line(manifest, shards))

    sheet = Path(shutil.copyfile(shards / "contact_sheet.png", out / "contact_sheet.png"))  # build() drew it
    logger.info("3/7 contact sheet -> %s", sheet)

    synthetic = None
    if cfg.train.enabled:
        logger.info("4/7 training %s for %d steps on %d ranks -> %s", cfg.train.model, cfg.train.steps,
                    cfg.train.nproc, run_dir)
        train(cfg, shards, run_dir)
        from hpcgan.generate import generate  # torch is only needed from here on
        logger.info("5/7 generating synthetic images to balance the classes -> %s", synth)
        synthetic = generate(run_dir=run_dir, out=synth, balance=cfg.generate.balance, shards=shards, seed=cfg.seed)
    docs = None
    if cfg.train.enabled and cfg.evaluate.enabled:
        logger.info("6/7 evaluating the run against the real train split (%s features) -> %s",
                    cfg.evaluate.features, out / "eval")
        docs = evaluate_demo(cfg, out, shards, run_dir)
    report = None
    if cfg.study.enabled:
        logger.info("7/7 the %r study (GANs -> synthetic sets -> evaluation -> classifiers) on these shards, as a "
                    "cluster would run it, then its report -> %s", cfg.study.name, out / "study")
        report = study_demo(cfg, out / "study", shards)

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
    if docs is not None:
        run_doc = next(d for d in docs.values() if d["source"]["kind"] == "generator" and d["source"]["weights"] != "init")
        ex = run_doc["extractor"]
        print()
        print(f"Evaluation against the real train split ({ex['name']} features, val accuracy "
              f"{ex.get('val_accuracy', float('nan')):.2f}; lower is better for fid, kid, intra_fid, l1, l2, "
              "memorisation):")
        print(evaluation_table(docs))
        print(f"Results: {run_dir / 'eval'}  (one JSON per evaluation, rows in results.jsonl)")
        if "memorisation" in run_doc["info"] and run_doc["info"]["memorisation"].get("sheet"):
            print(f"Closest generated/training pairs: {run_doc['info']['memorisation']['sheet']}")
    if report is not None:
        print()
        print(f"Study {cfg.study.name!r}: {out / 'study'}  (status: python tools/sweep.py status out={out / 'study'})")
        for name in ("table3", "table4", "table5", "table6"):
            for key, path in report.items():
                if key.startswith(name) and str(path).endswith(".csv"):
                    print(f"{key}:")
                    print(Path(path).with_suffix(".md").read_text())
        print(f"Report: {out / 'study' / 'report'}  (tables as CSV and Markdown, figures, sources.csv)")


def study_demo(cfg: DemoSettings, study: Path, shards: Path) -> dict:
    """The study run here as on a cluster (tools/sweep.py, executor=local), then its report."""
    from hpcgan.report import report
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "sweep.py"), f"study={cfg.study.name}", f"out={study}",
           "executor=local", f"data.shards={shards}", f"gan.sizes=[{cfg.size}]", *cfg.study.overrides]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"the study failed: python tools/sweep.py status out={study} shows which task and why")
    return report(study)


if __name__ == "__main__":
    main()
