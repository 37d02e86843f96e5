"""hpcgan.report / tools/report.py: results rows -> the paper's tables, numbers checked by hand."""
import subprocess
import sys

import pandas as pd
import pytest

from hpcgan import REPO_ROOT
from hpcgan.report import load_rows, report
from hpcgan.results import append_rows


def ev(run, model, seed, metric, value, extractor="cell", size=32, cls=None, **kw):
    return {"stage": "evaluate", "run_dir": run, "source": "generator", "model": model, "seed": seed,
            "steps": 100, "weights": "raw", "tag": None, "image_size": size, "extractor": extractor,
            "extractor_sha256": extractor * 8, "real_split": "train", "metric": metric, "class": cls,
            "value": value, **kw}


def cl(run, arch, regime, seed, metric, value, cls=None):
    return {"stage": "classify", "run_dir": run, "arch": arch, "regime": regime, "seed": seed, "image_size": 32,
            "metric": metric, "class": cls, "value": value}


@pytest.fixture
def study(tmp_path):
    s = tmp_path / "study"
    for seed, fid in ((0, 10.0), (1, 14.0), (2, 12.0)):
        run = str(s / f"gan/a-s{seed}")
        append_rows(s / f"gan/a-s{seed}/eval/results.jsonl",
                    [ev(run, "acgan", seed, "fid", fid), ev(run, "acgan", seed, "precision", 0.5 + 0.1 * seed),
                     ev(run, "acgan", seed, "fid", 99.0, extractor="inception"),  # another extractor: own table
                     ev(run, "acgan", seed, "psnr", 20.0 + seed)])
    run = str(s / "gan/b-s0")
    append_rows(s / "gan/b-s0/eval/results.jsonl",
                [ev(run, "cgan", 0, "fid", 50.0), ev(run, "cgan", 0, "precision", None, skipped="why"),
                 ev(run, "cgan", 0, "fid", 30.0)])  # appended again by a re-run: the last one counts
    rows = []
    for seed in (0, 1):
        run = str(s / f"cls/small-orig-s{seed}")
        rows += [cl(run, "small_cnn", "original", seed, "accuracy", 0.8 + 0.1 * seed),
                 cl(run, "small_cnn", "original", seed, "sensitivity", 0.5, cls="basophil"),
                 cl(run, "small_cnn", "original", seed, "specificity", 0.9, cls="basophil")]
    append_rows(s / "cls/results.jsonl", rows)
    return s


def test_mean_std_and_count_over_seeds(study):
    written = report(study, figures=False)
    t3 = pd.read_csv(written["table3_cell_32px"]).set_index("model")
    assert t3.loc["acgan", "fid_mean"] == pytest.approx(12.0) and t3.loc["acgan", "fid_std"] == pytest.approx(2.0)
    assert t3.loc["acgan", "fid_n"] == 3
    assert t3.loc["cgan", "fid_mean"] == 30.0 and t3.loc["cgan", "fid_n"] == 1  # re-run replaced, not averaged
    assert pd.isna(t3.loc["cgan", "precision_mean"]) and t3.loc["cgan", "precision_n"] == 0  # missing, not 0
    md = (study / "report" / "table3_cell_32px.md").read_text()
    assert "12 ± 2 (3)" in md and "–" in md
    # the inception numbers never enter the cell table
    t3i = pd.read_csv(written["table3_inception_32px"]).set_index("model")
    assert t3i.loc["acgan", "fid_mean"] == 99.0
    t4 = pd.read_csv(written["table4_cell_32px"]).set_index("model")
    assert t4.loc["acgan", "psnr_mean"] == pytest.approx(21.0)
    t5 = pd.read_csv(written["table5_32px"])
    assert t5.loc[0, "accuracy_mean"] == pytest.approx(0.85) and t5.loc[0, "accuracy_n"] == 2
    t6 = pd.read_csv(written["table6_32px"])
    assert t6.loc[0, "class"] == "basophil" and t6.loc[0, "sensitivity_mean"] == 0.5


def test_every_cell_names_its_runs(study):
    written = report(study, figures=False)
    src = pd.read_csv(written["sources"])
    cell = src[(src["table"] == "table3_cell_32px") & (src["model"] == "acgan") & (src["metric"] == "fid")]
    assert cell["run_dirs"].item().split(";") == sorted(str(study / f"gan/a-s{s}") for s in range(3))
    tidy = pd.read_csv(written["results"])
    assert len(tidy) == len(load_rows(study)) == 12 + 2 + 6


def test_cli_prints_tables_and_refuses_an_empty_folder(study, tmp_path):
    r = subprocess.run([sys.executable, "tools/report.py", str(study), "figures=false"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "table3_cell_32px" in r.stdout and "12 ± 2 (3)" in r.stdout
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "tools/report.py", str(tmp_path / "empty")], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no results rows" in r.stderr


def test_figures_from_the_runs_logs_and_samples(study):
    from PIL import Image
    run = study / "gan" / "a-s0"
    (run / "samples").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 0, 0)).save(run / "samples" / "step-00000100.png")
    (run / "log.csv").write_text("step,ac_acc_real,ac_acc_fake\n50,0.2,0.5\n100,0.4,0.9\n")
    written = report(study)
    for name in ("fig_ac_accuracy", "fig_samples", "fig_per_class_32px"):
        im = Image.open(written[name])
        assert im.width > 100 and im.height > 30, name
    side = Image.open(written["fig_samples"]).convert("RGB")
    assert side.getpixel((10, 30)) == (200, 0, 0)  # the run's newest grid is in it


def test_scarcity_table_keeps_cuts_and_gan_sources_apart(tmp_path):
    s, rows = tmp_path / "study", []
    cut = {"monocyte": 20}
    for seed in (0, 1, 2):
        for regime, syn, rec in (("original", None, 0.2), ("balanced", None, 0.3), ("original+synthetic", "cgan", 0.5),
                                 ("original+synthetic", "sngan_proj", 0.6 + 0.1 * seed)):
            run = str(s / f"cls/{regime}-{syn}-s{seed}")
            base = {"synthetic_from": syn, "scarce": cut}
            rows += [{**cl(run, "small_cnn", regime, seed, "balanced_accuracy", 0.7), **base},
                     {**cl(run, "small_cnn", regime, seed, "sensitivity", rec, cls="monocyte"), **base},
                     {**cl(run, "small_cnn", regime, seed, "sensitivity", 0.9, cls="basophil"), **base}]
    run = str(s / "cls/uncut")  # a run without the cut: never in the scarcity table
    rows.append(cl(run, "small_cnn", "original", 0, "sensitivity", 0.99, cls="monocyte"))
    append_rows(s / "cls/results.jsonl", rows)
    written = report(s, figures=False)
    t = pd.read_csv(written["scarcity_32px_monocyte20"]).set_index(["regime", "synthetic_from"])
    assert t.loc[("original", "–"), "recall_monocyte_mean"] == pytest.approx(0.2)
    assert t.loc[("original", "–"), "recall_monocyte_n"] == 3
    assert t.loc[("original+synthetic", "cgan"), "recall_monocyte_mean"] == pytest.approx(0.5)
    assert t.loc[("original+synthetic", "sngan_proj"), "recall_monocyte_mean"] == pytest.approx(0.7)
    assert t.loc[("original+synthetic", "sngan_proj"), "recall_monocyte_std"] == pytest.approx(0.1)
    assert "recall_basophil_mean" not in t.columns
    t6 = pd.read_csv(written["table6_32px"])   # the uncut run's row stays its own
    mono = t6[(t6["class"] == "monocyte") & (t6["regime"] == "original")].set_index("scarce")
    assert mono.loc["–", "sensitivity_mean"] == 0.99
    assert mono.loc["monocyte=20", "sensitivity_mean"] == pytest.approx(0.2)


def test_more_real_rows_join_the_table_of_the_cut_of_their_classes(tmp_path):
    """classify.more_real's `realN` rows (the rival's recipe, its cut classes at N real cells) are a reference in
    the table of the cut with the same classes, as `full` is, and never a cut table of their own."""
    s, rows = tmp_path / "study", []
    me20, me40 = {"monocyte": 20, "eosinophil": 20}, {"eosinophil": 40, "monocyte": 40}   # any order
    for seed in (0, 1):
        for tag, cut, rec in (("rival", me20, 0.8), ("full", None, 0.95), ("real40", me40, 0.9),
                              ("real40", {"monocyte": 40}, 0.3), ("real40", {"basophil": 40}, 0.1)):
            run = str(s / f"cls/{tag}-{cut}-s{seed}")
            base = {"scarce": cut, "tag": tag}
            rows += [{**cl(run, "small_resnet", "logit_adjust+aug2", seed, "balanced_accuracy", 0.8), **base},
                     *({**cl(run, "small_resnet", "logit_adjust+aug2", seed, "sensitivity", rec + 0.02 * seed + d,
                             cls=c), **base} for c, d in (("monocyte", 0), ("eosinophil", 0.04)))]
    append_rows(s / "cls/results.jsonl", rows)
    written = report(s, figures=False)
    t = pd.read_csv(written["scarcity_32px_eosinophil20_monocyte20"]).set_index("tag")
    assert sorted(t.index) == ["full", "real40", "rival"]     # not the monocyte-only cut's real40, nor basophil's
    assert t.loc["real40", "recall_monocyte_mean"] == pytest.approx(0.91)
    assert t.loc["real40", "recall_eosinophil_mean"] == pytest.approx(0.95)
    assert t.loc["real40", "recall_monocyte_n"] == 2
    assert t.loc["rival", "recall_monocyte_mean"] == pytest.approx(0.81)
    # a realN row whose classes no cut of the study has rows for: a table of its own, not dropped
    alone = pd.read_csv(written["scarcity_32px_monocyte40"]).set_index("tag")
    assert sorted(alone.index) == ["full", "real40"] and alone.loc["real40", "recall_monocyte_mean"] == pytest.approx(0.31)
    assert "scarcity_32px_basophil40" in written
    assert not [k for k in written if k.startswith("scarcity_32px_eosinophil40")]


def two_gan_rows(study):
    """Classifier rows of a study whose `original+synthetic` regime is fed by two GANs."""
    rows = []
    for gan in (None, "cellgan", "cgan"):
        regime = "original" if gan is None else "original+synthetic"
        run = str(study / f"cls/{regime}-{gan}")
        for metric, value in (("accuracy", 0.8), ("balanced_accuracy", 0.7)):
            rows.append({**cl(run, "small_cnn", regime, 0, metric, value), "synthetic_from": gan})
        for c, v in (("basophil", 0.4), ("monocyte", 0.9)):
            rows.append({**cl(run, "small_cnn", regime, 0, "sensitivity", v, cls=c), "synthetic_from": gan})
    append_rows(study / "cls/results.jsonl", rows)


def test_per_class_figure_keeps_the_synthetic_sources_apart(tmp_path):
    from PIL import Image
    two_gan_rows(tmp_path)
    written = report(tmp_path)
    assert Image.open(written["fig_per_class_32px"]).width > 100
    t6 = pd.read_csv(written["table6_32px"])
    assert len(t6) == 3 * 2 and set(t6["synthetic_from"].fillna("–")) == {"–", "cellgan", "cgan"}


def test_a_figure_that_fails_is_a_warning_naming_it_and_the_tables_stay(tmp_path, monkeypatch, caplog):
    import hpcgan.report as rep
    two_gan_rows(tmp_path)

    def broken(*a, **k):
        raise RuntimeError("drawing went wrong")
    monkeypatch.setattr(rep, "fig_per_class", broken)
    written = report(tmp_path)
    assert "fig_per_class_32px" not in written and written["table6_32px"].is_file()
    assert any(r.levelname == "WARNING" and "fig_per_class_32px" in r.getMessage() for r in caplog.records)


def test_an_internal_error_is_exit_1_with_its_traceback_never_the_bad_input_code(tmp_path, monkeypatch, caplog):
    import hpcgan.report as rep
    two_gan_rows(tmp_path)

    def broken(*a, **k):
        raise IndexError("a bug")
    monkeypatch.setattr(rep, "classifier_tables", broken)
    assert rep.main([str(tmp_path), "figures=false"]) == 1
    assert any(r.exc_info and "IndexError: a bug" in caplog.text for r in caplog.records)


def test_scarcity_rows_carry_the_fidelity_of_the_gan_that_fed_them(tmp_path):
    """Per cut class, the class accuracy and intra-FID of the GAN a row's cells came from, mean over its seeds,
    matched by model, cut and size; another cut's, size's or extractor's evaluations never mix in."""
    s, rows = tmp_path / "study", []
    cut = {"monocyte": 20}
    for seed in (0, 1):
        for regime, syn in (("original", None), ("original+synthetic", "cellgan"), ("original+synthetic", "cgan")):
            run = str(s / f"cls/{regime}-{syn}-s{seed}")
            base = {"synthetic_from": syn, "scarce": cut}
            rows += [{**cl(run, "small_cnn", regime, seed, "balanced_accuracy", 0.7), **base},
                     {**cl(run, "small_cnn", regime, seed, "sensitivity", 0.5, cls="monocyte"), **base}]
    append_rows(s / "cls/results.jsonl", rows)
    for model, seed, acc, fid in (("cellgan", 0, 0.2, 100.0), ("cellgan", 1, 0.4, 80.0), ("cgan", 0, 0.9, 30.0)):
        run = str(s / f"gan/{model}-s{seed}")
        gan_cut = {"regime": {"balance_classes": True, "scarce": cut}}   # where hpcgan.evaluate records the cut
        append_rows(s / f"gan/{model}-s{seed}/eval/results.jsonl", [
            ev(run, model, seed, "class_accuracy", acc, cls="monocyte", **gan_cut),
            ev(run, model, seed, "intra_fid", fid, cls="monocyte", **gan_cut),
            ev(run, model, seed, "class_accuracy", 0.99, cls="basophil", **gan_cut),        # not a cut class
            ev(run, model, seed, "intra_fid", 1.0, cls="monocyte", extractor="inception", **gan_cut),
            {**ev(run, model, seed, "class_accuracy", 0.03, cls="monocyte", **gan_cut), "weights": "init"},  # ceiling
            {**ev(run, model, seed, "class_accuracy", 0.04, cls="monocyte", **gan_cut), "steps": 50}])       # older
        append_rows(s / f"gan/{model}-s{seed}-64/eval/results.jsonl", [                     # another size
            ev(run + "-64", model, seed, "class_accuracy", 0.01, cls="monocyte", size=64, **gan_cut)])
        append_rows(s / f"gan/{model}-s{seed}-cut10/eval/results.jsonl", [                  # another cut
            ev(run + "-cut10", model, seed, "class_accuracy", 0.02, cls="monocyte", regime={"scarce": {"monocyte": 10}})])
    # a study's variant of cellgan (its evaluation tagged with the variant's name), evaluated raw and with EMA
    run = str(s / "gan/cellgan-long-s0")
    append_rows(s / "gan/cellgan-long-s0/eval/results.jsonl", [
        {**ev(run, "cellgan", 0, "class_accuracy", 0.05, cls="monocyte", **gan_cut), "tag": "cellgan-long"},
        {**ev(run, "cellgan", 0, "class_accuracy", 0.8, cls="monocyte", **gan_cut), "tag": "cellgan-long",
         "weights": "ema"}])
    rows = []
    for syn in ("cellgan-long", "cellgan-curated"):    # a set variant (curated) has no evaluation of its own
        run = str(s / f"cls/{syn}")
        base = {"synthetic_from": syn, "scarce": cut}
        rows += [{**cl(run, "small_cnn", "original+synthetic", 0, "balanced_accuracy", 0.7), **base},
                 {**cl(run, "small_cnn", "original+synthetic", 0, "sensitivity", 0.5, cls="monocyte"), **base}]
    append_rows(s / "cls/v/results.jsonl", rows)
    t = pd.read_csv(report(s, figures=False)["scarcity_32px_monocyte20"]).set_index(["regime", "synthetic_from"])
    assert t.loc[("original+synthetic", "cellgan-long"), "class_accuracy_monocyte_mean"] == pytest.approx(0.8)
    assert pd.isna(t.loc[("original+synthetic", "cellgan-curated"), "class_accuracy_monocyte_mean"])
    assert t.loc[("original+synthetic", "cellgan"), "class_accuracy_monocyte_mean"] == pytest.approx(0.3)
    assert t.loc[("original+synthetic", "cellgan"), "class_accuracy_monocyte_n"] == 2
    assert t.loc[("original+synthetic", "cellgan"), "intra_fid_monocyte_mean"] == pytest.approx(90.0)
    assert t.loc[("original+synthetic", "cgan"), "class_accuracy_monocyte_mean"] == pytest.approx(0.9)
    assert t.loc[("original+synthetic", "cgan"), "intra_fid_monocyte_mean"] == pytest.approx(30.0)
    assert pd.isna(t.loc[("original", "–"), "class_accuracy_monocyte_mean"])   # no GAN cells: no fidelity
    assert t.loc[("original+synthetic", "cgan"), "recall_monocyte_mean"] == pytest.approx(0.5)
    assert "class_accuracy_basophil_mean" not in t.columns
    md = (s / "report" / "scarcity_32px_monocyte20.md").read_text()
    assert "class_accuracy_monocyte" in md and "0.3 ± 0.14 (2)" in md


def test_a_cut_class_with_a_space_gives_a_file_name_without_one():
    from hpcgan.report import _cut_slug
    assert _cut_slug("immature granulocyte=20,monocyte=20") == "immature_granulocyte20_monocyte20"
    assert _cut_slug("eosinophil=20,monocyte=20") == "eosinophil20_monocyte20"   # the names docs already cite
