"""Launch: write study.json, then submit (Slurm) or run here, in order (local), every task that is neither
finished nor under way.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from hpcgan.rundir import read_json
from hpcgan.settings import check_choice
from hpcgan.sweep.expand import expand, shard_dir
from hpcgan.sweep.run import run_task
from hpcgan.sweep.settings import (
    ACTIVE,
    EXECUTORS,
    StudySettings,
    SweepError,
    TaskError,
)
from hpcgan.sweep.slurm import submit_slurm
from hpcgan.sweep.status import collect_status, study_summary
from hpcgan.sweep.tasks import LaunchResult, TaskFiles, record_submission, write_study


@contextlib.contextmanager
def launch_lock(out: Path):
    """One launch of a study at a time (flock on out/.launch.lock; released when the process ends)."""
    import fcntl
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".launch.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise SweepError(f"another launch of {out} is in progress ({f.read().strip() or 'unknown process'}); "
                             f"follow it with: python tools/sweep.py status out={out} --watch") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_executor(executor: str) -> str:
    check_choice("executor", executor, EXECUTORS)
    if executor == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if executor == "slurm" and not shutil.which("sbatch"):
        raise SweepError("executor=slurm: no sbatch on PATH (not on a Slurm login node?); run the study here "
                         "with executor=local")
    return executor


def check_inputs(s: StudySettings) -> None:
    """Given shards and sources must exist (and shards be at the size asked) before anything is launched."""
    d = s.data
    if d.shards:
        for size in s.gan.sizes:
            path = Path(shard_dir(d.shards, size))
            manifest = read_json(path / "manifest.json")
            if not manifest:
                raise SweepError(f"data.shards: {path} is not a shard set (no manifest.json); write one with "
                                 f"tools/shard.py ... out={path} size={size}")
            if int(manifest.get("image_size", -1)) != size:
                raise SweepError(f"data.shards: {path} holds {manifest.get('image_size')} px images but gan.sizes "
                                 f"asks for {size}; put {{size}} in the path (e.g. shards/real{{size}})")
    for layout, path in (d.sources or {}).items():
        if not Path(path).is_dir():
            raise SweepError(f"data.sources.{layout}: {path} is not a folder")


def launch(s: StudySettings, out: str | Path, executor: str = "auto", study: str = "", overrides=(),
           write: Callable[[str], None] = print) -> LaunchResult:
    """Write study.json, then submit (slurm) or run (local) every task that is neither finished nor active."""
    out = Path(out).resolve()
    executor = resolve_executor(executor)
    check_inputs(s)
    tasks = expand(s, out)
    with launch_lock(out):
        doc = write_study(out, s, tasks, study or s.name, list(overrides), executor)
        write(f"study {doc['name']} ({len(tasks)} tasks) in {out}:\n" + study_summary(doc["settings"]))
        statuses = {st.name: st for st in collect_status(out, doc)}
        todo = [t for t in doc["tasks"] if statuses[t["name"]].state in ("failed", "missing")]
        result = LaunchResult(executor)
        for st in statuses.values():
            if st.state not in ("failed", "missing"):
                result.skipped[st.state] = result.skipped.get(st.state, 0) + 1
        if result.skipped:
            write("left alone: " + ", ".join(f"{n} {state}" for state, n in result.skipped.items()))
        if not todo:
            write("nothing to do: every task is finished or under way")
            return result
        if executor == "slurm":
            active = {n: st.job for n, st in statuses.items() if st.state in ACTIVE and st.job}
            submit_slurm(out, doc, todo, active, s, result, write)
        else:
            run_local(out, doc, todo, result, write)
    return result


def run_local(out: Path, doc: dict, todo: list[dict], result: LaunchResult, write: Callable[[str], None]) -> None:
    """The tasks here, one after another in stage order; a task whose upstream failed is not run."""
    from tqdm import tqdm
    record_submission(out, {"executor": "local", "stage": None, "job_id": None, "tasks": [t["name"] for t in todo],
                            "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
    failed: set[str] = set()
    bar = tqdm(total=len(todo), desc=f"study {doc['name']}", unit="task", dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    try:
        for t in todo:
            bar.set_postfix_str(t["name"])
            blocked = [d for d in t["deps"] if d in failed]
            if blocked:
                TaskFiles(out, t["name"]).update(state="failed", error=f"upstream failed: {', '.join(blocked)}",
                                                 ended=time.time(), job=None)
                failed.add(t["name"])
                write(f"skipped {t['name']}: upstream failed ({', '.join(blocked)})")
            else:
                t0 = time.time()
                try:
                    run_task(out, t["name"])
                    write(f"finished {t['name']} ({time.time() - t0:.0f} s)")
                except TaskError as e:
                    failed.add(t["name"])
                    write(f"FAILED {str(e).splitlines()[0]}")
            bar.update(1)
    finally:
        bar.close()
    for t in todo:
        result.submitted.setdefault(t["stage"], [])
    result.failed = sorted(failed)
