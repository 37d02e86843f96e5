#!/usr/bin/env python
"""The lever screen's table (a study folder, e.g. study=levers, or a folder of the former tools/lever_screen.sh):
one row per classifier run under OUT/cls, with its GAN's budget and curation, as markdown on stdout.

    python tools/lever_table.py OUT [--cut monocyte,eosinophil]

Columns: the run's tag (a study's row, e.g. on_rival; the former script's lever) and synthetic set (a study's name
for it: the GAN or its variant), the regime, balanced accuracy and macro-F1 on the real test split, recall of each
cut class and their mean, the classifier's steps (run / best), and for synthetic rows the GAN's steps and training
seconds and, when curated, the cut classes' kept / drawn.
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
        return ["–", "–", "–"]
    manifest = _json(Path(path) / "manifest.json")
    run = Path(manifest.get("checkpoint", {}).get("path", "")).parent.parent
    status = _json(run / "status.json")
    seconds = (status.get("time_budget") or {}).get("elapsed_s")
    if seconds is None and (run / "log.csv").is_file():   # the training seconds of its last log row
        import csv
        with open(run / "log.csv", newline="") as f:
            seconds = float(list(csv.DictReader(f))[-1]["time"])
    curation = manifest.get("curation") or {}
    kept = ", ".join(f"{c[:3]} {t['kept']}/{t['drawn']}" for c, t in curation.get("classes", {}).items() if c in cut)
    return [str(status.get("step", "?")), f"{seconds:.0f}" if isinstance(seconds, (int, float)) else "–", kept or "–"]


def row(result: dict, cut: list[str]) -> list[str]:
    m, recall = result["metrics"], result["per_class"]["recall"]
    cut_recall = [recall[c] for c in cut]
    rows = result.get("rows") or [{}]
    syn_name = (result.get("synthetic") or {}).get("name") or "–"
    return [result.get("tag") or Path(result["run_dir"]).name, syn_name, result["regime"]["name"],
            f"{m['balanced_accuracy']:.3f}", f"{m['macro_f1']:.3f}", *(f"{r:.2f}" for r in cut_recall),
            f"{sum(cut_recall) / len(cut_recall):.3f}",
            f"{rows[0].get('steps_run', '?')} / {result['selection']['best_step']}", *gan_cells(result, cut)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--cut", default="monocyte,eosinophil")
    args = ap.parse_args()
    cut = args.cut.split(",")
    head = ["lever", "set", "regime", "balanced acc.", "macro-F1", *(f"{c} recall" for c in cut), "mean cut recall",
            "classifier steps (run / best)", "GAN steps", "GAN s", "curation kept/drawn"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path in sorted(Path(args.out, "cls").glob("*/results.json"), key=lambda p: p.stat().st_mtime):
        print("| " + " | ".join(row(_json(path), cut)) + " |")


if __name__ == "__main__":
    main()
