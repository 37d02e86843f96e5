"""slurm/train.sh on a real Slurm (slurm/local/up.sh brings up a one-node cluster when run as root).

Each test submits the real script with `sbatch` and trains a tiny model (32 px, width 8): plain completion;
`scontrol requeue` mid-run -> resume -> completion; the time-limit warning (SIGUSR2 to the batch shell, what
`--signal=B:USR2@120` makes Slurm send) -> checkpoint, requeue, resume, completion; a real 2-minute time limit
whose warning Slurm itself delivers; scancel -> checkpoint, no requeue.
Job states come from `scontrol show job` (kept MinJobAge=300 s), which works with or without accounting (sacct:
tests/test_slurm_accounting.py).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO / "slurm" / "train.sh"
TINY = ["model=wgan_gp_ac", "model.width=8", "model.z_dim=16", "batch_size=8", "log_every=1", "sample_every=0",
        "samples_per_class=1", "progress=false", "tensorboard=false", "precision=fp32"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def write_tiny_shards(out: Path, n: int = 48, size: int = 32) -> Path:
    """A valid shard set of random-noise images, labels cycling over the 12 classes."""
    from hpcgan.data.shards import ShardWriter, write_manifest
    from hpcgan.data.taxonomy import Taxonomy

    classes = list(Taxonomy.load().classes)
    rng = np.random.default_rng(0)
    with ShardWriter(out, "train", shard_size=1000) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
            w.write(f"s{i:04d}", buf.getvalue(), "png", i % len(classes), {"synthetic": True})
        shards = w.shards
    counts = {c: sum(1 for i in range(n) if i % len(classes) == k) for k, c in enumerate(classes)}
    write_manifest(out, {"classes": classes, "image_size": size, "counts": {"train": counts},
                         "counts_by_source": {}, "shards": {"train": shards}, "settings": {}, "taxonomy": {},
                         "synthetic": True})
    return out


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


def job_env(cluster) -> dict:
    """The cluster's env + the project's Python for train.sh (it activates HPCGAN_VENV) + 1 thread."""
    env = dict(cluster.env, OMP_NUM_THREADS="1")
    if sys.prefix != sys.base_prefix:
        env["HPCGAN_VENV"] = sys.prefix
    else:
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def submit(cluster, workdir: Path, overrides: list[str], *sbatch_opts: str, script: Path = TRAIN_SH) -> int:
    """sbatch the script from `workdir`; the job id. (Tests poll `scontrol` rather than `sbatch --wait`,
    whose polling interval grows to 32 s.)"""
    cmd = ["sbatch", "--parsable", "--cpus-per-task=2", "--time=10", *sbatch_opts, str(script), *overrides]
    r = cluster.run(*cmd, cwd=workdir, env=job_env(cluster), timeout=60, check=False)
    m = re.match(r"(\d+)", r.stdout.strip())
    assert r.returncode == 0 and m, f"sbatch failed: rc={r.returncode} {r.stdout!r} {r.stderr!r}"
    return int(m.group(1))


def job_info(cluster, job_id: int) -> dict:
    out = cluster.run("scontrol", "show", "job", "-o", str(job_id)).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_until(pred, timeout: float, what: str, interval: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_job_done(cluster, job_id: int, timeout: float = 240) -> dict:
    return wait_until(lambda: (i := job_info(cluster, job_id)).get("JobState") in TERMINAL and i,
                      timeout, f"job {job_id} to end")


def job_log(workdir: Path, job_id: int) -> str:
    paths = list(workdir.glob(f"*-{job_id}.out"))  # train.sh's --output=%x-%j.out, in the submit dir
    return paths[0].read_text(errors="replace") if paths else "<no log>"


def logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "log.csv", newline="") as f:   # (a row being written may be cut short: skip it)
        return [int(r["step"]) for r in csv.DictReader(f) if (r.get("step") or "").isdigit()]


def status(run_dir: Path) -> dict:
    p = run_dir / "status.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_sh_runs_to_completion(slurm_cluster, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    steps = 8
    job_id = submit(slurm_cluster, tmp_path, [f"shards={tiny_shards}", f"run_dir={run_dir}", f"steps={steps}",
                                             "ckpt_every=4", *TINY])
    info = wait_job_done(slurm_cluster, job_id)
    log = job_log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    assert info["JobName"] == "hpcgan-train" and info["Restarts"] == "0"
    assert status(run_dir)["state"] == "finished" and status(run_dir)["step"] == steps, log
    assert logged_steps(run_dir) == list(range(1, steps + 1))
    assert checkpoint_steps(run_dir)[-1] == steps
    # the script's own report: one worker on the CPU-only node, the torchrun it launched, the exit status
    assert re.search(rf"job {job_id} restart 0 on 1 node\(s\).*1 worker\(s\)/node, GPUs/node=0", log), log
    assert "training exited with status 0" in log and "requeueing" not in log, log


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_requeued_job_resumes_from_checkpoint(slurm_cluster, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    steps = 30
    job_id = submit(slurm_cluster, tmp_path, [f"shards={tiny_shards}", f"run_dir={run_dir}", f"steps={steps}",
                                             "ckpt_every=4", *TINY])
    first = wait_until(lambda: (run_dir / "checkpoints").is_dir() and checkpoint_steps(run_dir), 180,
                       "the first checkpoint")[0]
    slurm_cluster.run("scontrol", "requeue", str(job_id))
    info = wait_job_done(slurm_cluster, job_id)
    log = job_log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    assert int(info["Restarts"]) >= 1, info
    assert f"job {job_id} restart 1 " in log, log          # SLURM_RESTART_COUNT seen by the second run
    resumed = [int(s) for s in re.findall(r"resuming from \S+ \(step (\d+)", log)]
    assert resumed and resumed[0] >= first > 0, log
    assert resumed[0] < steps, f"the job finished before it was requeued; make it longer\n{log}"
    st = status(run_dir)
    assert st["state"] == "finished" and st["step"] == steps, (st, log)
    assert logged_steps(run_dir) == list(range(1, steps + 1)), "log.csv must hold each step once after a resume"


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_time_limit_warning_checkpoints_requeues_and_finishes(slurm_cluster, tiny_shards, tmp_path):
    """SIGUSR2 to the batch shell (what --signal=B:USR2@120 sends before the time limit): the script makes the
    workers checkpoint at the current step, requeues the job, and the second run finishes from there."""
    run_dir = tmp_path / "run"
    steps = 24
    job_id = submit(slurm_cluster, tmp_path, [f"shards={tiny_shards}", f"run_dir={run_dir}", f"steps={steps}",
                                             "ckpt_every=1000", *TINY])
    wait_until(lambda: (run_dir / "log.csv").is_file() and logged_steps(run_dir), 180, "training to start")
    slurm_cluster.run("scancel", "--batch", "--signal=USR2", str(job_id))
    info = wait_job_done(slurm_cluster, job_id)
    log = job_log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    assert info["Restarts"] == "1", info
    assert "time-limit warning (SIGUSR2)" in log and f"requeueing job {job_id}" in log, log
    stopped = re.search(r"stopped by SIGUSR2 at step (\d+)/(\d+); checkpoint written", log)
    assert stopped and 0 < int(stopped.group(1)) < steps, log
    resumed = re.search(r"resuming from \S+ \(step (\d+)", log)
    assert resumed and resumed.group(1) == stopped.group(1), log   # from the checkpoint the signal made
    st = status(run_dir)
    assert st["state"] == "finished" and st["step"] == steps, (st, log)
    assert logged_steps(run_dir) == list(range(1, steps + 1))


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("backend", [
    "auto",
    # Slurm SIGTERMs every process of the step: the webdataset backend's DataLoader workers must ignore it
    "webdataset",
])
def test_scancel_checkpoints_and_does_not_requeue(slurm_cluster, tiny_shards, tmp_path, backend):
    """scancel (SIGTERM to the batch shell and every step process, then SIGKILL after KillWait) means stop: the
    training saves at the current step and exits; the job ends CANCELLED, not requeued."""
    run_dir = tmp_path / "run"
    job_id = submit(slurm_cluster, tmp_path, [f"shards={tiny_shards}", f"run_dir={run_dir}", "steps=100000",
                                              "ckpt_every=100000", f"backend={backend}", *TINY])
    wait_until(lambda: (run_dir / "log.csv").is_file() and logged_steps(run_dir), 180, "training to start")
    slurm_cluster.run("scancel", str(job_id))
    info = wait_job_done(slurm_cluster, job_id)   # CANCELLED at once; the processes get KillWait (5 s) to save
    wait_until(lambda: status(run_dir).get("state") != "running", 30, "the training to stop")
    time.sleep(1)  # the log may trail the status file
    log = job_log(tmp_path, job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, log)
    assert "requeueing" not in log, log
    st = status(run_dir)
    assert st["state"] == "interrupted" and st["signal"] == "SIGTERM", (st, log)
    assert checkpoint_steps(run_dir) == [st["step"]] and st["step"] > 0, log


def test_train_sh_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(TRAIN_SH), "steps=1"], env=env, cwd=tmp_path, text=True, capture_output=True,
                       timeout=30)
    assert r.returncode == 2 and "submit this script with sbatch" in r.stderr


def test_scripts_parse():
    for script in (TRAIN_SH, REPO / "slurm/local/up.sh", REPO / "slurm/local/down.sh"):
        r = subprocess.run(["bash", "-n", str(script)], text=True, capture_output=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_time_limit_signal_requeues_and_resumes(slurm_cluster, tiny_shards, tmp_path):
    """The real thing: a 2-minute job with --signal=B:USR2@60, which Slurm itself delivers 30-60 s in (its
    time-limit check runs every ~30 s and signals early rather than late; a warning that lands before the
    workers have set their handlers would kill them unsaved, hence no shorter limit). The run is far too long
    to finish, so it must checkpoint and requeue; once the second run has resumed from that checkpoint the
    test cancels it (finishing after a requeue is covered by the tests above)."""
    run_dir = tmp_path / "run"
    job_id = submit(slurm_cluster, tmp_path, [f"shards={tiny_shards}", f"run_dir={run_dir}", "steps=100000",
                                             "ckpt_every=100000", *TINY], "--time=2", "--signal=B:USR2@60")
    try:
        wait_until(lambda: f"requeueing job {job_id}" in job_log(tmp_path, job_id), 180, "the time-limit requeue")
        # give the second run room to start (a requeued job keeps its time limit)
        slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")
        wait_until(lambda: "resuming from" in job_log(tmp_path, job_id), 120, "the second run to resume")
        info = job_info(slurm_cluster, job_id)
    finally:
        slurm_cluster.run("scancel", str(job_id), check=False)
    log = job_log(tmp_path, job_id)
    assert info["Restarts"] == "1", (info, log)
    assert "time-limit warning (SIGUSR2)" in log, log
    stopped = re.search(r"stopped by SIGUSR2 at step (\d+)/100000; checkpoint written", log)
    assert stopped and int(stopped.group(1)) > 0, log
    assert f"job {job_id} restart 1 " in log, log
    resumed = re.search(r"resuming from \S+ \(step (\d+)", log)
    assert resumed and resumed.group(1) == stopped.group(1), log
