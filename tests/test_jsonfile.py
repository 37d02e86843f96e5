"""hpcgan.jsonfile: every file the project writes is strict JSON, "not scored" is null."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from hpcgan.jsonfile import dumps, loads_strict, plain, write_json


def test_non_finite_numbers_of_every_kind_become_null():
    doc = {"a": float("nan"), "b": [1.5, float("inf"), -float("inf")], "c": np.float32("nan"),
           "d": np.array([0.25, np.nan]), "e": (np.int64(3), np.bool_(True)), "f": {"g": Path("/x/y")}}
    assert plain(doc) == {"a": None, "b": [1.5, None, None], "c": None, "d": [0.25, None], "e": [3, True],
                          "f": {"g": "/x/y"}}
    text = dumps(doc)
    assert "NaN" not in text and "Infinity" not in text
    assert loads_strict(text)["d"] == [0.25, None]


def test_finite_values_are_kept_exactly():
    doc = {"x": 0.1 + 0.2, "n": np.float64(2.5e-300), "i": 7, "s": "nan", "z": None}
    assert json.loads(dumps(doc)) == {"x": 0.1 + 0.2, "n": 2.5e-300, "i": 7, "s": "nan", "z": None}


def test_the_strict_reader_refuses_what_python_writes_by_default():
    with pytest.raises(ValueError, match="NaN"):
        loads_strict(json.dumps({"v": math.nan}))


def test_an_unwritable_object_is_an_error_and_no_file_appears(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"v": object()})
    assert not (tmp_path / "x.json").exists()
    write_json(tmp_path / "y.json", {"v": np.nan})
    assert (tmp_path / "y.json").read_text() == '{\n  "v": null\n}\n'
