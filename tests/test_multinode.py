"""The cross-node path on one machine.

0. slurm/train.sh on a real two-node Slurm: two slurmd ("n1", "n2") on this machine, started by
   slurm/local/up.sh with SLURM_NODES=2 beside the main test cluster (own SLURM_BASE and ports); the job is
   interrupted by the time-limit warning, requeues itself and finishes on both nodes.
1. Two torchrun agents, started as two processes exactly as slurm/train.sh starts one per node
   (--nnodes=2, c10d rendezvous on the "first node", 127.0.0.1 here), train one run together.
2. Slurm tasks as ranks, no torchrun: `srun --ntasks=2 python -m hpcgan.train` inside an sbatch job
   (hpcgan.dist reads SLURM_PROCID/SLURM_NTASKS; the job script exports MASTER_ADDR/MASTER_PORT).
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_slurm import TINY, job_log, logged_steps, status, submit, wait_job_done, wait_until, write_tiny_shards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TWO_NODE_BASE = "/tmp/hpcgan-slurm-2n"
TWO_NODE_PORT = "6837"   # main test cluster: 6817-6818


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def two_node_slurm(slurm_cluster):
    """A second, two-node cluster (needs root; slurm_cluster already installed the packages and munge)."""
    from conftest import SlurmCluster

    env = dict(os.environ, SLURM_BASE=TWO_NODE_BASE, SLURM_NODES="2", SLURM_PORT=TWO_NODE_PORT,
               SLURM_NODE_CPUS="2")
    env.pop("SLURM_CONF", None)
    if os.geteuid() != 0:
        pytest.skip("a two-node test cluster needs root (slurm/local/up.sh)")
    r = subprocess.run(["bash", str(REPO / "slurm/local/up.sh")], env=env, text=True, capture_output=True,
                       timeout=300)
    if r.returncode != 0:
        pytest.skip(f"two-node slurm/local/up.sh failed: {(r.stdout + r.stderr)[-600:]}")
    env["SLURM_CONF"] = f"{TWO_NODE_BASE}/etc/slurm.conf"
    yield SlurmCluster(env=env, conf=env["SLURM_CONF"], started=True)
    subprocess.run(["bash", str(REPO / "slurm/local/down.sh")], env=dict(env, STOP_MUNGE="0"),
                   capture_output=True, timeout=120)


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_time_limit_warning_on_two_nodes(two_node_slurm, tiny_shards, tmp_path):
    """slurm/train.sh on two Slurm nodes: c10d rendezvous at n1's address, one rank per node. The time-limit
    warning reaches the torchrun agents on both nodes (via srun), both ranks stop at the same step, the job
    requeues itself and the two-node rerun resumes from that step and finishes."""
    run_dir = tmp_path / "run"
    steps = 24
    job_id = submit(two_node_slurm, tmp_path, [f"shards={tiny_shards}", f"run_dir={run_dir}", f"steps={steps}",
                                               "ckpt_every=1000", *TINY], "--nodes=2", "--cpus-per-task=1")
    wait_until(lambda: (run_dir / "log.csv").is_file() and logged_steps(run_dir), 180, "training to start")
    two_node_slurm.run("scancel", "--batch", "--signal=USR2", str(job_id))
    info = wait_job_done(two_node_slurm, job_id)
    log = job_log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (info, log)
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]", info
    assert re.search(rf"job {job_id} restart 0 on 2 node\(s\) \[n\[1-2\]\]: 1 worker\(s\)/node", log), log
    assert "rendezvous: c10d at 127.0.0.1:" in log, log   # NodeAddr of n1
    assert "rank 0/2 on cpu (gloo)" in log, log
    stopped = re.search(r"stopped by SIGUSR2 at step (\d+)/", log)
    assert stopped and 0 < int(stopped.group(1)) < steps, log
    assert f"requeueing job {job_id}" in log and f"job {job_id} restart 1 on 2 node(s)" in log, log
    resumed = re.search(r"resuming from \S+ \(step (\d+)", log)
    assert resumed and resumed.group(1) == stopped.group(1), log
    st = status(run_dir)
    assert st["state"] == "finished" and st["step"] == steps and st["world_size"] == 2, (st, log)
    assert logged_steps(run_dir) == list(range(1, steps + 1))


@pytest.mark.timeout(240)
def test_two_torchrun_agents_train_one_run(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    steps = 6
    port = free_port()
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agents, logs = [], []
    for node_rank in range(2):
        log = open(tmp_path / f"node{node_rank}.log", "w")
        logs.append(log)
        agents.append(subprocess.Popen(
            [str(torchrun), "--nnodes=2", "--nproc_per_node=1", "--max_restarts=0",  # (c10d ignores --node_rank)
             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=hpcgan-test",
             "-m", "hpcgan.train", f"shards={tiny_shards}", f"run_dir={run_dir}", f"steps={steps}", "ckpt_every=3",
             *TINY],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
    try:
        codes = [a.wait(timeout=200) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
        for log in logs:
            log.close()
    out = "\n".join((tmp_path / f"node{i}.log").read_text(errors="replace") for i in range(2))
    assert codes == [0, 0], out
    st = status(run_dir)
    assert st["state"] == "finished" and st["step"] == steps and st["world_size"] == 2, (st, out)
    assert "world_size: 2" in (run_dir / "config.yaml").read_text()
    assert logged_steps(run_dir) == list(range(1, steps + 1))
    assert "rank 0/2 on cpu (gloo)" in out, out


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_srun_tasks_as_ranks(slurm_cluster, tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    steps = 6
    train = [sys.executable, "-m", "hpcgan.train", f"shards={tiny_shards}", f"run_dir={run_dir}", f"steps={steps}",
             "ckpt_every=3", *TINY]
    script = tmp_path / "ranks.sh"
    script.write_text("#!/bin/bash\n"
                      "export MASTER_ADDR=127.0.0.1 MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n"
                      f"srun --ntasks=2 --cpus-per-task=1 {shlex.join(train)}\n")
    job_id = submit(slurm_cluster, tmp_path, [], "--ntasks=2", "--cpus-per-task=1", f"--output={tmp_path}/job-%j.out",
                    script=script)
    info = wait_job_done(slurm_cluster, job_id)
    out = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("job-*.out"))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["NumTasks"] == "2", (info, out)
    st = status(run_dir)
    assert st["state"] == "finished" and st["step"] == steps and st["world_size"] == 2, (st, out)
    assert "rank 0/2 on cpu (gloo)" in out, out
