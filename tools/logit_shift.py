#!/usr/bin/env python
"""What a threshold shift alone buys: a finished classifier run's kept weights scored again on its test split
with a bias added to some classes' logits (hpcgan.classify.shift). The control for a row that raises a scarce
class's recall by counting it differently.

    python tools/logit_shift.py RUN_DIR --shift eosinophil=log2,monocyte=log2 [--json OUT.json]

For regime axis prior=real with synthetic_count=N over a class's R real cells, the matching shift of the rival's
run is log((R + N) / R): log2 for 20 synthetic cells beside 20 real ones. Prints balanced accuracy, macro-F1 and
the shifted classes' recall, without and with the shift, as markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpcgan.classify.shift import shifted_scores  # noqa: E402


def table(result: dict) -> str:
    names = list(result["shift"])
    head = ["scored", "balanced acc.", "macro-F1", *(f"{c} recall" for c in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in (("plain", "kept weights"), ("shifted", "with the shift " + ", ".join(
            f"{c} +{b:.3f}" for c, b in result["shift"].items()))):
        sc = result[key]
        recall = [f"{sc['per_class']['recall'][c]:.3f}" if sc["per_class"]["recall"][c] is not None else "–"
                  for c in names]
        lines.append(f"| {label} | {sc['overall']['balanced_accuracy']:.3f} | {sc['overall']['macro_f1']:.3f} | "
                     + " | ".join(recall) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--shift", required=True, help="CLASS=BIAS,... (BIAS a number or logN)")
    ap.add_argument("--json", help="also write the scores and confusion matrices here")
    a = ap.parse_args(argv)
    try:
        result = shifted_scores(a.run_dir, a.shift)
    except (ValueError, FileNotFoundError) as e:
        print(f"logit_shift: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if a.json:
        from hpcgan.jsonfile import write_json
        write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
