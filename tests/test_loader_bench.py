"""tools/bench_data.py end to end on a tiny simulated set: it runs and writes the JSON it promises."""
from __future__ import annotations

import importlib.util
import json

import pytest

from hpcgan import REPO_ROOT


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_data", REPO_ROOT / "tools" / "bench_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_bench_data_writes_json(tmp_path):
    out = tmp_path / "bench" / "bench_data.json"
    load_tool().main(["--out", str(out), "--work", str(tmp_path), "--scale", "0.1", "--skip-sharding",
                      "--sizes", "32", "--batch", "8", "--epochs", "1",
                      "--backends", "dali", "webdataset", "imagefolder"])
    result = json.loads(out.read_text())
    (row,) = result["loading"]
    assert row["size"] == 32 and row["batch"] == 8 and row["train_images"] > 8
    for name in ("dali", "webdataset", "imagefolder"):
        r = row["backends"][name]
        assert "skipped" in r or (r["images"] > 0 and r["images_per_s"] > 0), r
    if "images_per_s" in row["backends"]["dali"]:
        assert row["pass"] == (row["dali_over_webdataset"] >= 1.5)
    assert result["all_targets_pass"] in (True, False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench_data-")]  # scratch removed


def test_bench_shard_scale_writes_json(tmp_path):
    """tools/bench_shard_scale.py: growing sources (simulated cells in their 8 orientations), every stage timed,
    and the near-duplicate search on hashes grown from the largest point's."""
    spec = importlib.util.spec_from_file_location("bench_shard_scale", REPO_ROOT / "tools" / "bench_shard_scale.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "scale.json"
    tool.main(["--points", "16", "48", "--workers", "1", "--size", "32", "--dedupe-points", "500",
               "--out", str(out), "--work", str(tmp_path)])
    result = json.loads(out.read_text())
    assert [p["images"] for p in result["points"]] == [16, 48]
    for p in result["points"]:
        assert set(p["stages_s"]) == {"walk", "clean", "dedupe", "split", "write", "finish"}
        assert 0 < p["kept"] <= p["images"] and p["images_per_s"] > 0
    assert 0 < result["flatness"] <= 1
    (dd,) = result["dedupe"]
    assert dd["hashes"] == 500 and dd["seconds"] >= 0 and dd["pairs"] >= 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench_shard_scale-")]  # scratch removed
