"""tools/lever_table.py (issue 20's lever screen table) on a planted results tree; lever_sheet's set lookup."""
import json
import subprocess
import sys

from hpcgan import REPO_ROOT


def test_lever_table_rows_and_mean_cut_recall(tmp_path):
    syn, run = tmp_path / "syn" / "g", tmp_path / "gan" / "g"
    (run / "checkpoints").mkdir(parents=True)
    syn.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"step": 1234, "time_budget": {"elapsed_s": 600.4}}))
    (syn / "manifest.json").write_text(json.dumps({
        "checkpoint": {"path": str(run / "checkpoints" / "step-00001234.pt")},
        "curation": {"classes": {"monocyte": {"kept": 260, "drawn": 300}, "basophil": {"kept": 1, "drawn": 1}}},
        "views": {"sigma": 0.3, "classes": {"eosinophil": {"anchors": 20}, "basophil": {"anchors": 280}}}}))
    for name, synthetic, mono in (("plain", None, 0.5), ("gan", {"path": str(syn), "name": "g-long"}, 0.7)):
        write_result(tmp_path, name, synthetic, {"monocyte": mono, "eosinophil": 0.9, "basophil": 0.1},
                     {"monocyte": 20, "eosinophil": 20})
    out = lever_table(tmp_path).stdout.splitlines()
    assert out[0].startswith("| lever | set | regime | balanced acc. | macro-F1 | eosinophil recall | monocyte recall |")
    rows = {line.split(" | ")[0].strip("| "): line for line in out[2:]}
    assert "| – | r | 0.800 | 0.750 | 0.90 | 0.50 | 0.700 | 1200 / 900 | – | – | – | – |" in rows["plain"]
    assert ("| g-long | r | 0.800 | 0.750 | 0.90 | 0.70 | 0.800 | 1200 / 900 | 1234 | 600 | monocyte 260/300 | "
            "eosinophil 20 (sigma 0.3) |") in rows["gan"]


def test_lever_table_names_class_swapped_views_and_what_they_borrow():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from lever_table import views_cell
    swapped = {"source": "others", "sigma": 0.3, "view_classes": ["eosinophil", "monocyte"],
               "classes": {"basophil": {"anchors": 20}, "neutrophil": {"anchors": 12}}}
    expected = "monocyte swapped: 32 anchors of 2 other classes (sigma 0.3)"
    assert views_cell(swapped, ["monocyte", "basophil"]) == expected
    assert views_cell(swapped, ["lymphocyte"]) == "–"
    assert views_cell({"source": "own", "sigma": 0.3, "classes": {"monocyte": {"anchors": 20}}},
                      ["monocyte"]) == "monocyte 20 (sigma 0.3)"
    assert views_cell(None, ["monocyte"]) == "–"


def write_result(root, name, synthetic, recall, scarce):
    d = root / "cls" / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({
        "tag": name, "run_dir": str(d), "regime": {"name": "r"}, "synthetic": synthetic,
        "metrics": {"balanced_accuracy": 0.8, "macro_f1": 0.75}, "per_class": {"recall": recall},
        "settings": {"scarce": scarce}, "rows": [{"steps_run": 1200}], "selection": {"best_step": 900}}))


def lever_table(root, *args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "lever_table.py"), str(root), *args],
                          capture_output=True, text=True)


def test_lever_table_takes_the_runs_own_cut_and_marks_a_class_without_test_cells(tmp_path):
    """Another cut (a class name with a space, one without test images: recall None) gets its own columns and
    a mean over the scored classes; runs of different cuts need --cut."""
    write_result(tmp_path, "a", None, {"monocyte": 0.5, "smudge cell": None, "immature granulocyte": 0.6},
                 {"smudge cell": 10, "immature granulocyte": 20})
    out = lever_table(tmp_path)
    assert out.returncode == 0, out.stderr
    head, _, line = out.stdout.splitlines()
    assert "| immature granulocyte recall | smudge cell recall | mean cut recall |" in head
    assert "| 0.60 | – | 0.600 |" in line
    write_result(tmp_path, "full", None, {"smudge cell": 0.9, "immature granulocyte": 0.8}, None)  # uncut: its row
    assert "| 0.80 | 0.90 | 0.850 |" in lever_table(tmp_path).stdout.splitlines()[-1]
    write_result(tmp_path, "b", None, {"monocyte": 0.5}, {"monocyte": 20})
    other = lever_table(tmp_path)
    assert other.returncode != 0 and "--cut" in other.stderr
    assert "| 0.50 | 0.500 |" in lever_table(tmp_path, "--cut", "monocyte").stdout.splitlines()[-1]


def _lever_sheet():
    import importlib.util
    spec = importlib.util.spec_from_file_location("lever_sheet", REPO_ROOT / "tools" / "lever_sheet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lever_sheet_finds_a_studys_sets_of_one_seed_and_size_and_reads_the_cut(tmp_path):
    import pytest
    ls = _lever_sheet()
    for name in ("cellgan-s0-32", "cellgan-curated-s0-32", "cellgan-s1-32", "cellgan-s0-64"):
        (tmp_path / "study" / "synthetic" / name).mkdir(parents=True)
    found = ls.set_dirs(tmp_path / "study", 0, 32, None)
    assert list(found) == ["cellgan", "cellgan-curated"] and found["cellgan"].name == "cellgan-s0-32"
    assert list(ls.set_dirs(tmp_path / "study", 1, 32, ["cellgan"])) == ["cellgan"]
    with pytest.raises(SystemExit, match="no synthetic set cellgan-long"):
        ls.set_dirs(tmp_path / "study", 0, 32, ["cellgan-long"])
    (tmp_path / "screen" / "syn" / "base").mkdir(parents=True)        # a folder of the former lever_screen.sh
    assert list(ls.set_dirs(tmp_path / "screen", 0, 32, None)) == ["base"]
    with pytest.raises(SystemExit, match="neither synthetic/"):
        ls.set_dirs(tmp_path, 0, 32, None)
    assert ls.parse_cut("monocyte=10,eosinophil=10") == {"monocyte": 10, "eosinophil": 10}
    with pytest.raises(SystemExit, match="give --cut"):
        ls.study_cut(tmp_path / "study")
    (tmp_path / "study" / "study.json").write_text(json.dumps({"settings": {"data": {"scarce": {"smudge cell": 8}}}}))
    assert ls.study_cut(tmp_path / "study") == {"smudge cell": 8}
    with pytest.raises(SystemExit, match="CLASS=N"):
        ls.parse_cut("monocyte")
