"""hpcgan.results: the rows every measuring stage writes."""
import json
import math
import multiprocessing

import numpy as np
import pytest

from hpcgan.results import append_rows, number, read_rows, write_result


def test_number_keeps_finite_values_and_drops_the_rest():
    assert number(np.float32(0.5)) == 0.5 and isinstance(number(np.float32(0.5)), float)
    assert number(float("nan")) is None and number(math.inf) is None and number(None) is None


def test_rows_round_trip_and_bad_rows_are_refused(tmp_path):
    rows = [{"stage": "evaluate", "run_dir": "r", "metric": "fid", "class": None, "value": np.float64(1.5)}]
    write_result(tmp_path / "doc.json", {"rows": rows, "path": tmp_path})
    append_rows(tmp_path / "rows.jsonl", rows)
    append_rows(tmp_path / "rows.jsonl", rows)
    assert read_rows(tmp_path / "rows.jsonl") == [dict(rows[0], value=1.5)] * 2
    assert json.loads((tmp_path / "doc.json").read_text())["path"] == str(tmp_path)
    with pytest.raises(ValueError, match="lacks"):
        append_rows(tmp_path / "rows.jsonl", [{"metric": "fid"}])


def _writer(args):
    path, i = args
    append_rows(path, [{"stage": "s", "run_dir": str(i), "metric": "m", "class": None, "value": float(j),
                        "pad": "x" * 2000} for j in range(20)])


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "rows.jsonl"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_writer, [(path, i) for i in range(8)])
    rows = read_rows(path)  # every line parses: no torn rows
    assert len(rows) == 160 and sorted({r["run_dir"] for r in rows}) == [str(i) for i in range(8)]
