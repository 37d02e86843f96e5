"""hpcgan.progress: a progress line at least once a minute when there is no bar (progress=false, or stderr a
Slurm log file), never tqdm frames; checked with an injected clock, and for every stage that can run past a
minute, in process, on tiny inputs."""
from __future__ import annotations

import logging

import pytest

from hpcgan import progress
from hpcgan.progress import Progress, duration


class FakeClock:
    """Seconds that pass only when asked: `step` more at every reading."""
    def __init__(self, step: float = 0.0):
        self.t, self.step = 1000.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hpcgan.progress"]


def test_durations():
    assert [duration(s) for s in (0, 45.4, 60, 286, 3600, 7500)] == ["0s", "45s", "1m00s", "4m46s", "1h00m", "2h05m"]


def test_a_line_at_least_once_a_minute_with_count_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="hpcgan.progress")
    clock = FakeClock()
    p = Progress(7000, "shard", "img", bar=True, tty=False, clock=clock)   # a bar asked for, but not a terminal
    for _ in range(10):          # 10 x 25 s of 400 images: a line at 75 s, 150 s and 225 s, none between
        clock.t += 25
        p.update(400)
    said = lines(caplog)
    assert said == ["shard: 1,200/7,000 img (17%), 16 img/s, ETA 6m02s",
                    "shard: 2,400/7,000 img (34%), 16 img/s, ETA 4m48s",
                    "shard: 3,600/7,000 img (51%), 16 img/s, ETA 3m32s"], said
    p.set_postfix(loss=0.12345, val=None)
    clock.t += 10
    p.update(3000)
    p.close()
    assert lines(caplog)[-1] == "shard: 7,000/7,000 img (100%), 26.9 img/s, done in 4m20s, loss=0.1235"
    p.close()
    assert len(lines(caplog)) == 4   # closing twice says nothing more


def test_a_quick_job_says_nothing_and_a_terminal_gets_the_bar(caplog, capsys):
    caplog.set_level(logging.INFO, logger="hpcgan.progress")
    with Progress(10, "quick", bar=False, clock=FakeClock(1.0)) as p:
        p.update(10)
    assert lines(caplog) == []
    with Progress(10, "tty", bar=True, tty=True, clock=FakeClock(100.0)) as p:
        p.update(10)
    assert lines(caplog) == [] and "tty" in capsys.readouterr().err   # the bar, not log lines


# ---- every stage that can run past a minute: one line a (fake) minute, with progress=false

@pytest.fixture
def slow_clock(monkeypatch, caplog):
    """Every clock reading is a minute later: each stage must say where it is."""
    monkeypatch.setattr(progress, "CLOCK", [FakeClock(61.0)])
    caplog.set_level(logging.INFO, logger="hpcgan.progress")
    return caplog


def said(caplog, desc: str) -> list[str]:
    return [m for m in lines(caplog) if m.startswith(desc)]


def test_simulate_and_shard_say_where_they_are(slow_clock, tmp_path):
    from hpcgan.data.build import build
    from hpcgan.data.simulate import simulate
    simulate(tmp_path / "sim", seed=0, scale=0.05, progress=False)
    assert said(slow_clock, "simulate: ") and "img/s" in said(slow_clock, "simulate: ")[0]
    build({s: str(tmp_path / "sim" / s) for s in ("pbc", "aml", "lab")}, tmp_path / "shards", size=32, seed=0,
          progress=False, contact_sheet=False)
    assert said(slow_clock, "shard: ") and "ETA" in said(slow_clock, "shard: ")[0]


def test_train_generate_features_evaluate_and_classify_say_where_they_are(slow_clock, simulated_shards, tmp_path):
    from hpcgan.classify.run import main as classify_main
    from hpcgan.evaluate import evaluate
    from hpcgan.generate import generate
    from hpcgan.train import run
    shards = simulated_shards(0.3)
    run({"shards": str(shards), "run_dir": str(tmp_path / "gan"), "steps": 3, "batch_size": 8,
         "model": {"name": "wgan_gp_ac", "width": 8}, "progress": False, "tensorboard": False, "log_every": 1,
         "sample_every": 0, "samples_per_class": 1, "precision": "fp32", "device": "cpu", "num_threads": 1,
         "backend": "webdataset"})
    assert said(slow_clock, "train wgan_gp_ac: ") and "step/s" in said(slow_clock, "train wgan_gp_ac: ")[0]
    generate(tmp_path / "gan", tmp_path / "syn", per_class=2, progress=False, device="cpu")
    assert said(slow_clock, "generate: ")
    evaluate({"shards": str(shards), "run": str(tmp_path / "gan"), "cache_dir": str(tmp_path / "cache"),
              "metrics": ["fid"], "n_per_class": 2, "progress": False, "device": "cpu"})
    assert said(slow_clock, "cell extractor: ") and said(slow_clock, "generated: ")
    assert classify_main([f"shards={shards}", f"out={tmp_path / 'cls'}", "steps=3", "eval_every=3", "batch_size=8",
                          "progress=false", "device=cpu", "precision=fp32"]) == 0
    assert said(slow_clock, "classify small_cnn original: ")
