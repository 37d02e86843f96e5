"""Accounting on the test cluster (slurm/local/up.sh: slurmdbd + a private MariaDB) and EnforcePartLimits.

Without accounting `sacct` does not work, and submitit, which reads job states from sacct, waits forever in
`job.result()` for a job that was cancelled or crashed (it never writes its result file). With it: sacct knows
finished, failed and cancelled jobs, and submitit raises UncompletedJobError within seconds. With
EnforcePartLimits=ALL a request the partition cannot meet fails at `sbatch` instead of pending forever.
A cluster that is not the project's own (SLURM_CONF pointing elsewhere) and has no accounting is skipped.
"""
from __future__ import annotations

import os
import threading
import time

import pytest
from test_slurm import wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def slurm_config(cluster) -> dict:
    out = cluster.run("scontrol", "show", "config").stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in out.splitlines()) if v}


@pytest.fixture(scope="module")
def acct_cluster(slurm_cluster):
    """The session's cluster; skipped when it is someone else's and has no accounting (ours must have it)."""
    cfg = slurm_config(slurm_cluster)
    if cfg.get("AccountingStorageType") == "accounting_storage/none" and cfg.get("ClusterName") != "hpcgan":
        pytest.skip(f"cluster {cfg.get('ClusterName')!r} (not slurm/local/up.sh's) has no accounting")
    return slurm_cluster


def sbatch(cluster, tmp_path, wrap: str) -> str:
    r = cluster.run("sbatch", "--parsable", "--cpus-per-task=1", "--time=5", f"--output={tmp_path}/%j.out",
                    "--wrap", wrap, cwd=tmp_path)
    return r.stdout.strip().split(";")[0]


def sacct_row(cluster, job_id: str) -> dict:
    """The job's allocation row in sacct ({} while slurmctld has not reported it yet)."""
    r = cluster.run("sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State,ExitCode", check=False)
    assert r.returncode == 0, f"sacct failed (no accounting on this cluster?): {r.stderr.strip()}"
    out = r.stdout
    rows = [dict(zip(("JobID", "State", "ExitCode"), line.split("|"))) for line in out.splitlines()]
    return next((row for row in rows if row["JobID"] == job_id), {})


def wait_sacct_state(cluster, job_id: str, state: str, timeout: float = 60) -> dict:
    return wait_until(lambda: (row := sacct_row(cluster, job_id)).get("State", "").startswith(state) and row,
                      timeout, f"sacct to report job {job_id} {state}")


def wait_running(cluster, job_id: str) -> None:
    wait_until(lambda: cluster.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip() == "RUNNING", 60,
               f"job {job_id} to start")


@pytest.mark.timeout(180)
def test_sacct_reports_completed_failed_and_cancelled_jobs(acct_cluster, tmp_path):
    done = sbatch(acct_cluster, tmp_path, "true")
    failed = sbatch(acct_cluster, tmp_path, "exit 3")
    cancelled = sbatch(acct_cluster, tmp_path, "sleep 300")
    wait_running(acct_cluster, cancelled)
    acct_cluster.run("scancel", cancelled)
    assert wait_sacct_state(acct_cluster, done, "COMPLETED")["ExitCode"] == "0:0"
    assert wait_sacct_state(acct_cluster, failed, "FAILED")["ExitCode"] == "3:0"
    wait_sacct_state(acct_cluster, cancelled, "CANCELLED")


def call_within(seconds: float, fn):
    """fn() in a daemon thread: (value, exception); fails the test, instead of hanging it, after `seconds`."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__qualname__', fn)} still waiting after {seconds:.0f} s"
    return box.get("value"), box.get("error")


@pytest.fixture
def executor(acct_cluster, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    if acct_cluster.conf:  # submitit runs sbatch/sacct with this process's environment
        monkeypatch.setenv("SLURM_CONF", acct_cluster.conf)
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1)
    return ex


@pytest.mark.timeout(120)
def test_submitit_result_and_state(executor, acct_cluster):
    job = executor.submit(max, 2, 3)
    assert call_within(60, job.result) == (3, None)
    wait_until(lambda: job.state == "COMPLETED", 30, f"submitit to see job {job.job_id} COMPLETED")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("end", ["scancel", "crash"])
def test_submitit_sees_a_job_that_ends_without_a_result(executor, acct_cluster, end):
    """scancel, or a process that dies without writing its result (os._exit): job.result() raises
    UncompletedJobError naming the state sacct reports, instead of waiting forever."""
    from submitit.core.utils import UncompletedJobError

    if end == "scancel":
        job = executor.submit(time.sleep, 300)
        wait_running(acct_cluster, job.job_id)
        acct_cluster.run("scancel", job.job_id)
        state = "CANCELLED"
    else:
        job = executor.submit(os._exit, 3)
        state = "FAILED"
    start = time.monotonic()
    _, error = call_within(90, job.result)
    assert isinstance(error, UncompletedJobError) and f"(state: {state}" in str(error), error
    assert time.monotonic() - start < 90
    assert job.state.startswith(state), job.state


@pytest.mark.timeout(60)
def test_request_beyond_the_partition_fails_at_submission(acct_cluster, tmp_path):
    cfg = slurm_config(acct_cluster)
    if cfg.get("EnforcePartLimits") not in ("ALL", "ANY") and cfg.get("ClusterName") != "hpcgan":
        pytest.skip(f"cluster {cfg.get('ClusterName')!r} does not enforce partition limits at submission")
    cpus = max(int(c) for c in acct_cluster.run("sinfo", "-h", "-N", "-o", "%c").stdout.split())
    r = acct_cluster.run("sbatch", "--parsable", f"--cpus-per-task={cpus + 1}", "--job-name=too-big",
                         f"--output={tmp_path}/%j.out", "--wrap", "true", cwd=tmp_path, check=False)
    # (this cluster's one node: "More processors requested than permitted"; other layouts word it otherwise)
    assert r.returncode != 0 and "Batch job submission failed" in r.stderr, (r.stdout, r.stderr)
    assert acct_cluster.run("squeue", "-h", "-n", "too-big").stdout.strip() == ""
