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

import numpy as np
import pandas as pd

GROUP = ["tag", "regime", "synthetic_from"]


def per_run(part: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """One row per classifier run that has the recall of every cut class and its balanced accuracy: arch, tag,
    regime, synthetic_from, seed, cut_recall (the mean over the cut classes), balanced_accuracy."""
    rec = part[(part["metric"] == "sensitivity") & part["class"].isin(classes)]
    rec = rec.groupby("run_dir")["value"].agg(cut_recall="mean", n="count")
    rec = rec[rec["n"] == len(classes)].drop(columns="n")
    whole = part[(part["metric"] == "balanced_accuracy") & part["class"].isna()]
    ba = whole.drop_duplicates("run_dir", keep="last").set_index("run_dir")
    runs = ba[["arch", *GROUP, "seed"]].join(ba["value"].rename("balanced_accuracy")).join(rec, how="inner")
    runs[GROUP] = runs[GROUP].astype(object).where(runs[GROUP].notna(), None)
    return runs.reset_index()


def verdicts(part: pd.DataFrame, classes: list[str]) -> dict[str, pd.DataFrame]:
    """arch -> its verdict table (candidates best cut recall first), for every arch with `rival` and `full`
    runs; the reference numbers are columns of every row."""
    runs, out = per_run(part, classes), {}
    for arch, mine in runs.groupby("arch"):
        rival, full = mine[mine["tag"] == "rival"], mine[mine["tag"] == "full"]
        real_n = mine["tag"].astype(str).str.fullmatch(r"real\d+")
        candidates = mine[mine["synthetic_from"].notna() | real_n]
        if rival.empty or full.empty or candidates.empty:
            continue
        ref = _reference(rival, full)
        rows = [_judge(key, group, rival, ref) for key, group in candidates.groupby(GROUP, dropna=False)]
        table = pd.DataFrame(rows).sort_values("cut_recall", ascending=False, kind="stable")
        out[str(arch)] = table.reset_index(drop=True)
    return out


def _reference(rival: pd.DataFrame, full: pd.DataFrame) -> dict:
    r, f = rival["cut_recall"].mean(), full["cut_recall"].mean()
    return {"rival_cut_recall": r, "rival_balanced_accuracy": rival["balanced_accuracy"].mean(),
            "rival_seeds": len(rival), "rival_per_seed": per_seed(rival), "full_cut_recall": f,
            "full_seeds": len(full), "full_per_seed": per_seed(full), "target": r + (f - r) / 2}


def per_seed(runs: pd.DataFrame) -> str:
    """The runs' cut recalls by seed, "0:0.8500;1:0.7500": a CSV cell the figure reads back (seeds_of)."""
    return ";".join(f"{int(s)}:{v:.4f}" for s, v in sorted(zip(runs["seed"], runs["cut_recall"])))


def seeds_of(cell: str) -> list[float]:
    return [float(kv.split(":")[1]) for kv in str(cell).split(";") if ":" in kv]


def _judge(key: tuple, group: pd.DataFrame, rival: pd.DataFrame, ref: dict) -> dict:
    tag, regime, synthetic_from = (None if isinstance(k, float) and np.isnan(k) else k for k in key)
    paired = group.merge(rival[["seed", "cut_recall"]], on="seed", suffixes=("", "_rival"))
    gains = paired["cut_recall"] - paired["cut_recall_rival"]
    recall, ba = group["cut_recall"].mean(), group["balanced_accuracy"].mean()
    return {"tag": tag, "regime": regime, "synthetic_from": synthetic_from,
            "cells": f"synthetic: {synthetic_from}" if synthetic_from else f"{tag[4:]} real per cut class",
            "seeds": len(group), "cut_recall": recall, "per_seed": per_seed(group),
            "cut_recall_std": group["cut_recall"].std() if len(group) > 1 else np.nan,
            "balanced_accuracy": ba, "gain": recall - ref["rival_cut_recall"],
            "needed": ref["target"] - ref["rival_cut_recall"],
            "paired_gain": gains.mean() if len(gains) else np.nan,
            "seeds_gained": f"{int((gains > 0).sum())}/{len(gains)}",
            "met": bool(recall >= ref["target"] and ba >= ref["rival_balanced_accuracy"]), **ref}


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
