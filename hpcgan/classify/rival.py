"""The rival search of the scarcity study: which cheap recipe a study's `rival` and `full` rows use.

A cheap recipe is a setting of the three axes that need no synthetic data (sampling x loss x augment,
hpcgan.classify.regimes). The study trains one classifier per combination on the cut train split, one seed,
each scored on the **val** split (`score_split=val`: the test split is never read), and `pick` chooses the
best by the runs' val score (`select_on`; the first given on a tie). A run given `recipe_from=RUN_DIRS` takes
the winner's axes for those it does not set itself, so the winner's recipe then runs with every seed on the
test split (`rival`), on the uncut split (`full`), or under synthetic data ("does a GAN add to the rival?").
The choice, with the runner-up and the val margin, is recorded with the run's results.
"""
from __future__ import annotations

import itertools
from pathlib import Path

from hpcgan.classify.augment import RECIPES
from hpcgan.classify.data import DataError
from hpcgan.classify.regimes import LOSSES, SAMPLING, Regime
from hpcgan.rundir import read_json

RECIPE_AXES = ("sampling", "loss", "augment")


def search_grid(choices: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the recipe axes: `choices` names the values per axis (a missing axis: all of them;
    augment: none and every recipe of hpcgan.classify.augment.RECIPES)."""
    every = {"sampling": list(SAMPLING), "loss": list(LOSSES), "augment": ["none", *RECIPES]}
    unknown = set(choices) - set(RECIPE_AXES)
    if unknown:
        raise ValueError(f"rival_search: {sorted(unknown)} are not recipe axes ({', '.join(RECIPE_AXES)})")
    lists = {axis: [str(v) for v in choices.get(axis) or every[axis]] for axis in RECIPE_AXES}
    for axis, values in lists.items():
        bad = [v for v in values if v not in every[axis]]
        if bad:
            raise ValueError(f"rival_search.{axis}: {bad} not among {every[axis]}")
        if len(set(values)) != len(values):
            raise ValueError(f"rival_search.{axis}: {values} repeats a value")
    return [dict(zip(RECIPE_AXES, combo)) for combo in itertools.product(*lists.values())]


def pick(run_dirs, metric: str = "macro_f1") -> dict:
    """The search run with the best val `metric` (the first given on a tie): its axes, its score, the runner-up
    and the margin, and every candidate's score. DataError when a run has not finished, was scored on test,
    or trained on synthetic data."""
    candidates = []
    for d in map(Path, run_dirs):
        doc = read_json(d / "results.json")
        if doc is None:
            raise DataError(f"recipe_from: {d} has no results.json: that search run has not finished (run it first)")
        if doc.get("real", {}).get("split") != "val":
            raise DataError(f"recipe_from: {d} was scored on the {doc.get('real', {}).get('split')} split; a rival "
                            "is chosen on val only (its search runs take score_split=val)")
        regime = Regime(**doc["regime"])
        if regime.data != "real":
            raise DataError(f"recipe_from: {d} trained on {regime.data} data; a cheap rival uses real images only")
        axes = {k: v for k, v in regime.axes().items() if k in RECIPE_AXES}
        candidates.append({"run_dir": str(d), "regime": regime.name, "axes": axes,
                           "score": float(doc["metrics"][metric])})
    if not candidates:
        raise DataError("recipe_from: no search runs given")
    ranked = sorted(range(len(candidates)), key=lambda i: (-candidates[i]["score"], i))
    best = candidates[ranked[0]]
    second = candidates[ranked[1]] if len(ranked) > 1 else None
    return {"metric": f"val_{metric}", "winner": best["regime"], "axes": best["axes"], "score": best["score"],
            "runner_up": second and second["regime"],
            "margin": None if second is None else best["score"] - second["score"],
            "candidates": candidates}
