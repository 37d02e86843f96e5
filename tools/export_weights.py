#!/usr/bin/env python
"""A finished classifier run's kept weights (the step its validation score chose) as a file another run starts
from: `tools/classify.py ... pretrained_file=OUT.pt` loads every tensor but the head, which starts fresh.

    python tools/export_weights.py RUN_DIR OUT.pt

E.g. a classifier trained on synthetic cells alone (`regime=synthetic`), then the real cells' recipe from its
weights (docs/studies.md, "Synthetic cells as a classifier's first lesson"). OUT.json beside the file records the
run it came from: its directory, arch, regime, synthetic set, seed, kept step, and the file's sha256 (the one
the next run's results.json records as pretrained_sha256) and bytes. Both files are written atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpcgan.classify.kept import kept_weights  # noqa: E402
from hpcgan.classify.pretrained import save_weights  # noqa: E402


def export(run_dir: str | Path, out: str | Path) -> dict:
    """Write the run's kept weights to `out` and their record to out's .json; returns the record."""
    cfg, weights, step = kept_weights(run_dir)
    return save_weights(out, weights, {"run_dir": str(Path(run_dir).resolve()), "arch": cfg["arch"],
                                       "regime": cfg.get("regime"), "synthetic": cfg.get("synthetic"),
                                       "seed": cfg.get("seed"), "kept_step": step, "classes": cfg.get("classes")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("out", help="the weights file to write (a .pt; its record goes beside it as .json)")
    a = ap.parse_args(argv)
    if Path(a.out).suffix != ".pt":
        print(f"export_weights: {a.out}: name the file .pt (pretrained_file= reads a torch state dict)",
              file=sys.stderr)
        return 2
    try:
        record = export(a.run_dir, a.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"export_weights: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {record['arch']} kept at step {record['kept_step']} of {record['run_dir']} "
          f"(sha256 {record['sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
