"""tools/export_weights.py / hpcgan.classify.kept: a finished classifier run's kept weights as a file that another
run starts from (pretrained_file=), with a record of where they came from."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch

from hpcgan import REPO_ROOT
from hpcgan.checkpoint import load_latest
from hpcgan.classify.archs import build_classifier, load_pretrained
from hpcgan.classify.kept import kept_weights
from hpcgan.classify.run import main
from hpcgan.rundir import EXIT_OK, write_status

from test_classify import overrides, shards  # noqa: F401  (fixture)

TOOL = REPO_ROOT / "tools" / "export_weights.py"


def export_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(overrides(shards, out, "steps=8", "eval_every=4", "ckpt_every=4")) == EXIT_OK
    return out


def test_the_file_holds_the_kept_weights_and_a_run_starts_from_them(finished_run, shards, tmp_path):  # noqa: F811
    out = tmp_path / "w" / "kept.pt"
    p = export_cli(finished_run, out)
    assert p.returncode == 0, p.stderr[-2000:]
    record = json.loads(out.with_suffix(".json").read_text())
    doc = json.loads((finished_run / "results.json").read_text())
    assert record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and record["bytes"] == out.stat().st_size
    assert record["kept_step"] == doc["selection"]["best_step"] and record["run_dir"] == str(finished_run.resolve())
    assert record["arch"] == doc["arch"]["arch"] and record["classes"] == doc["classes"]
    state, _ = load_latest(finished_run, required=("best",))
    saved = torch.load(out, weights_only=True)
    assert saved.keys() == state["best"]["model"].keys()
    assert all(torch.equal(saved[k], state["best"]["model"][k]) for k in saved)     # the kept ones, not the last
    # a model built fresh takes every tensor but the head from the file
    torch.manual_seed(123)
    net, _ = build_classifier(record["arch"], len(record["classes"]), doc["image_size"])
    fresh_head = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("head.")}
    info = load_pretrained(net, out)
    assert info["sha256"] == record["sha256"] and info["head_kept_fresh"] == ["head."]
    for k, v in net.state_dict().items():
        assert torch.equal(v, fresh_head[k] if k.startswith("head.") else saved[k]), k
    # the run that starts from it records the file's sha256
    assert main(overrides(shards, tmp_path / "next", "steps=2", "eval_every=2", f"pretrained_file={out}")) == EXIT_OK
    row = json.loads((tmp_path / "next" / "results.json").read_text())["rows"][0]
    assert row["pretrained_sha256"] == record["sha256"]


def test_refusals_name_the_reason_and_write_nothing(finished_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished_run, unfinished)
    write_status(unfinished, {"state": "running"})
    with pytest.raises(ValueError, match="not a finished classifier run"):
        kept_weights(unfinished)
    for run, out, message in ((unfinished, tmp_path / "a.pt", "not a finished classifier run"),
                              (tmp_path, tmp_path / "b.pt", "not a classifier run directory"),
                              (finished_run, tmp_path / "c.pth", "name the file .pt")):
        p = export_cli(run, out)
        assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
        assert not out.exists() and not out.with_suffix(".json").exists()
