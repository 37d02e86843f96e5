"""The rival search of the scarcity study (issue 19): every cheap recipe scored on val, the winner picked from
the runs' results (hpcgan.classify.rival), run again by recipe_from= on test, on the uncut split (`full`) and
under synthetic data (`on_rival`); the study's tasks and the report's tables around it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from hpcgan.classify.data import DataError
from hpcgan.classify.regimes import Regime, get_regime
from hpcgan.classify.rival import pick, search_grid
from hpcgan.classify.run import ClassifySettings, main
from hpcgan.report import report
from hpcgan.results import append_rows, read_rows
from hpcgan.rundir import EXIT_OK
from hpcgan.settings import SettingsError, parse
from hpcgan.sweep import expand, load_study


@pytest.fixture(scope="module")
def shards(simulated_shards) -> Path:
    return simulated_shards(0.6)


# ---- the search grid and the pick --------------------------------------------------------------------

def test_search_grid_is_every_combination_of_the_recipe_axes():
    every = search_grid({})
    assert len(every) == 2 * 3 * 4 and len({tuple(a.values()) for a in every}) == 24
    assert every[0] == {"sampling": "shuffled", "loss": "ce", "augment": "none"}
    some = search_grid({"sampling": ["balanced"], "augment": ["none", "aug2"]})
    assert some == [{"sampling": "balanced", "loss": loss, "augment": aug}
                    for loss in ("ce", "weighted", "logit_adjust") for aug in ("none", "aug2")]
    for bad, msg in (({"sampling": ["sorted"]}, "rival_search.sampling"), ({"augment": ["aug9"]}, "aug9"),
                     ({"synthetic_count": ["3x"]}, "not recipe axes"), ({"loss": ["ce", "ce"]}, "repeats")):
        with pytest.raises(ValueError, match=msg):
            search_grid(bad)


def fake_search_run(root: Path, spec: str, macro_f1: float, split: str = "val") -> Path:
    """A finished search run as pick() reads it: results.json with the regime and the val scores."""
    from dataclasses import asdict
    from hpcgan.classify.regimes import compose, parse_spec
    preset, axes = parse_spec(spec)
    regime = compose(preset, **axes)
    d = root / regime.name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"regime": asdict(regime), "real": {"split": split},
                                                "metrics": {"macro_f1": macro_f1, "accuracy": 0.5}}))
    return d


def test_pick_takes_the_best_val_score_the_first_on_a_tie_and_says_the_margin(tmp_path):
    runs = [fake_search_run(tmp_path, "original", 0.70), fake_search_run(tmp_path, "balanced augment=aug2", 0.82),
            fake_search_run(tmp_path, "original loss=weighted", 0.79),
            fake_search_run(tmp_path, "original augment=aug1", 0.82)]
    choice = pick(runs)
    assert choice["winner"] == "balanced+aug2" and choice["runner_up"] == "aug1"   # tie: the first given
    assert choice["axes"] == {"sampling": "balanced", "loss": "ce", "augment": "aug2"}
    assert choice["margin"] == pytest.approx(0.0) and choice["score"] == 0.82
    assert pick(runs[:3])["margin"] == pytest.approx(0.03) and pick(runs[:3])["runner_up"] == "weighted_loss"
    assert [c["score"] for c in choice["candidates"]] == [0.70, 0.82, 0.79, 0.82]
    assert pick(runs[:1])["margin"] is None


def test_pick_refuses_unfinished_test_scored_and_synthetic_runs(tmp_path):
    ok = fake_search_run(tmp_path / "a", "original", 0.7)
    with pytest.raises(DataError, match="has not finished"):
        pick([ok, tmp_path / "nothing"])
    with pytest.raises(DataError, match="chosen on val only"):
        pick([ok, fake_search_run(tmp_path / "b", "balanced", 0.9, split="test")])
    with pytest.raises(DataError, match="real images only"):
        pick([ok, fake_search_run(tmp_path / "c", "original+synthetic", 0.9)])


def test_the_winners_recipe_fills_only_the_axes_a_run_does_not_set():
    s = parse(ClassifySettings, {"shards": "x", "out": "y", "regime": "original+synthetic synthetic_count=3x",
                                 "synthetic": "z", "loss": "ce"})
    won = {"sampling": "balanced", "loss": "weighted", "augment": "aug2"}
    r = s.composed_regime(won)
    assert (r.sampling, r.loss, r.augment, r.synthetic_count, r.data) == ("balanced", "ce", "aug2", "3x",
                                                                           "real+synthetic")
    assert s.composed_regime() == get_regime("original+synthetic synthetic_count=3x loss=ce")
    spec = parse(ClassifySettings, {"shards": "x", "out": "y", "regime": "original augment=aug1"})
    assert spec.composed_regime(won).augment == "aug1"      # the spec's axis wins over the recipe's
    with pytest.raises(SettingsError, match="score_split"):
        parse(ClassifySettings, {"shards": "x", "out": "y", "score_split": "train"})


# ---- real runs ---------------------------------------------------------------------------------------

def run_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"shards={shards}", f"out={out}", "batch_size=32", "steps=20", "eval_every=10", "log_every=10",
            "ckpt_every=1000", "progress=false", "scarce={monocyte:5}", *extra]


def test_a_search_run_never_reads_test_and_the_rival_runs_the_winner_on_test(shards, tmp_path):
    """The search runs score on val from a shard set whose test split is gone; the rival run then takes the
    winner's axes (recipe_from=) and is scored on the real test split, recording the choice."""
    no_test = tmp_path / "no-test"
    shutil.copytree(shards, no_test, ignore=lambda d, names: [n for n in names if n.startswith("test-")])
    runs = []
    for spec in ("original", "balanced augment=aug1"):
        out = tmp_path / "search" / get_regime(spec).name
        assert main(run_args(no_test, out, f"regime='{spec}'", "score_split=val", "tag=search")) == EXIT_OK
        doc = json.loads((out / "results.json").read_text())
        assert doc["real"]["split"] == "val" and doc["tag"] == "search"
        assert {r["real_split"] for r in read_rows(out / "results.jsonl")} == {"val"}
        runs.append(out)
    choice = pick(runs)
    rival = tmp_path / "rival"
    assert main(run_args(shards, rival, "tag=rival", f"recipe_from=[{runs[0]},{runs[1]}]")) == EXIT_OK
    doc = json.loads((rival / "results.json").read_text())
    assert doc["real"]["split"] == "test" and doc["recipe"]["winner"] == choice["winner"]
    assert Regime(**doc["regime"]).axes() | choice["axes"] == Regime(**doc["regime"]).axes()
    row = doc["rows"][0]
    assert (row["tag"], row["recipe_from"], row["real_split"]) == ("rival", choice["winner"], "test")
    assert row["recipe_margin"] == pytest.approx(choice["margin"])
    # a recipe_from whose search has not finished is bad input, before anything is trained
    assert main(run_args(shards, tmp_path / "r2", f"recipe_from=[{runs[0]},{tmp_path / 'none'}]")) == 2
    assert not (tmp_path / "r2" / "checkpoints").exists()


# ---- the study ---------------------------------------------------------------------------------------

def test_the_study_searches_on_one_seed_and_runs_the_winner_after_it(tmp_path):
    s = load_study("scarcity", ["classify.rival_search={sampling: [shuffled, balanced], loss: [ce], augment: [none, aug2]}",
                                "classify.full=true", "classify.on_rival=['original+synthetic sampling=balanced']",
                                "classify.seeds=[0,1]"])
    tasks = {t.name: t for t in expand(s, tmp_path / "s")}
    search = [t for t in tasks.values() if t.grid.get("tag") == "search"]
    arch = s.classify.archs[0]
    assert sorted(t.name for t in search) == sorted(f"cls/{arch}-search-{r}-s0-32"
                                                    for r in ("original", "aug2", "balanced", "balanced+aug2"))
    for t in search:
        argv = " ".join(t.argv)
        assert t.stage == "classify" and "score_split=val" in argv and "scarce_seed=0" in argv
    rival = [t for t in tasks.values() if t.stage == "rival"]
    assert sorted(t.grid["tag"] for t in rival) == ["full"] * 2 + ["on_rival"] * 4 + ["rival"] * 2
    for t in rival:
        assert set(t.deps) >= {x.name for x in search}
        assert sum(a.startswith("recipe_from=[") for a in t.argv) == 1
        argv = " ".join(t.argv)
        assert ("scarce=" in argv) == (t.grid["tag"] != "full") and "score_split" not in argv
    assert "synthetic=" in " ".join(tasks[f"cls/{arch}-on_rival-original+synthetic+balanced-cgan-s1-32"].argv)
    with pytest.raises(SettingsError, match="synthetic_count=3x takes synthetic images of every class"):
        load_study("scarcity", ["classify.on_rival=['original+synthetic synthetic_count=3x']"])
    with pytest.raises(SettingsError, match="classify.rival_search"):
        load_study("scarcity", ["classify.rival_search=null", "classify.full=true"])
    with pytest.raises(SettingsError, match="rival_search.augment"):
        load_study("scarcity", ["classify.rival_search={augment: [aug7]}"])


def test_the_report_keeps_the_search_out_of_the_tables_and_puts_full_and_rival_in_the_scarcity_one(tmp_path):
    s, rows = tmp_path / "study", []
    cut = {"monocyte": 20}

    def runrows(name, regime, seed, recall, tag=None, scarce=cut, split="test", **kw):
        base = {"stage": "classify", "run_dir": str(s / "cls" / name), "arch": "small_resnet", "regime": regime,
                "seed": seed, "image_size": 32, "scarce": scarce, "tag": tag, "real_split": split, **kw}
        return [{**base, "metric": "balanced_accuracy", "class": None, "value": 0.5 + recall / 2},
                {**base, "metric": "macro_f1", "class": None, "value": recall},
                {**base, "metric": "sensitivity", "class": "monocyte", "value": recall}]
    for regime, f1 in (("original", 0.6), ("balanced+aug2", 0.8), ("aug2", 0.7)):
        rows += runrows(f"search-{regime}", regime, 0, f1, tag="search", split="val")
    chosen = {"recipe_from": "balanced+aug2", "recipe_margin": 0.1, "recipe_runner_up": "aug2"}
    for seed in (0, 1):
        rows += runrows(f"orig-{seed}", "original", seed, 0.1)
        rows += runrows(f"rival-{seed}", "balanced+aug2", seed, 0.8 + 0.1 * seed, tag="rival", **chosen)
        rows += runrows(f"full-{seed}", "balanced+aug2", seed, 0.95, tag="full", scarce=None, **chosen)
    append_rows(s / "cls/results.jsonl", rows)
    written = report(s, figures=False)
    t = pd.read_csv(written["scarcity_32px_monocyte20"]).fillna("–").set_index(["tag", "regime"])
    assert t.loc[("full", "balanced+aug2"), "recall_monocyte_mean"] == pytest.approx(0.95)
    assert t.loc[("rival", "balanced+aug2"), "recall_monocyte_mean"] == pytest.approx(0.85)
    assert t.loc[("–", "original"), "recall_monocyte_n"] == 2
    assert "search" not in t.index.get_level_values("tag")
    md = Path(written["scarcity_32px_monocyte20"]).with_suffix(".md").read_text()
    assert "`balanced+aug2` won on val (+0.1000 val macro-F1 over aug2)" in md
    search = pd.read_csv(written["rival_search_32px_monocyte20"])
    assert list(search["regime"]) == ["balanced+aug2", "aug2", "original"]
    t5 = pd.read_csv(written["table5_32px"])
    assert "search" not in set(t5["tag"].dropna()) and len(t5) == 3
