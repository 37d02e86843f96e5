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
        "curation": {"classes": {"monocyte": {"kept": 260, "drawn": 300}, "basophil": {"kept": 1, "drawn": 1}}}}))
    for name, synthetic, mono in (("plain", None, 0.5), ("gan", {"path": str(syn), "name": "g-long"}, 0.7)):
        d = tmp_path / "cls" / name
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({
            "tag": name, "run_dir": str(d), "regime": {"name": "r"}, "synthetic": synthetic,
            "metrics": {"balanced_accuracy": 0.8, "macro_f1": 0.75},
            "per_class": {"recall": {"monocyte": mono, "eosinophil": 0.9}},
            "rows": [{"steps_run": 1200}], "selection": {"best_step": 900}}))
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "lever_table.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in out[2:]}
    assert "| – | r | 0.800 | 0.750 | 0.50 | 0.90 | 0.700 | 1200 / 900 | – | – | – |" in rows["plain"]
    assert "| g-long | r | 0.800 | 0.750 | 0.70 | 0.90 | 0.800 | 1200 / 900 | 1234 | 600 | mon 260/300 |" in rows["gan"]


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
    with pytest.raises(SystemExit, match="CLASS=N"):
        ls.parse_cut("monocyte")
