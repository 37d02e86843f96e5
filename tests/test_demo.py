"""The README's `make demo` flow, end to end on a tiny simulated set (simulate -> shard -> train -> generate)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hpcgan.data.shards import iter_samples, read_manifest
from hpcgan.gauges import class_signal

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "tools/demo.py", f"out={out}", "scale=0.05", "train.steps=4",
           "train.extra=['batch_size=4','model.width=8','log_every=2','sample_every=4','ckpt_every=2','ema=0.9']"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    real = read_manifest(out / "shards")
    synthetic = read_manifest(out / "synthetic")
    assert synthetic["synthetic"] is True and synthetic["classes"] == real["classes"]
    # balance=max: every class of the real train split is topped up to the largest class
    train = real["counts"]["train"]
    target = max(train.values())
    for cls in real["classes"]:
        assert train.get(cls, 0) + synthetic["counts"]["train"].get(cls, 0) == target
    assert all(meta["synthetic"] for *_, meta in iter_samples(out / "synthetic", "train"))

    status = json.loads((out / "run" / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 4
    assert (out / "synthetic" / "contact_sheet.png").is_file()
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 8 * 64 and sheet.height > 12 * 64  # 8 tiles per row, a row per class
    # the printed summary is a table with one line per class and a total
    for cls in real["classes"]:
        assert cls in res.stdout
    assert "total" in res.stdout
    assert "Sample diversity (samples/diversity.csv, step 4): within a class" in res.stdout
    assert "Auxiliary classifier on real images (log.csv, last 2 rows): accuracy" in res.stdout
    # the evaluation: the run between real-vs-real (floor) and the untrained generator (ceiling)
    assert "Evaluation against the real train split (cell features" in res.stdout
    header = next(line for line in res.stdout.splitlines() if line.startswith("metric "))
    assert "real val (floor)" in header and "wgan_gp_ac (this run)" in header and "untrained (ceiling)" in header
    fid_row = next(line for line in res.stdout.splitlines() if line.startswith("fid "))
    floor, run, ceiling = (float(x) for x in fid_row.split()[1:])
    assert floor < ceiling and floor < run
    for name in ("eval/floor.json", "eval/ceiling.json", "run/eval/step-00000004-cell.json", "run/eval/results.jsonl"):
        assert (out / name).is_file(), name
    # the tiny study on the demo's shards, as tools/sweep.py runs one, and its report
    assert "Study 'tiny'" in res.stdout
    for table in ("table3_cell_32px", "table4_cell_32px", "table5_32px", "table6_32px"):   # Tables 3-6, printed
        assert f"{table}:" in res.stdout
    study = json.loads((out / "study" / "study.json").read_text())
    assert study["executor"] == "local" and any(t["stage"] == "classify" for t in study["tasks"])
    for name in ("results.csv", "table3_cell_32px.md", "table5_32px.csv", "sources.csv"):
        assert (out / "study" / "report" / name).is_file(), name

    # re-running resumes: training is already finished and is not repeated
    res2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res2.returncode == 0, res2.stderr[-3000:]
    assert "already finished" in (res2.stderr + res2.stdout).lower()


def test_bad_setting_is_one_line_exit_2(tmp_path):
    """Checked before anything is simulated, sharded or trained."""
    for arg, words in (("size=256", "size=256: the GANs are built for 32, 64 or 128 px"),
                       ("train.steps=abc", "train.steps")):
        r = subprocess.run([sys.executable, "tools/demo.py", f"out={tmp_path / 'demo'}", arg], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("demo: error: "), r.stderr
        assert words in lines[0]
    assert not (tmp_path / "demo").exists()


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", REPO / "tools" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def write_status(run_dir: Path, acc_real: list, class_counts: list, balanced: bool = False) -> None:
    """status.json as a finished run writes it (class_signal of its log)."""
    signal = class_signal(acc_real, class_counts, balanced)
    (run_dir / "status.json").write_text(json.dumps({"state": "finished", "step": 50 * len(acc_real),
                                                     **({"class_signal": signal} if signal else {})}))


def test_class_signal_report_warns_near_chance_only(tmp_path):
    report = load_demo().class_signal_report
    counts = [20, 0, 60, 20]  # always the largest class: 0.60 (an absent class does not count when balanced)
    write_status(tmp_path, [0.9, 0.9, 0.60, 0.62, 0.58, 0.60], counts)
    lines = report(tmp_path)
    assert lines[0] == "Auxiliary classifier on real images (log.csv, last 4 rows): accuracy 0.60 (chance 0.60)"
    assert "does not tell the classes apart" in lines[1]
    write_status(tmp_path, [0.1, 0.1, 0.80, 0.85, 0.75, 0.80], counts)
    lines = report(tmp_path)
    assert len(lines) == 1 and "accuracy 0.80 (chance 0.60)" in lines[0]
    # balanced sampling: chance is one in three, and 0.6 is well above it
    write_status(tmp_path, [0.60, 0.62, 0.58, 0.60], counts, balanced=True)
    assert report(tmp_path) == [
        "Auxiliary classifier on real images (log.csv, last 4 rows): accuracy 0.60 (chance 0.33)"]
    write_status(tmp_path, [], counts)  # a model without an auxiliary classifier
    assert report(tmp_path) == []
