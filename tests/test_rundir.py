"""hpcgan.rundir: the files of any run directory round-trip, and a resumed log keeps only what was checkpointed."""
import json

from hpcgan.rundir import CsvLog, read_config, read_json, read_status, write_config, write_json, write_status


def test_json_round_trip_and_defaults(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"x": "y"}}
    write_json(tmp_path / "sub" / "r.json", obj)
    assert read_json(tmp_path / "sub" / "r.json") == obj
    assert (tmp_path / "sub" / "r.json").read_text() == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    assert read_json(tmp_path / "missing.json") is None and read_json(tmp_path / "missing.json", {}) == {}
    (tmp_path / "bad.json").write_text("{half")
    assert read_json(tmp_path / "bad.json", "fallback") == "fallback"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]   # no temp files left


def test_status_round_trip(tmp_path):
    assert read_status(tmp_path) == {}
    write_status(tmp_path, {"state": "running", "step": 3, "steps": 10})
    assert read_status(tmp_path) == {"state": "running", "step": 3, "steps": 10}
    write_status(tmp_path, {**read_status(tmp_path), "state": "finished", "step": 10})
    assert read_status(tmp_path) == {"state": "finished", "step": 10, "steps": 10}


def test_config_round_trip(tmp_path):
    cfg = {"shards": ["/a", "/b"], "steps": None, "lr": 1e-3, "model": {"name": "x", "betas": [0.0, 0.9]},
           "diffaug": [], "flag": True, "out": "???"}
    write_config(tmp_path, cfg)
    assert read_config(tmp_path) == cfg


def test_csv_log_resume_keeps_rows_up_to_the_step(tmp_path):
    path = tmp_path / "log.csv"
    log = CsvLog(path, ("step", "loss", "acc"))
    for step in (2, 4, 6):
        log.write({"step": step, "loss": f"{step / 10:.6g}", "ignored": 1})   # missing acc -> empty cell
    assert log.read() == [{"step": str(s), "loss": f"{s / 10:.6g}", "acc": ""} for s in (2, 4, 6)]
    resumed = CsvLog(path, ("step", "loss", "acc"), resume_step=4)   # rows after the checkpoint are redone
    assert [r["step"] for r in resumed.read()] == ["2", "4"]
    resumed.write({"step": 5, "loss": 0.5, "acc": 0.9})
    assert resumed.read()[-1] == {"step": "5", "loss": "0.5", "acc": "0.9"}
    assert CsvLog(path, ("step", "loss")).read() == []                 # a fresh run: the header only
    assert path.read_text() == "step,loss\n"
