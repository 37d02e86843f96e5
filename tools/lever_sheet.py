#!/usr/bin/env python
"""The cut classes' real cells beside each synthetic set's: one PNG, a row per (class, source), the first
`per_row` cells of each in order (the cut's order for the real ones, generation order for the synthetic ones: what
a classifier's top-up takes first). OUT is a study folder (sets in OUT/synthetic/NAME-s<seed>-<size>, e.g.
study=levers) or a folder of the former tools/lever_screen.sh (OUT/syn/NAME).

    python tools/lever_sheet.py SHARDS OUT PNG [--sets cellgan,cellgan-curated,...] [--seed 0]
                                [--cut CLASS=N,CLASS=N]

The cut defaults to the study's own (OUT/study.json's data.scarce).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

def parse_cut(text: str) -> dict[str, int]:
    """"monocyte=10,eosinophil=10" -> {"monocyte": 10, "eosinophil": 10}."""
    cut = {}
    for item in text.split(","):
        name, eq, n = item.partition("=")
        if not eq or not n.strip().isdigit():
            raise SystemExit(f"--cut {text!r}: give CLASS=N,CLASS=N")
        cut[name.strip()] = int(n)
    return cut


def study_cut(out: Path) -> dict[str, int]:
    """The study's data.scarce (OUT/study.json), for a folder without a --cut."""
    import json
    path = out / "study.json"
    cut = (json.loads(path.read_text())["settings"]["data"].get("scarce") if path.is_file() else None)
    if not cut:
        raise SystemExit(f"{path} names no scarce cut (data.scarce): give --cut CLASS=N,CLASS=N")
    return {str(k): int(v) for k, v in cut.items()}


def set_dirs(out: Path, seed: int, size: int, names: list[str] | None) -> dict[str, Path]:
    """{set name: its folder}: a study's OUT/synthetic/NAME-s<seed>-<size>, else OUT/syn/NAME."""
    if (out / "synthetic").is_dir():
        tail = f"-s{seed}-{size}"
        found = {p.name[:-len(tail)]: p for p in sorted((out / "synthetic").iterdir()) if p.name.endswith(tail)}
    elif (out / "syn").is_dir():
        found = {p.name: p for p in sorted((out / "syn").iterdir())}
    else:
        raise SystemExit(f"{out} holds neither synthetic/ (a study folder) nor syn/ (the former lever_screen.sh's)")
    found = dict(sorted(found.items()))
    missing = sorted(set(names or ()) - set(found))
    if missing:
        raise SystemExit(f"no synthetic set {', '.join(missing)} in {out} (found: {', '.join(found)})")
    return {n: found[n] for n in names} if names else found


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
    ap.add_argument("--sets", default=None, help="synthetic set names (default: all of the seed and size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cut", default=None, help="the scarce cut, CLASS=N,CLASS=N (default: the study's data.scarce)")
    ap.add_argument("--per-row", type=int, default=12)
    args = ap.parse_args()
    man = read_manifest(args.shards)
    cut = parse_cut(args.cut) if args.cut else study_cut(Path(args.out))
    classes = man["classes"]
    index, _ = cut_split(args.shards, "train", cut, args.seed)
    dirs = set_dirs(Path(args.out), args.seed, int(man["image_size"]), args.sets.split(",") if args.sets else None)
    real, synthetic = cells(args.shards, index), {name: cells(d) for name, d in dirs.items()}
    rows = {}
    for cls in cut:
        label = classes.index(cls)
        rows[f"{cls}: real (the cut's {cut[cls]})"] = real(label)
        for name in dirs:
            rows[f"{cls}: {name}"] = synthetic[name](label)
    print(contact_sheet(rows, args.png, title="cut classes: real cells and each synthetic set's first cells",
                        per_row=args.per_row, tile=48))


if __name__ == "__main__":
    main()
