"""A finished classifier run's kept weights: the state dict its best validation score chose, with the run's
config. One job, shared by the logit-shift control (hpcgan.classify.shift) and by tools/export_weights.py, which
writes them as a file another run starts from (`pretrained_file=`: every tensor but the head)."""
from __future__ import annotations

from pathlib import Path

from hpcgan.checkpoint import load_latest
from hpcgan.classify.splitbn import real_layers
from hpcgan.rundir import CONFIG, read_config, read_status


def kept_weights(run_dir: str | Path) -> tuple[dict, dict, int | None]:
    """(config, state dict, step) of the weights the run kept (best on val), as the plain architecture holds them
    (a `synthetic_bn=split` run's real-cell layers: hpcgan.classify.splitbn.real_layers); ValueError, naming why, for a folder
    that is not a run, a run that did not finish or one that holds no kept weights."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a classifier run directory (no {CONFIG})")
    cfg = read_config(run_dir)
    if read_status(run_dir).get("state") != "finished":
        raise ValueError(f"{run_dir} is not a finished classifier run (status.json): its kept weights are not final")
    state, _ = load_latest(run_dir, required=("best", "config"))
    if state is None or not state["best"].get("model"):
        raise ValueError(f"{run_dir}: no checkpoint with kept weights; is it a finished classifier run?")
    return cfg, real_layers(state["best"]["model"]), state["best"].get("step")
