"""A refit: train again on train + val for the steps a finished run chose on val; score the last weights on test.

Model selection needs a val split, and the paper's split gives it 20% of train: a classifier then trains on 56% of
the cells (70% x 0.8). Once a run has made its choices on val (the step of its best val score and, under
`schedule=plateau`, the steps of its learning-rate decays), they are fixed numbers, and val's cells can train too:

    python tools/classify.py <RUN's settings> refit_from=RUN out=NEW

  - the settings must be RUN's (run.MUST_MATCH, the shards' manifest included) and so must the number of ranks,
    else an error lists the differences;
  - NEW trains on RUN's training set (its synthetic cells too, as many as RUN took) plus the whole val split, for
    RUN's best step, with RUN's learning rate (the same warm-up, then the cosine over RUN's `steps`, or RUN's plateau
    decays at their steps), from the same seed;
  - NEW never scores val (it trains on it): the weights of its last step are scored on test.
A scarce cut is refused (val's cells of a cut class would undo the cut), and so is score_split=val (a rival search's
runs select on val). The plan is a pure function of RUN's results.json (and it is checked again on resume), so a
resumed refit continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hpcgan.classify.data import DataError
from hpcgan.rundir import read_config, read_json

RESULT = "results.json"


@dataclass(frozen=True)
class RefitPlan:
    source: str                   # the run whose choices are replayed
    best_step: int                # its best val step: the refit's length
    decayed_at: tuple[int, ...]   # its plateau decays (empty under cosine)
    source_result_time: float     # when its results.json was written (a rerun of RUN is another plan)
    config: dict = field(default_factory=dict, compare=False, repr=False)   # its config.yaml (what must match)

    def as_dict(self) -> dict:
        return {"source": self.source, "best_step": self.best_step, "decayed_at": list(self.decayed_at),
                "source_result_time": self.source_result_time}


def plan(source: str | Path) -> RefitPlan:
    """The choices of a finished run, from its results.json; DataError naming the fix when it has none."""
    rd = Path(source).expanduser().resolve()
    doc = read_json(rd / RESULT)
    if doc is None or doc.get("stage") != "classify":
        raise DataError(f"refit_from={rd}: no finished classifier run there ({RESULT} missing); run it first")
    selection = doc.get("selection") or {}
    if selection.get("on") == "refit" or (doc.get("settings") or {}).get("refit_from"):
        raise DataError(f"refit_from={rd} is a refit itself: give the run that chose its step on val")
    schedule = (doc.get("settings") or {}).get("schedule", "cosine")
    decayed = doc.get("lr_decay_steps")
    if schedule == "plateau" and decayed is None:
        raise DataError(f"refit_from={rd}: its results.json does not say at which steps its learning rate decayed "
                        "(lr_decay_steps; a run from before they were recorded, or resumed from such a checkpoint): "
                        "run it again with this version")
    best = int(selection.get("best_step", -1))
    if best < 1:
        raise DataError(f"refit_from={rd}: its results.json has no best val step")
    try:
        config = read_config(rd)
    except (OSError, ValueError) as e:
        raise DataError(f"refit_from={rd}: its config.yaml cannot be read ({e})") from None
    return RefitPlan(str(rd), best, tuple(int(d) for d in decayed or ()), float(doc.get("time", 0.0)), config)

