#!/usr/bin/env python
"""The cut classes' real cells beside each synthetic set's (tools/lever_screen.sh OUT): one PNG, a row per
(class, source), the first `per_row` cells of each in order (the cut's order for the real ones, generation order
for the synthetic ones: what a classifier's top-up takes first).

    python tools/lever_sheet.py SHARDS OUT PNG [--sets cellgan,cellgan-curated,...] [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

CUT = {"monocyte": 20, "eosinophil": 20}


def cells(shards, index=None, split: str = "train"):
    """A label -> its cells (NHWC uint8, as contact_sheet takes) function over one decoded split."""
    from hpcgan.metrics.cell import CellTrainSettings, load_split
    x, y = load_split(shards, split, CellTrainSettings(backend="webdataset"), torch.device("cpu"), index=index)
    return lambda label: x[y == label].permute(0, 2, 3, 1).numpy()


def main() -> None:
    from hpcgan.data.scarce import cut_split
    from hpcgan.data.shards import read_manifest
    from hpcgan.viz import contact_sheet
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards")
    ap.add_argument("out")
    ap.add_argument("png")
    ap.add_argument("--sets", default=None, help="synthetic sets under OUT/syn (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-row", type=int, default=12)
    args = ap.parse_args()
    classes = read_manifest(args.shards)["classes"]
    index, _ = cut_split(args.shards, "train", CUT, args.seed)
    sets = args.sets.split(",") if args.sets else sorted(p.name for p in Path(args.out, "syn").iterdir())
    real, synthetic = cells(args.shards, index), {name: cells(Path(args.out, "syn", name)) for name in sets}
    rows = {}
    for cls in CUT:
        label = classes.index(cls)
        rows[f"{cls}: real (the cut's {CUT[cls]})"] = real(label)
        for name in sets:
            rows[f"{cls}: {name}"] = synthetic[name](label)
    print(contact_sheet(rows, args.png, title="cut classes: real cells and each synthetic set's first cells",
                        per_row=args.per_row, tile=48))


if __name__ == "__main__":
    main()
