#!/usr/bin/env python
"""What a threshold shift alone buys: a finished classifier run's kept weights scored again on its test split
with a bias added to some classes' logits (hpcgan.classify.shift). The control for a row that raises a scarce
class's recall by counting it differently.

    python tools/logit_shift.py RUN_DIR --shift eosinophil=log2,monocyte=log2 [--json OUT.json]
    python tools/logit_shift.py RIVAL_RUN --like PRIOR_REAL_RUN

--like takes the shift a real+synthetic run with loss=logit_adjust prior=real amounts to if its synthetic cells
held no information: tau * log((R + S) / R) for each class with R real and S synthetic training images (log 2 for
20 synthetic cells beside 20 real ones, but also about 0.07 for a class of 280 real ones). Prints balanced accuracy,
macro-F1 and the recall of the classes shifted most, without and with the shift, as markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpcgan.classify.shift import shift_like, shifted_scores  # noqa: E402


def table(result: dict) -> str:
    order = sorted(result["shift"], key=lambda c: -result["shift"][c])   # the classes shifted most first
    names = order[:4]
    head = ["scored", "balanced acc.", "macro-F1", *(f"{c} recall" for c in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in (("plain", "kept weights"), ("shifted", "with the shift " + ", ".join(
            f"{c} +{result['shift'][c]:.3f}" for c in order))):
        sc = result[key]
        recall = [f"{sc['per_class']['recall'][c]:.3f}" if sc["per_class"]["recall"][c] is not None else "–"
                  for c in names]
        lines.append(f"| {label} | {sc['overall']['balanced_accuracy']:.3f} | {sc['overall']['macro_f1']:.3f} | "
                     + " | ".join(recall) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--shift", help="CLASS=BIAS,... (BIAS a number or logN)")
    how.add_argument("--like", help="a finished run with loss=logit_adjust prior=real: the shift it amounts to")
    ap.add_argument("--json", help="also write the scores and confusion matrices here")
    a = ap.parse_args(argv)
    try:
        result = shifted_scores(a.run_dir, shift_like(a.like) if a.like else a.shift)
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
