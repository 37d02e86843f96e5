"""hpcgan.verdict (issue 20's test from a scarcity study's rows), and its tables in hpcgan.report: numbers
checked by hand."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpcgan.report import load_rows, report
from hpcgan.results import append_rows
from hpcgan.verdict import per_run, seeds_of, verdicts

ME20 = {"monocyte": 20, "eosinophil": 20}
CUT = ["eosinophil", "monocyte"]


def runs_of(study, arch, tag, regime, seed, recalls, ba, cut=ME20, syn=None):
    """One classifier run's rows: balanced accuracy and the recall of each class in `recalls`."""
    run = str(study / f"cls/{arch}-{tag}-{regime}-{syn}-s{seed}")
    base = {"stage": "classify", "run_dir": run, "arch": arch, "regime": regime, "seed": seed, "image_size": 32,
            "tag": tag, "scarce": cut, "synthetic_from": syn}
    return [{**base, "metric": "balanced_accuracy", "class": None, "value": ba},
            *({**base, "metric": "sensitivity", "class": c, "value": v} for c, v in recalls.items())]


@pytest.fixture
def study(tmp_path):
    s, rows = tmp_path / "study", []
    rival = {0: (0.80, 0.90), 1: (0.70, 0.80), 2: (0.90, 0.90)}          # cut recall 0.85, 0.75, 0.90
    for seed in (0, 1, 2):
        mono, eos = rival[seed]
        rows += runs_of(s, "small_resnet", "rival", "logit_adjust+aug2", seed, {"monocyte": mono, "eosinophil": eos},
                        0.86)
        rows += runs_of(s, "small_resnet", "full", "logit_adjust+aug2", seed, {"monocyte": 0.94, "eosinophil": 0.96},
                        0.90, cut=None)
        rows += runs_of(s, "small_resnet", None, "original+synthetic", seed, {"monocyte": 0.9, "eosinophil": 0.9},
                        0.87, syn="cellgan")
        rows += runs_of(s, "small_resnet", "on_rival", "original+synthetic", seed,
                        {"monocyte": 0.95, "eosinophil": 0.95}, 0.85, syn="cgan")
        rows += runs_of(s, "small_resnet", "real40", "logit_adjust+aug2", seed,
                        {"monocyte": 0.88, "eosinophil": 0.90}, 0.88, cut={"monocyte": 40, "eosinophil": 40})
        rows += runs_of(s, "small_resnet", None, "original", seed, {"monocyte": 0.1, "eosinophil": 0.2}, 0.7)
        # another architecture with a rival but no `full`: no verdict
        rows += runs_of(s, "small_cnn", "rival", "balanced+aug2", seed, {"monocyte": 0.5, "eosinophil": 0.5}, 0.8)
        rows += runs_of(s, "small_cnn", None, "original+synthetic", seed, {"monocyte": 0.9, "eosinophil": 0.9}, 0.9,
                        syn="cellgan")
    # a row with two of the rival's three seeds, whose recall varies: paired gains -0.05 and +0.10
    for seed, rec in ((0, 0.80), (1, 0.85)):
        rows += runs_of(s, "small_resnet", "on_rival", "original+synthetic", seed,
                        {"monocyte": rec, "eosinophil": rec}, 0.87, syn="twin")
    # a run that lost its eosinophil recall: left out, not scored as a monocyte-only mean
    rows += runs_of(s, "small_resnet", None, "original+synthetic", 3, {"monocyte": 0.0}, 0.5, syn="cellgan")
    append_rows(s / "cls/results.jsonl", rows)
    return s


def test_the_target_and_each_row_against_it(study):
    df = load_rows(study)
    part = df[(df["stage"] == "classify") & (df["scarce"].isna() | df["scarce"].str.startswith("eosinophil"))]
    tables = verdicts(part, CUT)
    assert list(tables) == [("small_resnet", False)]   # small_cnn has no `full`: nothing to judge against
    t = tables[("small_resnet", False)].set_index("cells")
    rival = (0.85 + 0.75 + 0.90) / 3
    target = rival + (0.95 - rival) / 2
    assert t["target"].iloc[0] == pytest.approx(target)
    assert t["rival_cut_recall"].iloc[0] == pytest.approx(rival)
    assert t["rival_balanced_accuracy"].iloc[0] == pytest.approx(0.86)
    a = t.loc["synthetic: cellgan"]
    assert a["seeds"] == 3 and a["cut_recall"] == pytest.approx(0.9) and a["cut_recall_std"] == pytest.approx(0)
    assert a["gain"] == pytest.approx(0.9 - rival) and a["needed"] == pytest.approx(target - rival)
    assert a["paired_gain"] == pytest.approx((0.05 + 0.15 + 0.0) / 3)
    assert a["seeds_gained"] == "2/3"                   # a tie is not a gain
    assert a["met"]
    assert a["per_seed"] == "0:0.9000;1:0.9000;2:0.9000" and a["rival_per_seed"] == "0:0.8500;1:0.7500;2:0.9000"
    assert seeds_of(a["full_per_seed"]) == [0.95, 0.95, 0.95]
    b = t.loc["synthetic: cgan"]                        # more recall, but less balanced accuracy than the rival's
    assert b["cut_recall"] == pytest.approx(0.95) and not b["met"]
    real = t.loc["40 real per cut class"]               # the bar: the rival's recipe with 20 more real cells
    assert real["cut_recall"] == pytest.approx(0.89) and real["balanced_accuracy"] == pytest.approx(0.88)
    assert not real["met"]                              # 0.89 < 0.8917
    twin = t.loc["synthetic: twin"]
    assert twin["seeds"] == 2 and twin["cut_recall"] == pytest.approx(0.825)
    assert twin["gain"] == pytest.approx(0.825 - rival)            # against the rival's mean over its 3 seeds
    assert twin["paired_gain"] == pytest.approx(0.025) and twin["seeds_gained"] == "1/2"   # seed by seed
    assert list(t.index) == ["synthetic: cgan", "synthetic: cellgan", "40 real per cut class",
                             "synthetic: twin"]                    # best recall first
    assert "original" not in set(t["regime"]) and "rival" not in set(t["tag"])


def test_a_run_without_every_cut_class_is_left_out(study):
    runs = per_run(load_rows(study), CUT)
    assert 3 not in set(runs["seed"])
    assert len(runs) == 3 * 8 + 2                       # every run of seeds 0-2 (`full` has the classes' recall too)
    mine = runs[(runs["tag"] == "rival") & (runs["arch"] == "small_resnet")]
    assert set(mine["cut_recall"].round(6)) == {0.85, 0.75, 0.9}


def test_the_report_writes_the_verdict(study):
    written = report(study)
    name = "verdict_32px_eosinophil20_monocyte20_small_resnet"
    assert name in written and not [k for k in written if k.startswith("verdict_") and k.endswith("small_cnn")]
    t = pd.read_csv(written[name])
    assert t["met"].tolist() == [False, True, False, False]
    md = written[name].with_suffix(".md").read_text()
    assert "the target is **0.892** at no less than 0.860" in md
    assert "Met by: original+synthetic (synthetic: cellgan)." in md
    assert "+0.067 (2/3)" in md                        # the paired gain and the seeds that gained
    fig = Image.open(written[f"fig_{name}"]).convert("RGB")
    assert fig.width > 300 and fig.height > 150
    colours = {tuple(p) for p in np.asarray(fig).reshape(-1, 3)}
    # synthetic cells that meet it (green), that do not (red), and the real cells' bar (blue)
    assert {(44, 160, 44), (214, 39, 40), (31, 119, 180)} <= colours


def test_no_row_with_synthetic_cells_meets_it(tmp_path):
    """Real cells that meet the target (the realN row) are the bar, never a row that "meets it"."""
    s, rows = tmp_path / "study", []
    for seed in (0, 1):
        rows += runs_of(s, "small_resnet", "rival", "r", seed, {"monocyte": 0.8, "eosinophil": 0.8}, 0.86)
        rows += runs_of(s, "small_resnet", "full", "r", seed, {"monocyte": 1.0, "eosinophil": 1.0}, 0.9, cut=None)
        rows += runs_of(s, "small_resnet", "on_rival", "o+s", seed, {"monocyte": 0.85, "eosinophil": 0.85}, 0.9,
                        syn="cellgan")
        rows += runs_of(s, "small_resnet", "real40", "r", seed, {"monocyte": 0.95, "eosinophil": 0.95}, 0.9,
                        cut={"monocyte": 40, "eosinophil": 40})
    append_rows(s / "cls/results.jsonl", rows)
    written = report(s, figures=False)
    name = "verdict_32px_eosinophil20_monocyte20_small_resnet"
    assert pd.read_csv(written[name]).set_index("tag")["met"].to_dict() == {"real40": True, "on_rival": False}
    md = written[name].with_suffix(".md").read_text()
    assert "No row with synthetic cells meets it." in md and "+0.050 (+0.100)" in md


def pair(study, tag, cut, seed, rec, ba, size=32, syn=None, tta=None):
    rows = runs_of(study, "small_resnet", tag, "r", seed, {"monocyte": rec, "eosinophil": rec}, ba, cut=cut, syn=syn)
    return [{**r, "image_size": size, "tta": tta, "run_dir": f"{r['run_dir']}-{size}-{tta}"} for r in rows]


def test_sizes_and_test_time_averaging_are_judged_apart(tmp_path):
    s, rows = tmp_path / "study", []
    for seed in (0, 1):
        rows += pair(s, "rival", ME20, seed, 0.8, 0.86) + pair(s, "full", None, seed, 1.0, 0.9)
        rows += pair(s, "on_rival", ME20, seed, 0.95, 0.9, syn="cellgan")
        rows += pair(s, "full", None, seed, 0.2, 0.9, size=64)        # a 64 px `full` never joins the 32 px test
        rows += pair(s, "rival", ME20, seed, 0.5, 0.86, tta=True) + pair(s, "full", None, seed, 0.7, 0.9, tta=True)
        rows += pair(s, "on_rival", ME20, seed, 0.55, 0.9, syn="cellgan", tta=True)
    append_rows(s / "cls/results.jsonl", rows)
    written = report(s, figures=False)
    plain = pd.read_csv(written["verdict_32px_eosinophil20_monocyte20_small_resnet"]).iloc[0]
    assert plain["target"] == pytest.approx(0.9) and plain["met"] and plain["seeds"] == 2
    tta = pd.read_csv(written["verdict_32px_eosinophil20_monocyte20_small_resnet_tta"]).iloc[0]
    assert tta["target"] == pytest.approx(0.6) and not tta["met"]
    assert not [k for k in written if k.startswith("verdict_64px")]    # 64 px has no rival and no candidate


def test_two_runs_of_a_row_with_one_seed_are_refused_not_paired(tmp_path, caplog):
    s, rows = tmp_path / "study", []
    for seed in (0, 1):
        rows += pair(s, "rival", ME20, seed, 0.8, 0.86) + pair(s, "full", None, seed, 1.0, 0.9)
        rows += pair(s, "on_rival", ME20, seed, 0.95, 0.9, syn="cellgan")
    rows += pair(s, "rival", ME20, 0, 0.7, 0.86, tta=False)        # a second study's rival, seed 0 again
    append_rows(s / "cls/results.jsonl", rows)
    written = report(s, figures=False)
    assert not [k for k in written if k.startswith("verdict_")]
    assert "scarcity_32px_eosinophil20_monocyte20" in written      # the other tables are still written
    assert "same seed" in caplog.text and "its own folder" in caplog.text


def test_a_cut_without_a_row_to_judge_has_no_verdict(tmp_path):
    s, rows = tmp_path / "study", []
    for seed in (0, 1):
        rows += pair(s, "rival", ME20, seed, 0.8, 0.86) + pair(s, "full", None, seed, 1.0, 0.9)
    append_rows(s / "cls/results.jsonl", rows)
    assert not [k for k in report(s, figures=False) if k.startswith("verdict_")]
