"""The training loop: every model under torchrun (2 ranks), exact resume after SIGKILL, SIGTERM/SIGUSR2
checkpoint-and-exit, NaN skipping and divergence, precision choices, already-finished runs."""
import csv
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcgan import CONFIG_DIR
from hpcgan.checkpoint import list_checkpoints, load_latest
from hpcgan.data.shards import ShardWriter, write_manifest
from hpcgan.gauges import class_signal, data_diversity, grid_diversity
from hpcgan.models.registry import MODEL_NAMES, build_model, load_spec
from hpcgan.rundir import EXIT_FAILED, EXIT_OK, EXIT_SIGNAL
from hpcgan.train import LOG_COLUMNS, Trainer, resolve_precision, run, unwrap
from hpcgan import dist
from hpcgan.settings import SettingsError

CLASSES = ["a", "b", "c"]
# tiny and fast: width-8 networks, 8-image batches, webdataset backend without worker processes
COMMON = ["batch_size=8", "model.width=8", "backend=webdataset", "num_threads=1", "progress=false",
          "tensorboard=false", "samples_per_class=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """48 PNGs of 32 px, 3 classes (each a different brightness), one shard set with a manifest."""
    return write_shards(tmp_path_factory.mktemp("train_shards"), CLASSES)


@pytest.fixture(scope="session")
def shards_with_an_empty_class(tmp_path_factory) -> Path:
    """The same images, and a fourth class "d" that has none (like a cut scarce class)."""
    return write_shards(tmp_path_factory.mktemp("train_shards_empty"), CLASSES + ["d"])


def write_shards(out: Path, classes: list[str]) -> Path:
    rng = np.random.default_rng(0)
    with ShardWriter(out, "train", shard_size=20) as w:
        for i in range(48):
            label = i % 3
            arr = (rng.random((32, 32, 3)) * 60 + label * 80).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            w.write(f"s{i:05d}", buf.getvalue(), "png", label, {"class": CLASSES[label], "synthetic": True})
    counts = {c: 16 if c in CLASSES else 0 for c in classes}
    write_manifest(out, {"classes": classes, "image_size": 32, "counts": {"train": counts},
                         "shards": {"train": w.shards}, "synthetic": True})
    return out


def compose(shards: Path, run_dir: Path, *overrides: str) -> dict:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = hcompose("train", overrides=[f"shards={shards}", f"run_dir={run_dir}", *COMMON, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def cli(shards, run_dir, *overrides, nproc=1) -> list[str]:
    """A real `hpcgan.train` process (torchrun with nproc > 1), on the CPU (gloo) unless `device=` is given:
    these tests are about CPU DDP, and a GPU machine with fewer GPUs than ranks would refuse them."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    device = [] if any(o.startswith("device=") for o in overrides) else ["device=cpu"]
    return [*launcher, "-m", "hpcgan.train", f"shards={shards}", f"run_dir={run_dir}", *COMMON, *device,
            *overrides]


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def assert_same_weights(a: Path, b: Path):
    sa, _ = load_latest(a)
    sb, _ = load_latest(b)
    assert sa["step"] == sb["step"]
    for key in ("G", "D", "G_ema"):
        if sa[key] is None:
            assert sb[key] is None
            continue
        diff = [n for n in sa[key] if not torch.equal(sa[key][n], sb[key][n])]
        assert not diff, f"{key} differs after resume: {diff[:5]}"
    return sa


# ---- in-process (fast) -------------------------------------------------------------------------------

def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == (None, False)
    assert resolve_precision("bf16", cpu) == (torch.bfloat16, False)
    assert resolve_precision("auto", cpu) == (None, False)
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision='fp8'"):
        resolve_precision("fp8", cpu)


def test_bad_setting_is_one_line_exit_2(shards, tmp_path):
    """`python -m hpcgan.train batch_size=abc`: one line naming the setting, exit code 2, nothing written."""
    for arg, words in (("batch_size=abc", "batch_size"), ("model.optim.lr=abc", "model.optim.lr")):
        p = subprocess.run(cli(shards, tmp_path / "run", arg), env=ENV, capture_output=True, text=True, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (arg, p.stderr[-2000:])
        assert lines[0].startswith("hpcgan.train: error: ") and words in lines[0], (arg, lines)
    cases = [("batch_size=0", "batch_size=0: must be >= 1"), ("model.width=abc", "model.width"),
             ("precision=fp8", "precision='fp8'"), ("diffaug=[colour]", "diffaug"), ("ema=2", "ema=2.0"),
             ("model.optim.name=sgd", "model.optim.name='sgd'")]
    for arg, words in cases:   # in-process: the same checks, as a SettingsError before any work
        with pytest.raises(SettingsError) as e:
            run(compose(shards, tmp_path / "run", arg))
        assert words in str(e.value) and "\n" not in str(e.value), (arg, str(e.value))
    assert not (tmp_path / "run").exists()
    # a shard set that is not one: the same one line, not a traceback from the loader (issue 18)
    p = subprocess.run(cli(tmp_path / "nonexistent", tmp_path / "run"), env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"hpcgan.train: error: shards={tmp_path / 'nonexistent'} does not exist; build one with tools/shard.py"], p.stderr
    assert not (tmp_path / "run").exists()


def test_fp16_on_cpu_rejected_by_the_run(shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed here (see test_fp16_gradscaler_penalty_on_cuda)")
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        run(compose(shards, tmp_path / "run", "steps=2", "precision=fp16"))
    assert not list_checkpoints(tmp_path / "run")


def test_bf16_run_finite_on_cpu(shards, tmp_path):
    rd = tmp_path / "run"
    assert run(compose(shards, rd, "steps=4", "precision=bf16", "log_every=2", "ckpt_every=100")) == EXIT_OK
    rows = read_log(rd)
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("d_loss", "g_loss", "gp", "wdist", "ac_acc_real"))
    state, _ = load_latest(rd)
    assert all(v.isfinite().all() for v in state["G"].values() if v.is_floating_point())


def test_slurm_batch_script_is_one_process_not_rank_0_of_n(monkeypatch):
    """`sbatch --ntasks=2 --wrap 'python -m hpcgan.train ...'` (no srun): the batch script sees SLURM_PROCID=0
    and SLURM_NTASKS=2 but no SLURM_STEP_ID (as a real Slurm 22 showed); waiting for a rank 1 would hang."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_STEPID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert dist.launch_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_STEP_ID", "4294967294")  # the batch step's id, where Slurm sets one
    assert dist.launch_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # srun --ntasks=2: task 1 of step 0
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert dist.launch_env() == (1, 2, 0)


def test_one_device_rule_for_train_loader_and_generate():
    from hpcgan.data.loader import resolve_device as loader_device
    from hpcgan.generate import GenerateError, resolve_device as generate_device
    assert dist.resolve_device("cpu") == torch.device("cpu")
    assert dist.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert loader_device("auto") == dist.resolve_device("auto").type
    for bad in ("gpu", "mps", "cuda:x"):
        with pytest.raises(ValueError, match="choose auto, cpu, cuda"):
            dist.resolve_device(bad)
    with pytest.raises(GenerateError, match="choose auto, cpu, cuda"):
        generate_device("gpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(RuntimeError, match="no CUDA device" if n == 0 else "CUDA GPU"):
        dist.resolve_device(f"cuda:{n}")
    if n == 0:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            loader_device("cuda")
    else:
        with pytest.raises(RuntimeError, match="nproc_per_node"):
            dist.resolve_device("cuda", local_rank=n)
        assert dist.resolve_device("cuda", local_rank=n - 1) == torch.device("cuda", n - 1)


def _trainer(spec_name="wgan_gp_ac"):
    spec = load_spec(spec_name)
    spec.width = 8
    return Trainer(spec, len(CLASSES), 32, dist.DistEnv(), seed=0, precision="fp32", ema=0.5)


def test_channels_last_trainer_matches_nchw():
    """NHWC weights and activations are a layout, not a different model: same initial weights, the same
    first-step losses (to float rounding), and checkpoints that load into a plain NCHW model."""
    spec = load_spec("wgan_gp_ac")
    spec.width = 8
    make = lambda cl: Trainer(spec, len(CLASSES), 32, dist.DistEnv(), seed=0, channels_last=cl)  # noqa: E731
    nchw, nhwc = make(False), make(True)
    conv = unwrap(nhwc.D).stem.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    real = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    y = torch.arange(8) % len(CLASSES)
    a, _, _ = nchw.step(real, y, step=0)
    b, _, _ = nhwc.step(real, y, step=0)
    for k in ("d_loss", "g_loss", "gp", "wdist"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-3, abs=1e-3), k
    plain = load_spec("wgan_gp_ac")
    plain.width = 8
    G, _ = build_model(plain, len(CLASSES), 32)
    G.load_state_dict(nhwc.state_dict()["G"])
    G.eval()
    z, yy = torch.randn(4, plain.latent_dim), torch.arange(4) % len(CLASSES)
    with torch.no_grad():
        assert torch.allclose(G(z, yy), unwrap(nhwc.G).eval()(z, yy), atol=1e-5)


def test_grid_diversity_gauges_noise_and_class_dependence():
    g = torch.Generator().manual_seed(0)
    rows, k = 3, 4
    protos = torch.rand(rows, 1, 3, 8, 8, generator=g) * 2 - 1
    collapsed = protos.expand(rows, k, 3, 8, 8).reshape(rows * k, 3, 8, 8)   # same image across the noise
    d = grid_diversity(collapsed, k)
    assert d["within_row_std"] == pytest.approx(0.0, abs=1e-6) and d["between_row_std"] > 0.3
    noisy = torch.rand(1, k, 3, 8, 8, generator=g).expand(rows, k, 3, 8, 8).reshape(rows * k, 3, 8, 8)
    d = grid_diversity(noisy, k)                                               # ignores the class
    assert d["within_row_std"] > 0.15 and d["between_row_std"] == pytest.approx(0.0, abs=1e-6)
    # the same numbers for labelled real images
    labels = torch.arange(rows).repeat_interleave(k)
    assert data_diversity(collapsed, labels) == pytest.approx(grid_diversity(collapsed, k), abs=1e-6)
    assert data_diversity(noisy, labels) == pytest.approx(grid_diversity(noisy, k), abs=1e-6)


def test_nan_batch_is_skipped_without_touching_weights():
    tr = _trainer()
    before_d = {k: v.clone() for k, v in tr.state_dict()["D"].items()}
    real = torch.full((8, 3, 32, 32), float("nan"))
    y = torch.arange(8) % 3
    stats, bad, stop = tr.step(real, y, step=0)
    assert bad and not stop
    assert all(torch.equal(before_d[k], v) for k, v in tr.state_dict()["D"].items())
    # the generator step does not see the bad real batch: it may update, and stays finite
    assert all(v.isfinite().all() for v in tr.state_dict()["G"].values() if v.is_floating_point())
    # the next, healthy batch trains normally
    stats, bad, _ = tr.step(torch.rand(8, 3, 32, 32) * 2 - 1, y, step=1)
    assert not bad and math.isfinite(stats["d_loss"].item())
    assert any(not torch.equal(before_d[k], v) for k, v in tr.state_dict()["D"].items())


def test_divergence_fails_after_max_bad_steps_and_keeps_checkpoints(shards, tmp_path):
    """Resumed with an absurd learning rate, every loss turns non-finite after the first update: the bad
    updates are skipped, the run fails after max_bad_steps, and the good checkpoint stays usable."""
    rd = tmp_path / "run"
    assert run(compose(shards, rd, "steps=2", "log_every=1")) == EXIT_OK
    good = list_checkpoints(rd)[-1].read_bytes()
    code = run(compose(shards, rd, "steps=30", "model.optim.lr=1e30", "max_bad_steps=3", "ckpt_every=1",
                       "log_every=1"))
    assert code == EXIT_FAILED
    st = status(rd)
    assert st["state"] == "failed" and "max_bad_steps" in st["error"]
    rows = read_log(rd)
    bad = [int(r["step"]) for r in rows if int(r["bad_steps"]) > 0]
    assert bad and int(rows[-1]["bad_steps"]) == 3
    # nothing was checkpointed during the bad streak; the last good checkpoint is intact and finite
    state, path = load_latest(rd)
    assert state["step"] < min(bad)
    if state["step"] == 2:
        assert path.read_bytes() == good
    assert all(v.isfinite().all() for k in ("G", "D") for v in state[k].values() if v.is_floating_point())


def test_corrupt_newest_checkpoint_resumes_from_previous(shards, tmp_path, capsys):
    rd = tmp_path / "run"
    assert run(compose(shards, rd, "steps=4", "ckpt_every=2", "log_every=2")) == EXIT_OK
    newest = list_checkpoints(rd)[-1]
    assert newest.name == "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    (rd / "status.json").unlink()
    capsys.readouterr()
    assert run(compose(shards, rd, "steps=6", "ckpt_every=2", "log_every=2")) == EXIT_OK
    err = capsys.readouterr().err
    assert "step-00000004.pt is unreadable" in err
    assert [int(r["step"]) for r in read_log(rd)] == [2, 4, 6]  # resumed from 2, redid 3-4
    assert status(rd)["state"] == "finished" and load_latest(rd)[0]["step"] == 6


def test_already_finished_run_exits_immediately(shards, tmp_path, capsys):
    rd = tmp_path / "run"
    assert run(compose(shards, rd, "steps=2", "log_every=1")) == EXIT_OK
    mtime = list_checkpoints(rd)[-1].stat().st_mtime_ns
    capsys.readouterr()
    assert run(compose(shards, rd, "steps=2", "log_every=1")) == EXIT_OK
    assert "already finished" in capsys.readouterr().out
    assert list_checkpoints(rd)[-1].stat().st_mtime_ns == mtime
    assert len(read_log(rd)) == 2


class CountingClock:
    """A clock that reads `dt` seconds more at every call: the training loop reads it once at its start and once
    after every step, so each step "takes" dt seconds whatever the machine does (no timed test)."""

    def __init__(self, dt: float = 1.0):
        self.dt, self.t = dt, 100.0

    def __call__(self) -> float:
        self.t += self.dt
        return self.t


def test_time_budget_stops_at_the_first_step_that_spends_it(shards, tmp_path, capsys):
    """time_budget_s=10 at 1 s a step: the run ends, finished, after step 10 of 50, checkpointed there, and
    status.json records the step reached; rerunning it is "already finished"; a larger budget continues it."""
    rd = tmp_path / "run"
    args = ["steps=50", "ckpt_every=4", "log_every=4", "sample_every=0"]
    assert run(compose(shards, rd, *args, "time_budget_s=10"), clock=CountingClock()) == EXIT_OK
    st = status(rd)
    assert st["state"] == "finished" and st["step"] == 10 and st["steps"] == 50
    assert st["time_budget"] == {"seconds": 10.0, "elapsed_s": 10.0, "step_reached": 10, "steps_planned": 50}
    state, _ = load_latest(rd)
    assert state["step"] == 10 and state["meta"]["train_seconds"] == 10.0
    assert [int(r["step"]) for r in read_log(rd)] == [4, 8, 10]
    mtime = list_checkpoints(rd)[-1].stat().st_mtime_ns
    capsys.readouterr()
    assert run(compose(shards, rd, *args, "time_budget_s=10"), clock=CountingClock()) == EXIT_OK
    assert "already finished (10/50 steps, time_budget_s=10 spent)" in capsys.readouterr().out
    assert list_checkpoints(rd)[-1].stat().st_mtime_ns == mtime
    assert run(compose(shards, rd, *args, "time_budget_s=13"), clock=CountingClock()) == EXIT_OK
    assert status(rd)["step"] == 13 and load_latest(rd)[0]["step"] == 13


def test_time_budget_run_resumed_midway_ends_where_the_straight_one_does(shards, tmp_path):
    """A budgeted run stopped after 4 steps and resumed counts its earlier seconds: it stops after the same step
    as the uninterrupted run, with the same weights bit for bit (EMA and DiffAugment on)."""
    args = ["ckpt_every=2", "log_every=2", "sample_every=0", "ema=0.9", "diffaug=[color,translation]",
            "time_budget_s=7.5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(compose(shards, straight, "steps=30", *args), clock=CountingClock(1.5)) == EXIT_OK
    assert run(compose(shards, resumed, "steps=4", *args), clock=CountingClock(1.5)) == EXIT_OK
    assert status(resumed)["step"] == 4 and "time_budget" not in status(resumed)
    assert run(compose(shards, resumed, "steps=30", *args), clock=CountingClock(1.5)) == EXIT_OK
    assert status(straight)["time_budget"]["step_reached"] == 5 == status(resumed)["time_budget"]["step_reached"]
    assert_same_weights(straight, resumed)


def test_time_budget_must_be_positive():
    with pytest.raises(SettingsError, match="time_budget_s"):
        from hpcgan.train import TrainSettings
        TrainSettings(shards="s", run_dir="r", model={"name": "dcgan"}, time_budget_s=-1)


def test_class_signal_against_chance():
    # unbalanced sampling: chance is always naming the largest class present; balanced: one in the classes present
    sig = class_signal([0.9, 0.5, 0.5, 0.6, 0.6], [60, 0, 20, 20], balanced=False)
    assert sig["rows"] == 4 and sig["accuracy"] == pytest.approx(0.55) and sig["chance"] == pytest.approx(0.6)
    assert not sig["learnt"]
    sig = class_signal([0.5, 0.5, 0.6, 0.6], [60, 0, 20, 20], balanced=True)
    assert sig["chance"] == pytest.approx(1 / 3) and sig["learnt"]
    assert class_signal([], [1, 2], balanced=False) is None  # no auxiliary classifier


@pytest.mark.parametrize("model", ["wgan_gp_ac", "dcgan"])
def test_finished_run_warns_when_its_critic_does_not_know_the_classes(shards, tmp_path, caplog, model):
    """The end-of-run check agrees with log.csv: a warning exactly when the last rows' accuracy on real images
    is not clearly above chance (16 of 48 images per class: 1/3); none for a model without a classifier."""
    rd = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="hpcgan.train"):
        assert run(compose(shards, rd, f"model={model}", "steps=6", "log_every=1")) == EXIT_OK
    warned = [r.getMessage() for r in caplog.records if "auxiliary classifier on real images" in r.getMessage()]
    acc = [float(r["ac_acc_real"]) for r in read_log(rd) if r["ac_acc_real"]]
    if model == "dcgan":
        assert not acc and not warned and "class_signal" not in status(rd)
        return
    mean = sum(acc[-4:]) / 4
    assert len(acc) == 6 and len(warned) == (mean < 1 / 3 + 0.25 * 2 / 3)
    if warned:
        assert f"accuracy {mean:.2f} over the last 4 log rows (chance 0.33)" in warned[0]
    assert status(rd)["class_signal"] == pytest.approx(
        {"accuracy": mean, "chance": 1 / 3, "rows": 4, "learnt": not warned})


def test_resume_with_a_different_batch_order_restarts_the_epoch(shards, tmp_path, caplog):
    """The saved data position counts batches of one order (seed, batch size, ranks, shards); resuming with
    another order says so and restarts the epoch instead of landing at an arbitrary place in it."""
    rd = tmp_path / "run"
    assert run(compose(shards, rd, "steps=3", "batch_size=4", "log_every=1")) == EXIT_OK
    with caplog.at_level(logging.WARNING, logger="hpcgan.train"):
        assert run(compose(shards, rd, "steps=4", "batch_size=4", "log_every=1")) == EXIT_OK
    assert not [r for r in caplog.records if "data order" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="hpcgan.train"):
        assert run(compose(shards, rd, "steps=6", "batch_size=2", "seed=5", "log_every=1")) == EXIT_OK
    msgs = [r.getMessage() for r in caplog.records if "data order" in r.getMessage()]
    assert len(msgs) == 1 and "batch_size: 4 -> 2" in msgs[0] and "seed: 0 -> 5" in msgs[0], msgs
    assert "restarted from its first batch" in msgs[0]
    ckpt, _ = load_latest(rd)
    assert ckpt["step"] == 6 and ckpt["batch_in_epoch"] == 2  # two batches into the restarted epoch
    assert ckpt["meta"]["data_order"]["batch_size"] == 2


def test_twin_classifier_option_trains(shards, tmp_path):
    rd = tmp_path / "run"
    assert run(compose(shards, rd, "steps=3", "log_every=1", "model.ac_twin=true")) == EXIT_OK
    ckpt, _ = load_latest(rd)
    assert "heads.cls_twin.weight" in ckpt["D"] and ckpt["config"]["model"]["ac_twin"] is True
    rows = read_log(rd)
    assert len(rows) == 3 and all(math.isfinite(float(r["d_loss"])) and math.isfinite(float(r["g_loss"])) for r in rows)
    with pytest.raises(ValueError, match="model.ac_twin: True -> False"):  # another critic: no silent resume
        run(compose(shards, rd, "steps=5"))


def test_run_knows_its_class_counts_marks_empty_rows_and_generation_refuses_them(shards_with_an_empty_class,
                                                                                    tmp_path):
    """Issue 9: a class without training images is still generated (the generator is conditioned on every
    class of the manifest). The run records the counts (config.yaml and the checkpoint), its sample grid
    greys and crosses that class's row and says why, and hpcgan.generate refuses the class."""
    from hpcgan.generate import GenerateError, generate
    from hpcgan.rundir import read_config
    rd = tmp_path / "run"
    assert run(compose(shards_with_an_empty_class, rd, "steps=2", "ema=0.9")) == EXIT_OK
    counts = {"a": 16, "b": 16, "c": 16, "d": 0}
    assert read_config(rd)["class_counts"] == counts and load_latest(rd)[0]["config"]["class_counts"] == counts
    with Image.open(rd / "samples" / "step-00000002.png") as im:  # 4 rows of 2 tiles (32 px, 2 px padding)
        grid = np.asarray(im.convert("RGB")).astype(int)
    left = grid.shape[1] - (2 + 2 * 34)
    tiles = [grid[2 + r * 34: 2 + r * 34 + 32, left + 2: left + 2 + 32] for r in range(4)]
    red = [((t[..., 0] > 150) & (t[..., 1] < 60) & (t[..., 2] < 60)).mean() for t in tiles]
    assert red[3] > 0.05 and max(red[:3]) < red[3] / 4, red              # the cross, on row "d" only
    assert (grid[2 + 3 * 34: 2 + 4 * 34, :left] < 128).any()                # its label is drawn
    labels = {r: (grid[2 + r * 34: 2 + r * 34 + 32, :left] < 128).sum() for r in range(4)}
    assert labels[3] > 3 * max(labels[r] for r in range(3))                 # "d (no training images)"
    with pytest.raises(GenerateError, match=r"never saw a training image of \['d'\]"):
        generate(rd, tmp_path / "syn", per_class=2, classes=["a", "d"], progress=False)
    m = generate(rd, tmp_path / "syn", per_class=2, classes=["a", "c"], progress=False)
    assert m["trained_counts"] == counts and m["counts"]["train"] == {"a": 2, "b": 0, "c": 2, "d": 0}
    m = generate(rd, tmp_path / "all", per_class=2, progress=False)   # every class: the unseen one skipped
    assert m["counts"]["train"] == {"a": 2, "b": 2, "c": 2, "d": 0} and m["skipped_classes"] == ["d"]


def test_ema_with_standing_statistics_resumes_exactly_in_process(shards, tmp_path):
    """The EMA (warm-up clock and BatchNorm standing statistics) is part of the exact resume: 2 + 2 steps give
    the bytes of 4 straight ones, and the saved EMA generator's BatchNorm statistics are its own (recomputed
    from its weights), not the live generator's."""
    from hpcgan.train import TrainSettings, standing_stats
    args = ["ckpt_every=2", "log_every=2", "ema=0.999", "diffaug=[color,translation]"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(compose(shards, straight, "steps=4", *args)) == EXIT_OK
    assert run(compose(shards, resumed, "steps=2", *args)) == EXIT_OK
    assert run(compose(shards, resumed, "steps=4", *args)) == EXIT_OK
    state = assert_same_weights(straight, resumed)
    assert state["G_ema_bn"] == "standing"
    running = [k for k in state["G_ema"] if k.endswith("running_mean")]
    assert running and all(not torch.equal(state["G_ema"][k], state["G"][k]) for k in running)
    spec = load_spec("wgan_gp_ac")
    spec.width = 8
    G, _ = build_model(spec, len(CLASSES), 32)
    G.load_state_dict(state["G_ema"])
    standing_stats(G, spec, len(CLASSES), batches=TrainSettings.ema_standing_batches, batch_size=8, seed=0)
    assert all(torch.allclose(G.state_dict()[k], state["G_ema"][k], atol=1e-6) for k in running)


def test_resume_refuses_a_different_model(shards, tmp_path):
    rd = tmp_path / "run"
    assert run(compose(shards, rd, "steps=2")) == EXIT_OK
    with pytest.raises(ValueError, match="different model"):
        run(compose(shards, rd, "steps=4", "model=wgan_gp"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 GradScaler path needs a CUDA GPU; none here")
def test_fp16_gradscaler_penalty_on_cuda(shards, tmp_path):
    rd = tmp_path / "run"
    assert run(compose(shards, rd, "steps=6", "precision=fp16", "log_every=2", "device=cuda")) == EXIT_OK
    state, _ = load_latest(rd)
    assert state["scaler"] is not None and state["scaler"]["D"]["scale"] > 0
    for r in read_log(rd):
        assert math.isfinite(float(r["d_loss"])) and math.isfinite(float(r["gp"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="resuming onto a GPU needs a CUDA GPU; none here")
def test_fp16_run_resumes_on_cuda(shards, tmp_path):
    """The checkpoint is loaded onto the GPU (RNG state included) and training goes on from it."""
    rd = tmp_path / "run"
    assert run(compose(shards, rd, "steps=4", "precision=fp16", "log_every=2", "device=cuda")) == EXIT_OK
    assert run(compose(shards, rd, "steps=6", "precision=fp16", "log_every=2", "device=cuda")) == EXIT_OK
    assert [int(r["step"]) for r in read_log(rd)] == [2, 4, 6]
    assert status(rd)["state"] == "finished" and load_latest(rd)[0]["step"] == 6


# ---- real subprocesses: torchrun, kills, signals (slow) -----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_model_under_torchrun_two_ranks(shards, tmp_path, model):
    spec = load_spec(model)
    rd = tmp_path / model
    p = subprocess.run(cli(shards, rd, f"model={model}", "steps=6", "log_every=2", "ckpt_every=3",
                           "sample_every=3", nproc=2), env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "differ between ranks" not in p.stderr
    assert [c.name for c in list_checkpoints(rd)] == ["step-00000003.pt", "step-00000006.pt"]
    rows = read_log(rd)
    assert list(rows[0]) == list(LOG_COLUMNS) and [int(r["step"]) for r in rows] == [2, 4, 6]
    for r in rows:  # g_loss is empty before the first generator update (n_critic = 5 for wgan)
        assert math.isfinite(float(r["d_loss"])) and (r["g_loss"] == "" or math.isfinite(float(r["g_loss"])))
    assert math.isfinite(float(rows[-1]["g_loss"]))
    png = rd / "samples" / "step-00000006.png"
    with Image.open(png) as im:  # one row per class, 2 per row, 32 px + 2 px padding (+ class names at the left)
        assert im.height == 2 + len(CLASSES) * 34
        labelled = spec.conditional or spec.info_cat > 0   # class names (or code numbers) at the left
        assert im.width > 2 + 2 * 34 if labelled else im.width == 2 + 2 * 34
    with open(rd / "samples" / "diversity.csv", newline="") as f:  # a collapse gauge per sample grid
        div = list(csv.DictReader(f))
    assert [int(r["step"]) for r in div] == [3, 6]
    assert all(0 <= float(r[c]) < 2 for r in div for c in ("within_row_std", "between_row_std"))
    with Image.open(rd / "curves.png") as im:  # a 230 px panel each: losses, critic, [classifier | codes], diversity
        assert im.size == (700, 230 * (3 + (spec.ac_weight > 0) + (spec.info_cat + spec.info_cont > 0)))
    st = status(rd)
    assert st["state"] == "finished" and st["step"] == st["steps"] == 6 and st["world_size"] == 2
    state, _ = load_latest(rd)
    assert state["config"]["model"]["name"] == model and state["config"]["classes"] == CLASSES
    assert state["config"]["image_size"] == 32


def _wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, "the run ended before the test could interrupt it"
        assert time.time() - t0 < timeout, "timed out waiting"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_after_sigkill_is_bit_identical(shards, tmp_path, nproc):
    """Kill -9 after a checkpoint, relaunch: same weights as an uninterrupted run (fp32 CPU), with EMA,
    DiffAugment and flips on, across epoch boundaries (6 batches per epoch on one rank, 3 on two)."""
    args = ["steps=14", "ckpt_every=2", "log_every=2", "sample_every=0", "ema=0.9", "flip=true",
            "diffaug=[color,translation,cutout]"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p = subprocess.run(cli(shards, straight, *args, nproc=nproc), env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    proc = subprocess.Popen(cli(shards, killed, *args, nproc=nproc), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: any(c.name >= "step-00000004.pt" for c in list_checkpoints(killed)), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole launch: torchrun and its workers
        proc.wait()
    assert status(killed)["state"] == "running"
    p = subprocess.run(cli(shards, killed, *args, nproc=nproc), env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    state = assert_same_weights(straight, killed)
    assert state["step"] == 14 and state["G_ema"] is not None
    assert read_log(straight) != [] and [r["step"] for r in read_log(killed)] == [r["step"] for r in read_log(straight)]


@pytest.mark.slow
def test_time_budget_under_torchrun_stops_both_ranks_after_the_same_step(shards, tmp_path):
    """Two ranks with their own clocks: the budget's stop is agreed, both leave finished at one step."""
    rd = tmp_path / "run"
    p = subprocess.run(cli(shards, rd, "steps=100000", "time_budget_s=2", "log_every=10", "sample_every=0",
                           nproc=2), env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    st = status(rd)
    assert st["state"] == "finished" and 0 < st["step"] < 100000
    assert st["time_budget"]["step_reached"] == st["step"] == load_latest(rd)[0]["step"]
    assert st["time_budget"]["elapsed_s"] >= 2   # the ranks agree on the time (the largest clock), not only the step
    again = subprocess.run(cli(shards, rd, "steps=100000", "time_budget_s=2", "log_every=10", "sample_every=0",
                               nproc=2), env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-3000:]
    assert load_latest(rd)[0]["step"] == st["step"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_signal_checkpoints_and_exits_then_resumes(shards, tmp_path, signum):
    rd = tmp_path / "run"
    args = ["steps=40", "ckpt_every=1000", "log_every=1", "sample_every=0"]
    proc = subprocess.Popen(cli(shards, rd, *args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: (rd / "log.csv").is_file() and len(read_log(rd)) >= 3, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGNAL, err[-3000:]
    st = status(rd)
    assert st["state"] == "interrupted" and st["signal"] == signum.name and 3 <= st["step"] < 40
    state, _ = load_latest(rd)
    assert state["step"] == st["step"]
    assert f"stopped by {signum.name}" in err
    p = subprocess.run(cli(shards, rd, *args), env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert status(rd)["state"] == "finished" and load_latest(rd)[0]["step"] == 40
    assert [int(r["step"]) for r in read_log(rd)] == list(range(1, 41))


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


@pytest.mark.slow
def test_signal_to_one_rank_stops_all_ranks_at_the_same_step(shards, tmp_path):
    """Slurm may signal ranks at slightly different times: rank 1 alone gets SIGUSR2, both stop together."""
    rd = tmp_path / "run"
    args = ["steps=40", "ckpt_every=1000", "log_every=1", "sample_every=0"]
    proc = subprocess.Popen(cli(shards, rd, *args, nproc=2), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (rd / "log.csv").is_file() and len(read_log(rd)) >= 3, proc)
    rank1 = [c for c in _children(proc.pid) if _rank_of(c) == 1]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports the workers' exit code 3 as a failure
    st = status(rd)
    assert st["state"] == "interrupted" and 3 <= st["step"] < 40
    assert load_latest(rd)[0]["step"] == st["step"]
    p = subprocess.run(cli(shards, rd, *args, nproc=2), env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert status(rd)["state"] == "finished" and load_latest(rd)[0]["step"] == 40


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="needs exactly one CUDA GPU (more ranks than GPUs)")
def test_more_ranks_than_gpus_is_a_clear_error(shards, tmp_path):
    p = subprocess.run(cli(shards, tmp_path / "run", "steps=2", "device=cuda", nproc=2), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "local rank 1 but this node has 1 GPU(s)" in p.stderr, p.stderr[-3000:]
