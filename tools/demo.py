#!/usr/bin/env python
"""make demo: the project's main job on the embedded simulator, run here exactly as a cluster runs a study.

    python tools/sweep.py study=tiny out=demo executor=local  (sized by configs/demo.yaml), then its report:
    simulate -> shard -> the cell extractor -> 2 GANs under torchrun (2 ranks each) -> a balanced synthetic set
    -> evaluation (Tables 3-4) -> classifiers on `original` and `original+synthetic` (Tables 5-6) -> report

Settings: configs/demo.yaml (`python tools/demo.py out=demo64 size=64`). Re-running resumes (finished tasks are
not run again). Exit: 0 done, 1 a task failed (`python tools/sweep.py status out=DIR` says which), 2 bad input.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan import CONFIG_DIR, REPO_ROOT  # noqa: E402
from hpcgan.images import check_image_size  # noqa: E402
from hpcgan.settings import check_range, exit_on_error, parse  # noqa: E402

logger = logging.getLogger("demo")

# tools/sweep.py overrides over the tiny study's test-sized settings (configs/demo.yaml says why each)
OVERRIDES = ["data.shard=['contact_sheet=true']", "resources.train.ranks=2", "resources.train.cpus=2", "gan.steps=300",
             "gan.overrides=['model.width=16','batch_size=16','log_every=50','sample_every=100',"
             "'samples_per_class=4','ckpt_every=100','precision=fp32','progress=false','tensorboard=false']",
             "gan.model_overrides={wgan_gp_ac: ['model.ac_weight=10', 'model.ac_twin=true']}",
             "classify.overrides=['steps=400','eval_every=100','log_every=50','ckpt_every=1000','batch_size=32',"
             "'precision=fp32','progress=false']"]


@dataclass
class DemoSettings:
    """The demo's settings; these defaults are the ones (configs/demo.yaml documents the same values)."""
    out: str = "demo"          # the study directory
    study: str = "tiny"        # configs/study/<name>.yaml
    size: int = 32             # gan.sizes=[size]
    scale: float = 1.0         # data.simulate_scale: how many simulated cells
    seed: int = 0              # data.seed
    overrides: list[str] = field(default_factory=lambda: list(OVERRIDES))   # sweep overrides that size the study

    def __post_init__(self) -> None:
        check_image_size(self.size, "size")
        check_range("scale", self.scale, 0)


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
    return lines + ([f"  {CLASS_SIGNAL_ADVICE}"] if not signal["learnt"] else [])


def diversity_report(run_dir: Path, shards: Path) -> list[str]:
    """The last sample grid's collapse gauge (samples/diversity.csv) beside the training images' own numbers."""
    import csv

    import torch

    from hpcgan.data.loader import make_loader
    from hpcgan.gauges import data_diversity
    with open(run_dir / "samples" / "diversity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ["Sample diversity: no sample grid yet"]
    images, labels = zip(*make_loader(shards, "train", 1, backend="webdataset", num_threads=1, shuffle=False))
    real = data_diversity(torch.cat(images), torch.cat(labels))
    gen = {k: float(rows[-1][k]) for k in real}
    lines = [f"Sample diversity (samples/diversity.csv, step {rows[-1]['step']}): within a class "
             f"{gen['within_row_std']:.3f} (training images {real['within_row_std']:.3f}), across classes "
             f"{gen['between_row_std']:.3f} (training images {real['between_row_std']:.3f})"]
    ignored = [what for what, k in (("its noise", "within_row_std"), ("the class", "between_row_std"))
               if gen[k] < 0.25 * real[k]]
    if ignored:
        lines.append(f"  the generator ignores {' and '.join(ignored)}: a collapse short runs often show; train "
                     "longer (gan.steps=...)")
    return lines


def summary(out: Path, written: dict) -> list[str]:
    """Where to look, and the tables a user reads first."""
    from hpcgan.report import load_rows
    lines = []
    sheets = sorted(out.glob("data/shards-*/contact_sheet.png")) + sorted(out.glob("synthetic/*/contact_sheet.png"))
    lines += [f"Contact sheet:   {p}" for p in sheets]
    for run in sorted((out / "gan").iterdir()):
        grids = sorted((run / "samples").glob("step-*.png"))
        if grids:
            lines.append(f"Samples:         {grids[-1]}  (curves: {run / 'curves.png'})")
            shards = out / "data" / f"shards-{run.name.rsplit('-', 1)[1]}"
            lines += [f"  {line}" for line in diversity_report(run, shards) + class_signal_report(run)]
    for key in ("table3_cell", "table5", "scarcity"):
        for name, path in written.items():
            if name.startswith(key) and str(path).endswith(".csv"):
                lines += ["", f"{name}:", Path(path).with_suffix(".md").read_text().rstrip()]
    rows = load_rows(out)
    ba = rows[(rows["stage"] == "classify") & (rows["metric"] == "balanced_accuracy") & (rows["regime"] == "original")]
    if len(ba):
        # always answering one class: balanced accuracy 1 / the classes the test split has
        per_class = rows[(rows["stage"] == "classify") & (rows["metric"] == "sensitivity") & rows["value"].notna()]
        base = 1.0 / max(1, per_class["class"].nunique())
        lines += ["", f"Classifier on real images (`original`): balanced accuracy {ba['value'].mean():.3f}; "
                      f"always the same class: {base:.3f}"]
    lines += ["", f"Report: {out / 'report'}  (tables as CSV and Markdown, figures, sources.csv)",
              f"Status: python tools/sweep.py status out={out}"]
    return lines


def demo(cfg: DemoSettings) -> int:
    out = Path(to_absolute_path(cfg.out))
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "sweep.py"), f"study={cfg.study}", f"out={out}", "executor=local",
           f"gan.sizes=[{cfg.size}]", f"data.simulate_scale={cfg.scale}", f"data.seed={cfg.seed}", *cfg.overrides]
    logger.info("the %r study, run here as on a cluster: %s", cfg.study, " ".join(cmd))
    rc = subprocess.run(cmd, cwd=REPO_ROOT).returncode
    if rc == 2:   # bad input: tools/sweep.py said what, in one line
        return 2
    if rc != 0:
        print(f"demo: a task of the study failed: python tools/sweep.py status out={out} shows which, and why",
              file=sys.stderr)
        return 1
    from hpcgan.report import report
    written = report(out)
    print("\n".join(summary(out, written)))
    return 0


@hydra.main(config_path=str(CONFIG_DIR), config_name="demo", version_base=None)
def main(dcfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    with exit_on_error("demo"):
        cfg = parse(DemoSettings, dcfg)
    sys.exit(demo(cfg))


if __name__ == "__main__":
    main()
