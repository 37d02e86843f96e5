#!/usr/bin/env python
"""The lever screen's table (a study folder, e.g. study=levers, or a folder of the former tools/lever_screen.sh):
one row per classifier run under OUT/cls, with its GAN's budget and curation, as markdown on stdout.

    python tools/lever_table.py OUT [--cut CLASS,CLASS]

The cut classes are those each run was trained with (its results.json's settings.scarce); --cut names others.

Columns: the run's tag (a study's row, e.g. on_rival; the former script's lever) and synthetic set (a study's name
for it: the GAN or its variant), the regime, balanced accuracy and macro-F1 on the real test split, recall of each
cut class and their mean, the classifier's steps (run / best), and for synthetic rows the GAN's steps and training
seconds, when curated the cut classes' kept / drawn, and when drawn as views (views=true) the cut classes' anchors
and the sigma.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def gan_cells(result: dict, cut: list[str]) -> list[str]:
    syn = (result.get("synthetic") or {})
    path = syn.get("shards") or syn.get("path")
    if not path:
        return ["–", "–", "–", "–"]
    manifest = _json(Path(path) / "manifest.json")
    run = Path(manifest.get("checkpoint", {}).get("path", "")).parent.parent
    status = _json(run / "status.json")
    seconds = (status.get("time_budget") or {}).get("elapsed_s")
    if seconds is None and (run / "log.csv").is_file():   # the training seconds of its last log row
        import csv
        with open(run / "log.csv", newline="") as f:
            seconds = float(list(csv.DictReader(f))[-1]["time"])
    curation = manifest.get("curation") or {}
    kept = ", ".join(f"{c} {t['kept']}/{t['drawn']}" for c, t in curation.get("classes", {}).items() if c in cut)
    return [str(status.get("step", "?")), f"{seconds:.0f}" if isinstance(seconds, (int, float)) else "–", kept or "–",
            views_cell(manifest.get("views"), cut)]


def views_cell(views: dict | None, cut: list[str]) -> str:
    """The cut classes drawn as views (tools/generate.py views=true): their anchors, and the sigma; class-swapped
    views (view_from=others): the cut classes drawn, and the anchors and classes they borrow from."""
    views = views or {}
    if views.get("source") == "others":
        drawn = [c for c in views.get("view_classes") or [] if c in cut]
        if not drawn:
            return "–"
        lent = views.get("classes") or {}
        return (f"{', '.join(drawn)} swapped: {sum(v['anchors'] for v in lent.values())} anchors of {len(lent)} "
                f"other classes (sigma {views['sigma']:g})")
    anchors = ", ".join(f"{c} {v['anchors']}" for c, v in (views.get("classes") or {}).items() if c in cut)
    return f"{anchors} (sigma {views['sigma']:g})" if anchors else "–"


def row(result: dict, cut: list[str]) -> list[str]:
    m, recall = result["metrics"], result["per_class"]["recall"]
    cut_recall = [recall.get(c) for c in cut]
    scored = [r for r in cut_recall if r is not None]   # None: no test image of the class
    rows = result.get("rows") or [{}]
    syn_name = (result.get("synthetic") or {}).get("name") or "–"
    return [result.get("tag") or Path(result["run_dir"]).name, syn_name, result["regime"]["name"],
            f"{m['balanced_accuracy']:.3f}", f"{m['macro_f1']:.3f}", *("–" if r is None else f"{r:.2f}" for r in cut_recall),
            f"{sum(scored) / len(scored):.3f}" if scored else "–",
            f"{rows[0].get('steps_run', '?')} / {result['selection']['best_step']}", *gan_cells(result, cut)]


def cut_of(results: list[dict], given: str | None) -> list[str]:
    """The cut classes: --cut, else the one cut every run with a cut was trained with (settings.scarce; a study's
    uncut `full` run has none)."""
    if given:
        return given.split(",")
    cuts = {tuple(sorted(((r.get("settings") or {}).get("scarce") or {}))) for r in results} - {()}
    if len(cuts) > 1:
        raise SystemExit(f"the runs were trained with different cuts ({sorted(cuts)}): name one with --cut")
    cut = list(cuts.pop()) if cuts else []
    if not cut:
        raise SystemExit("the runs record no scarce cut (settings.scarce): name the classes with --cut CLASS,CLASS")
    return cut


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--cut", default=None, help="CLASS,CLASS (default: the runs' own cut)")
    args = ap.parse_args()
    paths = sorted(Path(args.out, "cls").glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    results = [_json(p) for p in paths]
    cut = cut_of(results, args.cut)
    head = ["lever", "set", "regime", "balanced acc.", "macro-F1", *(f"{c} recall" for c in cut), "mean cut recall",
            "classifier steps (run / best)", "GAN steps", "GAN s", "curation kept/drawn", "views: anchors"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for result in results:
        print("| " + " | ".join(row(result, cut)) + " |")


if __name__ == "__main__":
    main()
