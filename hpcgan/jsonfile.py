"""Every JSON and JSON-lines file the project writes is strict JSON: "not scored" is `null`, never `NaN`.

Python's json writes bare NaN/Infinity, which jq, browsers and most languages reject. `dumps` turns every
non-finite float (and numpy scalar or array) into null / lists first, then refuses anything left
(`allow_nan=False`); `write_json` writes that atomically. Readers treat null as missing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hpcgan.fsutil import atomic_write_bytes


def plain(obj: Any) -> Any:
    """`obj` with non-finite floats as None, numpy values as Python ones, paths as strings, tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k) if isinstance(k, Path) else k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":   # numpy scalar or array
        return plain(obj.tolist())
    return obj   # json.dumps says what it cannot write


def dumps(obj: Any, **kw) -> str:
    return json.dumps(plain(obj), allow_nan=False, **kw)


def write_json(path: str | Path, obj: Any, indent: int | None = 2, **kw) -> None:
    """`obj` as strict JSON in `path`, atomically (ends with a newline)."""
    atomic_write_bytes(path, (dumps(obj, indent=indent, **kw) + "\n").encode())


def loads_strict(text: str) -> Any:
    """json.loads that refuses NaN / Infinity, as strict parsers do."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)
