"""Issue 20's test, computed from a scarcity study's own rows: does a regime with synthetic cells beat the best
cheap recipe without them (the study's `rival` rows) by at least half the gap from the rival to `full` (the
rival's recipe on the uncut split) on the cut classes' mean recall, at no less balanced accuracy?

    target = rival + (full - rival) / 2       (each the mean over seeds of the cut classes' mean recall)
    met    = cut recall >= target and balanced accuracy >= the rival's

Each candidate row (a GAN's cells: `synthetic_from`; or the rival's recipe with N real cells per cut class:
`realN`, the bar a synthetic row is measured against) is also paired with the rival seed by seed: the mean of the
per-seed gains and how many seeds gained. hpcgan.report writes one table per cut, architecture and image size.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

ROW = ["tag", "regime", "synthetic_from"]       # what makes a row of the table (its runs differ by seed only)
REAL_N = r"real(\d+)"                           # classify.more_real's rows: the cut classes at N real cells


class VerdictError(ValueError):
    """The rows cannot be judged as they are (e.g. two runs of one row with the same seed)."""


def real_n(tag) -> int | None:
    """N of a `realN` tag, else None."""
    found = re.fullmatch(REAL_N, tag) if isinstance(tag, str) else None
    return int(found.group(1)) if found else None


def tta_of(value) -> bool:
    """A row's `tta` (8-view test-time averaging): rows from before it was recorded have none, i.e. False."""
    return bool(value) if isinstance(value, (bool, np.bool_)) else False


def per_run(part: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per classifier run that has the recall of every cut class and its balanced accuracy: run_dir,
    arch, tta, tag, regime, synthetic_from, seed, cut_recall (the mean over the cut classes), balanced_accuracy.
    A run appended more than once (another step cap) counts by its last rows, as everywhere in the report."""
    rec = part[(part["metric"] == "sensitivity") & part["class"].isin(classes)]
    rec = rec.drop_duplicates(["run_dir", "class"], keep="last")
    rec = rec.groupby("run_dir")["value"].agg(cut_recall="mean", n="count")
    rec = rec[rec["n"] == len(classes)].drop(columns="n")
    whole = part[(part["metric"] == "balanced_accuracy") & part["class"].isna()]
    ba = whole.drop_duplicates("run_dir", keep="last").set_index("run_dir")
    runs = ba[["arch", *ROW, "seed"]].join(ba["value"].rename("balanced_accuracy")).join(rec, how="inner")
    runs[ROW] = runs[ROW].astype(object).where(runs[ROW].notna(), None)
    tta = ba["tta"] if "tta" in ba else pd.Series(False, index=ba.index)
    runs["tta"] = tta.reindex(runs.index).map(tta_of)
    return runs.reset_index()


def verdicts(part: pd.DataFrame, classes: list[str]) -> dict[tuple[str, bool], pd.DataFrame]:
    """(arch, tta) -> its verdict table (candidates best cut recall first), for every classifier architecture
    (with test-time augmentation or without) that has `rival` and `full` runs and at least one candidate; the
    reference numbers are columns of every row. Two runs of one row with the same seed: VerdictError."""
    runs, out = per_run(part, classes), {}
    for (arch, tta), mine in runs.groupby(["arch", "tta"]):
        rival, full = mine[mine["tag"] == "rival"], mine[mine["tag"] == "full"]
        candidates = mine[mine["synthetic_from"].notna() | mine["tag"].map(real_n).notna()]
        if rival.empty or full.empty or candidates.empty:
            continue
        for _key, runs_of_row in [(("rival",), rival), (("full",), full), *candidates.groupby(ROW, dropna=False)]:
            twice = runs_of_row[runs_of_row["seed"].duplicated(keep=False)]
            if len(twice):
                raise VerdictError(f"{arch}: runs {sorted(twice['run_dir'])} are one row with the same seed: "
                                   "report each study from its own folder")
        ref = _reference(rival, full)
        rows = [_judge(key, group, rival, ref) for key, group in candidates.groupby(ROW, dropna=False)]
        table = pd.DataFrame(rows).sort_values("cut_recall", ascending=False, kind="stable")
        out[(str(arch), bool(tta))] = table.reset_index(drop=True)
    return out


def _reference(rival: pd.DataFrame, full: pd.DataFrame) -> dict:
    r, f = rival["cut_recall"].mean(), full["cut_recall"].mean()
    return {"rival_cut_recall": r, "rival_balanced_accuracy": rival["balanced_accuracy"].mean(),
            "rival_seeds": len(rival), "rival_per_seed": per_seed(rival), "full_cut_recall": f,
            "full_seeds": len(full), "full_per_seed": per_seed(full), "target": r + (f - r) / 2}


def per_seed(runs: pd.DataFrame) -> str:
    """The runs' cut recalls by seed, "0:0.8500;1:0.7500": the CSV keeps what the figure draws (seeds_of)."""
    return ";".join(f"{int(s)}:{v:.4f}" for s, v in sorted(zip(runs["seed"], runs["cut_recall"])))


def seeds_of(cell: str) -> list[float]:
    return [float(kv.split(":")[1]) for kv in str(cell).split(";") if ":" in kv]


def _judge(key: tuple, group: pd.DataFrame, rival: pd.DataFrame, ref: dict) -> dict:
    tag, regime, synthetic_from = (None if isinstance(k, float) and np.isnan(k) else k for k in key)
    paired = group.merge(rival[["seed", "cut_recall"]], on="seed", suffixes=("", "_rival"), validate="one_to_one")
    gains = paired["cut_recall"] - paired["cut_recall_rival"]
    recall, ba = group["cut_recall"].mean(), group["balanced_accuracy"].mean()
    return {"tag": tag, "regime": regime, "synthetic_from": synthetic_from,
            "cells": f"synthetic: {synthetic_from}" if synthetic_from else f"{real_n(tag)} real per cut class",
            "seeds": len(group), "cut_recall": recall, "per_seed": per_seed(group),
            "cut_recall_std": group["cut_recall"].std() if len(group) > 1 else np.nan,
            "balanced_accuracy": ba, "gain": recall - ref["rival_cut_recall"],
            "needed": ref["target"] - ref["rival_cut_recall"],
            "paired_gain": gains.mean() if len(gains) else np.nan,
            "seeds_gained": f"{int((gains > 0).sum())}/{len(gains)}",
            "met": bool(recall >= ref["target"] and ba >= ref["rival_balanced_accuracy"]),
            "run_dirs": ";".join(sorted(group["run_dir"])), **ref}


def markdown(table: pd.DataFrame, arch: str, cut: str) -> str:
    """The verdict as a sentence of reference numbers, a table and the rows that meet it."""
    ref = table.iloc[0]
    head = (f"Issue 20's test on the cut {cut} ({arch}): the rival's mean cut recall {ref['rival_cut_recall']:.3f} "
            f"at {ref['rival_balanced_accuracy']:.3f} balanced accuracy ({ref['rival_seeds']} seeds), `full` "
            f"{ref['full_cut_recall']:.3f} ({ref['full_seeds']} seeds): the target is **{ref['target']:.3f}** "
            f"at no less than {ref['rival_balanced_accuracy']:.3f}.")
    shown = pd.DataFrame({
        "row": [row_name(r) for _, r in table.iterrows()], "cells": table["cells"], "seeds": table["seeds"],
        "mean cut recall": [_pm(m, s) for m, s in zip(table["cut_recall"], table["cut_recall_std"])],
        "balanced acc.": table["balanced_accuracy"].map("{:.3f}".format),
        "gain over the rival (needed)": [f"{g:+.3f} ({n:+.3f})" for g, n in zip(table["gain"], table["needed"])],
        "paired gain (seeds gained)": [f"{p:+.3f} ({s})" if np.isfinite(p) else f"– ({s})"
                                       for p, s in zip(table["paired_gain"], table["seeds_gained"])],
        "met": table["met"].map({True: "**yes**", False: "no"})})
    met = table[table["met"] & table["synthetic_from"].notna()]
    tail = ("Met by: " + ", ".join(f"{row_name(r)} ({r['cells']})" for _, r in met.iterrows()) + "." if len(met)
            else "No row with synthetic cells meets it.")
    return f"{head}\n\n{shown.to_markdown(index=False, disable_numparse=True)}\n\n{tail}\n"


def row_name(r: pd.Series) -> str:
    return " ".join(v for v in (r["tag"], r["regime"]) if isinstance(v, str))


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}" if np.isfinite(std) else f"{mean:.3f}"
