"""Slurm's view of the jobs: squeue and sacct (and scontrol through slurm_cmd), each answering None or {} when
Slurm is not there or does not answer in time, so the study directory's own files stay the source of truth.
"""
from __future__ import annotations

import getpass
import re
import shutil
import subprocess
from typing import Iterable


def slurm_cmd(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def squeue_jobs(jobs: list[str] | None = None) -> dict[str, tuple[str, str]] | None:
    """{job id (ARRAY_INDEX for array tasks): (state, reason)} of this user's queued and running jobs (or of
    `jobs`); None when squeue is not available."""
    cmd = ["squeue", "-h", "-r", "-o", "%i|%T|%r"]
    cmd += ["-j", ",".join(jobs)] if jobs else ["-u", getpass.getuser()]
    r = slurm_cmd(cmd)
    if r is None:
        return None
    if r.returncode != 0:
        return {} if jobs and "Invalid job id" in r.stderr else None
    queue = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            queue[parts[0]] = (parts[1], parts[2])
    return queue


def sacct_jobs(array_ids: Iterable[str]) -> dict[str, str]:
    """{job id: "STATE exit" } from Slurm accounting for these jobs (all tasks of arrays); {} without sacct."""
    ids = sorted({str(j).split("_")[0] for j in array_ids if j})
    found: dict[str, str] = {}
    for start in range(0, len(ids), 200):
        r = slurm_cmd(["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(ids[start:start + 200])])
        if r is None or r.returncode != 0:
            return found
        for line in r.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 3:
                state = f"{parts[1]} {parts[2]}" if parts[2] not in ("", "0:0") else parts[1]
                found.update(dict.fromkeys(_expand_array_ids(parts[0]), state))
    return found


def _expand_array_ids(job: str) -> list[str]:
    """sacct's "22_[0-3,5%2]" (array tasks that never started) -> 22_0 ... 22_3, 22_5; other ids as they are."""
    m = re.fullmatch(r"(\d+)_\[([\d,-]+)(?:%\d+)?\]", job)
    if not m:
        return [job]
    ids = []
    for part in m[2].split(","):
        lo, _, hi = part.partition("-")
        ids += [f"{m[1]}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids
