"""A finished classifier run's kept weights scored again on its test split with a bias added to some classes'
logits: what a threshold shift alone buys. One job: the control for any row that raises a scarce class's recall
by counting it differently. Regime axis prior=real under logit adjustment (tau) amounts, if the synthetic cells
held no information, to adding tau * log((real + synthetic) / real) to the logits of every class given synthetic
cells; `shift_like` reads that shift off such a run.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from hpcgan.classify.archs import build_classifier
from hpcgan.classify.kept import kept_weights
from hpcgan.classify.metrics import scores
from hpcgan.dist import DistEnv
from hpcgan.rundir import read_config, read_json


class _Shifted(nn.Module):
    def __init__(self, net: nn.Module, bias: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.bias


def parse_shift(text: str, classes: list[str]) -> dict[str, float]:
    """"eosinophil=0.69,monocyte=log2" -> {class: bias}; a value "logN" is log(N); a class not in `classes` is
    refused, naming them."""
    shift = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        name = name if name in classes else name.replace("_", " ")   # immature_granulocyte: no quoting needed
        if not eq or name not in classes:
            raise ValueError(f"--shift {item!r}: give CLASS=BIAS with CLASS one of {', '.join(classes)}")
        value = value.strip()
        shift[name] = math.log(float(value[3:])) if value.startswith("log") else float(value)
    if not shift:
        raise ValueError("--shift: give at least one CLASS=BIAS")
    return shift


def shift_like(run_dir: str | Path) -> dict[str, float]:
    """The shift a finished real+synthetic run with loss=logit_adjust prior=real amounts to: tau * log((R + S) / R)
    for each class with R real and S > 0 synthetic training images (its training_set.json, config.yaml)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    axes = cfg.get("regime_axes") or {}
    if axes.get("loss") != "logit_adjust" or axes.get("prior") != "real":
        raise ValueError(f"{run_dir}: --like takes a run with loss=logit_adjust prior=real, not loss="
                         f"{axes.get('loss')} prior={axes.get('prior', 'all')}")
    counts = read_json(run_dir / "training_set.json")["counts"]
    tau = float(cfg["logit_adjust_tau"])
    return {c: tau * math.log((r + counts["synthetic"].get(c, 0)) / r) for c, r in counts["real"].items()
            if r > 0 and counts["synthetic"].get(c, 0) > 0}


def shifted_scores(run_dir: str | Path, shift: dict[str, float] | str, batch_size: int = 256) -> dict:
    """{"classes", "shift", "plain": scores, "shifted": scores} of the run's kept (best-on-val) weights on the
    test split, without and with `shift` added to the named classes' logits (the run's own TTA setting; on the
    CPU in fp32, so compare the shifted row with the plain one: a run scored in bf16 on a GPU may differ a little
    from its results.json)."""
    from hpcgan.classify.data import decode_split
    from hpcgan.classify.run import confusion_on
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    classes = list(cfg["classes"])
    if isinstance(shift, str):
        shift = parse_shift(shift, classes)
    unknown = sorted(set(shift) - set(classes))
    if unknown:   # a shift taken --like another run, or given as a dict: its classes must be this run's
        raise ValueError(f"shift for {unknown}: not classes of {run_dir} ({', '.join(classes)})")
    if cfg.get("score_split") == "val":
        raise ValueError(f"{run_dir} is a rival search's run, scored on val only: the test split is not for it")
    _, weights, best_step = kept_weights(run_dir)
    net, _ = build_classifier(cfg["arch"], len(classes), int(cfg["image_size"]))
    net.load_state_dict(weights)
    bias = torch.zeros(len(classes))
    for name, b in shift.items():
        bias[classes.index(name)] = b
    x, y = decode_split(cfg["shards"], "test", torch.device("cpu"), backend="auto", num_threads=None)
    env, tta = DistEnv(), bool(cfg.get("tta", False))
    cms = [confusion_on(m, x, y, len(classes), env, batch_size, tta=tta) for m in (net, _Shifted(net, bias))]
    return {"classes": classes, "shift": shift, "best_step": best_step,
            "plain": scores(cms[0], classes), "shifted": scores(cms[1], classes),
            "confusion_matrix": {"plain": np.asarray(cms[0]).tolist(), "shifted": np.asarray(cms[1]).tolist()}}
