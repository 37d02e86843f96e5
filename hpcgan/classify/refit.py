"""A refit: train again on train + val for the steps a finished run chose on val; score the last weights on test.

Model selection needs a val split, and the paper's split gives it 20% of train: a classifier then trains on 56% of
the cells (70% x 0.8). Once a run has made its choices on val (the step of its best val score and, under
`schedule=plateau`, the steps of its learning-rate decays), they are fixed numbers, and val's cells can train too:

    python tools/classify.py <RUN's settings> refit_from=RUN out=NEW

  - the settings must be RUN's (run.MUST_MATCH, the shards' manifest included), else an error lists the differences;
  - NEW trains on RUN's training set plus the whole val split, for RUN's best step, with RUN's learning rate (the
    same warm-up, then the cosine over RUN's `steps`, or RUN's plateau decays at their steps), from the same seed;
  - NEW never scores val (it trains on it): the weights of its last step are scored on test.
A scarce cut is refused (val's cells of a cut class would undo the cut), and so is score_split=val (a rival search's
runs select on val). The plan is a pure function of RUN's results.json, so a resumed refit continues exactly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from hpcgan.classify.data import DataError
from hpcgan.rundir import read_json

RESULT = "results.json"


@dataclass(frozen=True)
class RefitPlan:
    source: str                   # the run whose choices are replayed
    best_step: int                # its best val step: the refit's length
    decayed_at: tuple[int, ...]   # its plateau decays (empty under cosine)
    source_result_time: float     # when its results.json was written (a rerun of RUN is another plan)

    def as_dict(self) -> dict:
        return {**asdict(self), "decayed_at": list(self.decayed_at)}


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
        raise DataError(f"refit_from={rd} ran schedule=plateau before runs recorded their decay steps "
                        "(lr_decay_steps in results.json): run it again with this version")
    best = int(selection.get("best_step", -1))
    if best < 1:
        raise DataError(f"refit_from={rd}: its results.json has no best val step")
    return RefitPlan(str(rd), best, tuple(int(d) for d in decayed or ()), float(doc.get("time", 0.0)))

