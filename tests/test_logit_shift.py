"""tools/logit_shift.py / hpcgan.classify.shift: a finished classifier run's kept weights scored again with a bias on
some classes' logits (the control for rows that raise a scarce class's recall by counting it differently)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from hpcgan import REPO_ROOT
from hpcgan.classify.run import main
from hpcgan.classify.shift import parse_shift, shifted_scores
from hpcgan.rundir import EXIT_OK

from test_classify import overrides, shards  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("shift") / "run"
    assert main(overrides(shards, out, "steps=8", "eval_every=4")) == EXIT_OK
    return out


def test_no_shift_is_the_run_itself_and_a_huge_one_takes_every_cell(finished_run):
    doc = json.loads((finished_run / "results.json").read_text())
    classes = doc["classes"]
    target = classes[1]
    none = shifted_scores(finished_run, {target: 0.0})
    assert none["confusion_matrix"]["plain"] == none["confusion_matrix"]["shifted"] == doc["confusion_matrix"]
    huge = shifted_scores(finished_run, {target: 1e4})
    cm = np.array(huge["confusion_matrix"]["shifted"])
    assert cm[:, 1].sum() == cm.sum()                        # every test cell called the shifted class
    assert huge["shifted"]["per_class"]["recall"][target] == 1.0
    assert huge["shifted"]["overall"]["balanced_accuracy"] == pytest.approx(
        1 / sum(1 for c in classes if doc["per_class"]["recall"][c] is not None))


def test_shift_parsing_and_the_cli(finished_run):
    classes = ["immature granulocyte", "monocyte"]
    assert parse_shift("immature_granulocyte=log2, monocyte=-0.5", classes) == {
        "immature granulocyte": pytest.approx(math.log(2)), "monocyte": -0.5}
    for bad in ("monocite=1", "monocyte", ""):
        with pytest.raises(ValueError, match="--shift"):
            parse_shift(bad, classes)
    target = json.loads((finished_run / "results.json").read_text())["classes"][0]
    p = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "logit_shift.py"), str(finished_run),
                        "--shift", f"{target.replace(' ', '_')}=log2"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| kept weights |" in p.stdout and f"{target} +0.693" in p.stdout
    p = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "logit_shift.py"), str(finished_run),
                        "--shift", "nothing=1"], capture_output=True, text=True)
    assert p.returncode == 2 and "CLASS one of" in p.stderr


def test_the_shift_like_a_prior_real_run_known_answer(tmp_path):
    """tau * log((R + S) / R) for each class with real and synthetic cells; only logit_adjust + prior=real runs."""
    from hpcgan.classify.shift import shift_like
    from hpcgan.rundir import write_config, write_json
    run = tmp_path / "prior"
    run.mkdir()
    write_config(run, {"logit_adjust_tau": 0.5, "regime_axes": {"loss": "logit_adjust", "prior": "real"}})
    write_json(run / "training_set.json", {"counts": {"real": {"a": 20, "b": 280, "c": 0, "d": 5},
                                                      "synthetic": {"a": 20, "b": 20, "c": 0, "d": 0}}})
    assert shift_like(run) == pytest.approx({"a": 0.5 * math.log(2), "b": 0.5 * math.log(300 / 280)})
    write_config(run, {"logit_adjust_tau": 1.0, "regime_axes": {"loss": "logit_adjust", "prior": "all"}})
    with pytest.raises(ValueError, match="prior=real"):
        shift_like(run)


def test_an_unfinished_run_is_refused(finished_run, tmp_path):
    import shutil
    from hpcgan.rundir import write_status
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    write_status(copy, {"state": "running"})
    target = json.loads((finished_run / "results.json").read_text())["classes"][0]
    with pytest.raises(ValueError, match="not a finished"):
        shifted_scores(copy, {target: 1.0})
    with pytest.raises(ValueError, match="not classes of"):
        shifted_scores(finished_run, {"no such class": 1.0})
