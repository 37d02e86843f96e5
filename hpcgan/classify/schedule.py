"""A classifier run's learning rate and its stopping rule: one object, the only home of both.

    cosine   linear warm-up over the first `warmup` steps (a `warmup` of at most 1: that share of `steps`), then
             cosine decay to 0 at `steps`; with `patience`,
             the run also stops after that many val scorings without a new best. The rate is a pure function of
             the step. At the studies' short caps the rate is still high when patience counts, and val scores
             swing by up to 0.23 macro-F1 between scorings there (the rival on pbc-dev), so patience can stop a
             run at a lucky early peak.
    plateau  the same warm-up, then the full rate until `patience` val scorings pass without a new best; then the
             rate is multiplied by `plateau_factor`, up to `plateau_decays` times, and the next such plateau ends
             the run (the rule of torch's ReduceLROnPlateau, with the stop that makes it "train until converged").
             `steps` is only the cap. The rate depends on the val history too, so its state (the steps of the
             decays taken) is checkpointed, and a resumed run continues exactly.
A refit (hpcgan.classify.refit) replays another run's rate: `replay` holds that run's decay steps, so the rate is
again a pure function of the step, and nothing stops the run before its cap (that run's best step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

SCHEDULES = ("cosine", "plateau")


@dataclass
class Schedule:
    kind: str
    lr: float
    total: int                  # the step cap
    warmup: float               # steps (over 1) or, up to 1, a share of `total`
    eval_every: int
    patience: int | None
    factor: float = 0.1
    decays: int = 2
    decayed_at: list[int] = field(default_factory=list)   # plateau: the steps of the decays taken so far
    replay: tuple[int, ...] | None = None                  # plateau: another run's decay steps, taken as given
    known: bool = True                                     # False: loaded from a checkpoint that kept only the last

    @property
    def taken(self) -> int:
        return len(self.decayed_at)

    @property
    def since(self) -> int:
        """The step of the last decay (plateau patience counts from it or the best step), 0 before any."""
        return self.decayed_at[-1] if self.decayed_at else 0

    def warmup_steps(self) -> int:
        return int(self.warmup) if self.warmup > 1 else int(round(self.warmup * self.total))

    def lr_at(self, step: int) -> float:
        w = self.warmup_steps()
        if step < w:
            return self.lr * (step + 1) / w
        if self.kind == "plateau":
            taken = self.taken if self.replay is None else sum(d <= step for d in self.replay)
            return self.lr * self.factor ** taken
        t = (step - w) / max(1, self.total - w)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def _stalled(self, step: int, best_step: int) -> bool:
        """`patience` scorings have passed since the best one (and, on a plateau, since the last decay and the
        warm-up)."""
        if self.patience is None or self.replay is not None or best_step < 0 or step >= self.total:
            return False
        # plateau: patience counts from the warm-up's end at the earliest (a decay there would be silent)
        since = max(best_step, self.since, self.warmup_steps()) if self.kind == "plateau" else best_step
        return step - since >= self.patience * self.eval_every

    def stopped(self, step: int, best_step: int) -> bool:
        """Whether the run ends at `step` before its cap (a pure query: a resumed run asks it of its checkpoint)."""
        return self._stalled(step, best_step) and (self.kind == "cosine" or self.taken >= self.decays)

    def scored(self, step: int, best_step: int) -> bool:
        """After the val scoring of `step`: take a decay where a plateau calls for one; whether the run stops."""
        if self.stopped(step, best_step):
            return True
        if self.kind == "plateau" and self._stalled(step, best_step):
            self.decayed_at.append(step)
        return False

    def decay_steps(self, before: int) -> tuple[int, ...]:
        """The steps of the decays that shaped the steps before `before`: those taken, or those replayed."""
        return tuple(d for d in (self.decayed_at if self.replay is None else self.replay) if d < before)

    def state_dict(self) -> dict:
        return {"taken": self.taken, "since": self.since, **({"decayed_at": list(self.decayed_at)} if self.known else {})}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.known = "decayed_at" in state or not state.get("taken")
        if "decayed_at" in state:
            self.decayed_at = [int(d) for d in state["decayed_at"]]
        else:   # a checkpoint from before the steps were kept: only the last one (all the rule reads) is known
            self.decayed_at = [int(state.get("since", 0))] * int(state.get("taken", 0))
