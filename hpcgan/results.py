"""Results rows: the one format every measuring stage writes and the report reads (DESIGN.md, "Results").

A stage (evaluate, classify) writes one JSON document per run (`write_result`, atomic) holding its settings,
provenance and a list of rows, and appends the same rows to a JSON-lines file (`append_rows`, one write, so
rows of concurrent jobs never interleave). A row is one number with what places it in a table and traces it
back:
    stage, run_dir, metric, class (None for the whole set), value (None when not finite or not computed,
    then "skipped" says why), and the grouping columns of its stage: model / arch, seed, steps, image_size,
    regime, extractor and its sha256, manifest_sha256, numbers of images ...
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

from hpcgan.fsutil import atomic_write_bytes
from hpcgan.jsonfile import dumps

REQUIRED = ("stage", "run_dir", "metric", "class", "value")


def number(v) -> float | None:
    """A finite float, or None (JSON has no nan/inf; a missing number must not read as a zero)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def check_rows(rows: Iterable[dict]) -> list[dict]:
    rows = list(rows)
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise ValueError(f"results row lacks {missing}: {r}")
    return rows


def write_result(path: str | Path, doc: dict) -> None:
    """The run's result document (with its "rows"), atomically."""
    check_rows(doc.get("rows", []))
    atomic_write_bytes(path, (dumps(doc, indent=1) + "\n").encode())


def append_rows(path: str | Path, rows: Iterable[dict]) -> None:
    """Append rows to a JSON-lines file in one write (O_APPEND): concurrent writers do not interleave."""
    rows = check_rows(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(dumps(r) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_rows(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
