"""The README's `make demo`: the tiny study run here as on a cluster, then its report (tools/demo.py)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hpcgan.data.shards import read_manifest
from hpcgan.gauges import class_signal

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_is_the_tiny_study_run_here_and_its_report(tmp_path):
    """make demo's one path (issue 21): tools/sweep.py study=tiny executor=local with the demo's sizing (here cut
    to test size), GANs under torchrun with 2 ranks, then the report; a re-run finds nothing to do."""
    out = tmp_path / "demo"
    small = ["scale=0.3",
             "overrides=[\"data.shard=['contact_sheet=true']\",'resources.train.ranks=2','resources.train.cpus=2']"]
    cmd = [sys.executable, "tools/demo.py", f"out={out}", *small]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    assert study["executor"] == "local" and study["name"] == "tiny"
    assert {t["stage"] for t in study["tasks"]} >= {"simulate", "shard", "train", "generate", "evaluate", "classify"}
    for t in (t for t in study["tasks"] if t["stage"] == "train"):   # the design card's DDP: torchrun, 2 ranks
        assert t["resources"]["ranks"] == 2
        assert json.loads((Path(t["out"]) / "status.json").read_text())["world_size"] == 2
    assert read_manifest(out / "synthetic" / "wgan_gp_ac-s0-32")["synthetic"] is True
    sheet = Image.open(out / "data" / "shards-32" / "contact_sheet.png")
    assert sheet.width > 8 * 32 and sheet.height > 8 * 32
    for table in ("table3_cell_32px:", "table5_32px:"):
        assert table in res.stdout
    assert "Contact sheet:" in res.stdout and "Classifier on real images (`original`): balanced accuracy" in res.stdout
    assert "Sample diversity (samples/diversity.csv, step 4): within a class" in res.stdout   # each GAN's collapse gauge
    for name in ("results.csv", "table3_cell_32px.md", "table5_32px.csv", "sources.csv", "fig_samples.png"):
        assert (out / "report" / name).is_file(), name
    res2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res2.returncode == 0 and "nothing to do" in res2.stdout, res2.stdout + res2.stderr


def test_the_demo_is_short_and_a_bad_study_override_is_the_sweeps_one_line_error(tmp_path):
    """<= 150 lines (issue 21); an override the study refuses is exit 2 with tools/sweep.py's error, nothing run."""
    assert len((REPO / "tools" / "demo.py").read_text().splitlines()) <= 150
    r = subprocess.run([sys.executable, "tools/demo.py", f"out={tmp_path / 'demo'}", "overrides=['gan.steps=-1']"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "gan.steps" in r.stderr, r.stderr
    assert not (tmp_path / "demo" / "data").exists()


def test_bad_setting_is_one_line_exit_2(tmp_path):
    """Checked before anything is simulated, sharded or trained."""
    for arg, words in (("size=256", "size=256: the GANs are built for 32, 64 or 128 px"),
                       ("scale=abc", "scale")):
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
