"""The study directory's files: study.json, submissions.jsonl, tasks/<name>/state.json and the lock a running task
holds; finished() reads whether a task is done from its own outputs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpcgan import REPO_ROOT
from hpcgan.jsonfile import dumps
from hpcgan.rundir import read_json, read_status, write_json
from hpcgan.sweep.expand import Task
from hpcgan.sweep.queue import squeue_jobs
from hpcgan.sweep.settings import (
    FORMAT,
    STAGES,
    STUDY_FILE,
    SUBMISSIONS,
    StudySettings,
    SweepError,
    TaskError,
)

logger = logging.getLogger("hpcgan.sweep")


def finished(task: Task | dict) -> bool:
    """Whether a task's outputs are complete, from the files alone (its stage's own markers):
    file       out/<file> exists (simulator summary, shard manifest: both written atomically, last)
    run        status.json says finished (train, classify) and, with results, a results.jsonl exists below out
    synthetic  the synthetic set's manifest names the GAN run's final checkpoint
    eval       run/eval/step-<final step>-<features>.json exists and results.jsonl was appended after it
    """
    t = task if isinstance(task, dict) else asdict(task)
    c, out = t["check"], Path(t["out"])
    kind = c.get("kind")
    if kind == "file":
        return (out / c["file"]).is_file()
    if kind == "run":
        return read_status(out).get("state") == "finished" and (not c.get("results") or _has_results(out))
    if kind == "synthetic":
        st, manifest = read_status(c["run"]), read_json(out / "manifest.json") or {}
        ckpt = manifest.get("checkpoint") or {}
        return (st.get("state") == "finished" and ckpt.get("step") == st.get("step")
                and Path(ckpt.get("path", "/")).resolve().parent.parent == Path(c["run"]).resolve())
    if kind == "eval":
        st = read_status(c["run"])
        if st.get("state") != "finished":
            return False
        doc, rows = out / f"step-{int(st['step']):08d}-{c['features']}.json", out / "results.jsonl"
        return doc.is_file() and rows.is_file() and rows.stat().st_mtime >= doc.stat().st_mtime
    raise ValueError(f"task {t['name']}: unknown check {c!r}")


def _has_results(out: Path) -> bool:
    return any(p.stat().st_size > 0 for p in out.rglob("results.jsonl"))


def read_study(out: str | Path) -> dict:
    doc = read_json(Path(out) / STUDY_FILE)
    if not doc:
        raise SweepError(f"{out}: no {STUDY_FILE}; launch the study first (python tools/sweep.py study=NAME out={out})")
    doc["by_name"] = {t["name"]: t for t in doc["tasks"]}
    return doc


def write_study(out: Path, s: StudySettings, tasks: list[Task], study: str, overrides: list[str],
                executor: str) -> dict:
    old = read_json(out / STUDY_FILE) or {}
    before = {t["name"]: t["argv"] for t in old.get("tasks", [])}
    changed = [t.name for t in tasks if t.name in before and before[t.name] != t.argv]
    if changed:
        logger.warning("%d task(s) have a different command than at the last launch (e.g. %s); finished ones "
                       "are not rerun: delete a run directory to redo it", len(changed), changed[0])
    doc = {"format": FORMAT, "study": study, "overrides": list(overrides), "name": s.name, "executor": executor,
           "created": old.get("created", time.time()), "updated": time.time(), "repo": str(REPO_ROOT),
           "settings": asdict(s), "stages": list(STAGES), "tasks": [asdict(t) for t in tasks]}
    for t in doc["tasks"]:
        t["command"] = shlex.join(["python", *t["argv"]])
    write_json(out / STUDY_FILE, doc)
    return read_study(out)


def record_submission(out: Path, row: dict) -> None:
    """Append one row to submissions.jsonl in one write (O_APPEND: concurrent writers do not interleave)."""
    data = (dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(Path(out) / SUBMISSIONS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_submissions(out: Path) -> list[dict]:
    path = Path(out) / SUBMISSIONS
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def latest_jobs(submissions: list[dict]) -> dict[str, dict]:
    """{task: {"job": its Slurm job id (ARRAY_INDEX for an array) or None, "executor", "host", "pid"}} of
    the newest submission that holds each task."""
    latest = {}
    for row in submissions:
        for i, name in enumerate(row["tasks"]):
            job = None
            if row.get("job_id"):
                job = f"{row['job_id']}_{i}" if row.get("array") else str(row["job_id"])
            latest[name] = {"job": job, "executor": row.get("executor"), "host": row.get("host"),
                            "pid": row.get("pid"), "time": row.get("time")}
    return latest


class TaskFiles:
    """tasks/<name>/: state.json, lock, output.log."""

    def __init__(self, study_dir: str | Path, name: str):
        self.name, self.dir = name, Path(study_dir) / "tasks" / name
        self.state_path, self.lock_path, self.log = self.dir / "state.json", self.dir / "lock", self.dir / "output.log"

    def state(self) -> dict:
        return read_json(self.state_path, {}) or {}

    def update(self, **fields) -> dict:
        state = {**self.state(), **fields, "updated": time.time()}
        write_json(self.state_path, state)
        return state

    def holder(self) -> dict | None:
        return read_json(self.lock_path) if self.lock_path.exists() else None

    @contextlib.contextmanager
    def locked(self, owner: dict):
        """Hold the lock for the block. A lock held by a live other process or job raises TaskError; one
        left by a process or job that is gone (or by this very job, requeued) is taken over."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                held = self.holder()
                if held is None:  # being written this instant, or unreadable: look again
                    time.sleep(0.2)
                    if self.holder() is None and self.lock_path.exists():
                        _take_over(self.lock_path)
                    continue
                same_job = owner.get("job") and held.get("job") == owner.get("job")
                if not same_job and holder_alive(held):
                    raise TaskError(f"{self.name}: already running ({describe_holder(held)}); not starting it "
                                    f"twice. If that is wrong, delete {self.lock_path}")
                logger.info("taking over the lock of %s (%s is gone)", self.dir, describe_holder(held))
                _take_over(self.lock_path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            break
        else:
            raise TaskError(f"could not take {self.lock_path}: delete it if no task is running")
        try:
            yield
        finally:
            if (self.holder() or {}).get("token") == owner.get("token"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lock_path)


def _take_over(lock: Path) -> None:
    """Move a dead holder's lock aside (one rename: of two runners taking over, one wins), then delete it."""
    stale = lock.with_name(f".lock.stale-{socket.gethostname()}-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(lock, stale)
        os.unlink(stale)


def describe_holder(held: dict) -> str:
    who = f"job {held['job']}" if held.get("job") else "a local run"
    return f"{who}, pid {held.get('pid')} on {held.get('host')}"


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def holder_alive(held: dict, queue: dict | None = None) -> bool:
    """Whether the process holding a task's lock is still running: its Slurm job is running (squeue), or,
    without a job, its process on this host is. A lock from another host without a job cannot be checked:
    taken as alive."""
    job = held.get("job")
    if job and shutil.which("squeue"):
        state = (queue if queue is not None else squeue_jobs([job]) or {}).get(job, ("", ""))[0]
        return state in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING",
                         "STAGE_OUT")
    if held.get("host") == socket.gethostname():
        return pid_alive(int(held.get("pid", 0)))
    return True


def job_id() -> str | None:
    """This process's Slurm job id as squeue shows it (ARRAY_INDEX for an array task), or None."""
    a, i = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if a and i:
        return f"{a}_{i}"
    return os.environ.get("SLURM_JOB_ID") or None


@dataclass
class LaunchResult:
    executor: str
    submitted: dict[str, list[str]] = field(default_factory=dict)   # stage -> its job ids (slurm; local: [])
    skipped: dict[str, int] = field(default_factory=dict)      # state -> how many were left alone
    failed: list[str] = field(default_factory=list)            # local: tasks that did not finish
