"""The status table: every task's state from the study directory (works without accounting), with Slurm's view
(squeue, sacct) when it can; the summary of what a study resolved to; watch.
"""
from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from hpcgan.sweep.queue import sacct_jobs, squeue_jobs
from hpcgan.sweep.run import tail
from hpcgan.sweep.settings import ACTIVE, STAGES, STATES
from hpcgan.sweep.tasks import (
    TaskFiles,
    finished,
    holder_alive,
    latest_jobs,
    pid_alive,
    read_study,
    read_submissions,
)


@dataclass
class TaskStatus:
    name: str
    stage: str
    state: str          # one of STATES
    attempt: int = 0
    job: str | None = None
    slurm: str = ""     # squeue's or sacct's word for the job, when available
    note: str = ""
    updated: float | None = None
    log: str = ""


def collect_status(out: str | Path, doc: dict | None = None) -> list[TaskStatus]:
    """Every task's state, from the study directory, plus squeue's and sacct's view where available."""
    out = Path(out).resolve()
    doc = doc or read_study(out)
    jobs = latest_jobs(read_submissions(out))
    queue = squeue_jobs() if any(j.get("job") for j in jobs.values()) else None
    statuses = [_one_status(t, out, jobs.get(t["name"], {}), queue) for t in doc["tasks"]]
    gone = [st for st in statuses if st.state != "finished" and st.job and st.job not in (queue or {})]
    if gone:
        acct = sacct_jobs(st.job for st in gone)
        for st in gone:
            st.slurm = acct.get(st.job, st.slurm)
            if st.state == "failed" and st.slurm:
                st.note = f"{st.note} (sacct: {st.slurm})"
    return statuses


def _one_status(t: dict, out: Path, sub: dict, queue: dict | None) -> TaskStatus:
    """finished (its outputs say so) > running (a live lock holder, or Slurm runs its job) > pending / requeued
    (its job is queued; requeued once it has run) > failed (it ran and stopped unfinished, or its job left the
    queue without running it) > missing (never submitted)."""
    files = TaskFiles(out, t["name"])
    state = files.state()
    job = sub.get("job")
    st = TaskStatus(t["name"], t["stage"], "missing", int(state.get("attempt", 0)), job,
                    updated=state.get("updated"), log=str(files.log))
    q = (queue or {}).get(job) if job else None
    if q:
        st.slurm = q[0] if q[0] != "PENDING" else f"PENDING ({q[1]})"
    if finished(t):
        st.state = "finished"
        return st
    held = files.holder()
    if held and holder_alive(held, queue):
        st.state, st.note = "running", f"on {held.get('host')}"
        return st
    if q:
        if q[0] in ("RUNNING", "COMPLETING", "CONFIGURING"):
            st.state, st.note = "running", "starting"
        else:  # requeued: this very job has run before (time limit, preemption, scontrol requeue)
            st.state = "requeued" if st.attempt and state.get("job") == job else "pending"
        return st
    resubmitted = bool(sub) and (sub.get("time") or 0) > (state.get("updated") or 0)
    if resubmitted and sub.get("executor") == "local" and sub.get("host") == socket.gethostname() \
            and pid_alive(int(sub.get("pid") or 0)):
        st.state = "pending"   # a local launch that has not reached it yet
    elif resubmitted:
        st.state, st.note = "failed", ("never ran: its job left the queue" if job else "never ran: its launch ended")
    elif state.get("state") == "failed":
        st.state, st.note = "failed", state.get("error") or ""
    elif state.get("state") in ("running", "requeued"):
        st.state, st.note = "failed", f"stopped without finishing (was {state['state']})"
    elif state:
        st.note = "outputs incomplete or removed"
    else:
        st.note = "not submitted yet"
    return st


def summary_table(statuses: list[TaskStatus]) -> str:
    """Tasks per stage and state."""
    stages = [s for s in STAGES if any(st.stage == s for st in statuses)]
    counts = {(st.stage, st.state): 0 for st in statuses}
    for st in statuses:
        counts[(st.stage, st.state)] += 1
    head = f"{'stage':<10}" + "".join(f"{s:>10}" for s in STATES) + f"{'total':>8}"
    lines = [head]
    for stage in stages:
        row = [counts.get((stage, s), 0) for s in STATES]
        lines.append(f"{stage:<10}" + "".join(f"{n or '.':>10}" for n in row) + f"{sum(row):>8}")
    return "\n".join(lines)


def status_table(statuses: list[TaskStatus], only: Iterable[str] | None = None) -> str:
    rows = [st for st in statuses if only is None or st.state in only]
    if not rows:
        return ""
    width = max(len(st.name) for st in rows) + 2
    now = time.time()
    lines = [f"{'task':<{width}}{'state':<10}{'try':>4}  {'job':<12}{'slurm':<24}{'age':>7}  note"]
    for st in rows:
        age = _age(now - st.updated) if st.updated else "-"
        lines.append(f"{st.name:<{width}}{st.state:<10}{st.attempt or '-':>4}  {st.job or '-':<12}"
                     f"{(st.slurm or '-')[:23]:<24}{age:>7}  {st.note}")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:.0f}s"


def failure_tails(out: Path, statuses: list[TaskStatus], n_tasks: int = 10, n_lines: int = 12) -> str:
    """The last lines of the failed tasks' logs (the command's, else submitit's)."""
    failed = [st for st in statuses if st.state == "failed"]
    parts = []
    for st in failed[:n_tasks]:
        log = Path(st.log)
        text = tail(log, n_lines)
        if not text and st.job:
            log, text = _submitit_log(out, st.job, n_lines)
        if text:
            parts.append(f"--- {st.name}: {log}\n{text}")
    if len(failed) > n_tasks:
        parts.append(f"... and {len(failed) - n_tasks} more failed tasks (logs in {out / 'tasks'})")
    return "\n".join(parts)


def _submitit_log(out: Path, job: str, n: int) -> tuple[Path, str]:
    from submitit.core.utils import JobPaths
    paths = JobPaths(out / "submitit" / "%j", job_id=job, task_id=0)
    for p in (paths.stderr, paths.stdout):
        if p.is_file():
            return p, tail(p, n)
    return paths.stderr, ""


def study_summary(settings: dict) -> str:
    """What the study resolved to, in a few lines: the data (shards or sources, the cut), models, regimes, seeds."""
    d, g, gen, c = settings["data"], settings["gan"], settings["generate"], settings["classify"]
    data = (f"shards {d['shards']}" if d.get("shards") else
            f"sources {d['sources']}" if d.get("sources") else f"the embedded simulator (scale {d['simulate_scale']})")
    lines = [f"  data      {data}; cut (data.scarce): {d.get('scarce') or 'none'}",
             f"  gan       models {g['models']}, seeds {g['seeds']}, sizes {g['sizes']}, steps {g['steps']}",
             f"  generate  {gen['models'] or 'none'}"]
    if c["enabled"]:
        lines.append(f"  classify  archs {c['archs']}, regimes {c['regimes']}, seeds {c['seeds']}")
        if c.get("rival_search") is not None:
            lines.append(f"  rival     search {c['rival_search'] or 'every recipe'} on val; full {c.get('full')}, "
                         f"on the rival {c.get('on_rival') or 'none'}, with more real cells "
                         f"{c.get('more_real') or 'none'}")
    return "\n".join(lines)


def status_report(out: str | Path, all_rows: bool = True) -> tuple[str, list[TaskStatus]]:
    out = Path(out).resolve()
    doc = read_study(out)
    statuses = collect_status(out, doc)
    done = sum(st.state == "finished" for st in statuses)
    parts = [f"study {doc['name']} in {out}: {done}/{len(statuses)} tasks finished\n" + study_summary(doc["settings"]),
             status_table(statuses, None if all_rows else ("running", "requeued", "pending", "failed", "missing")),
             summary_table(statuses)]
    tails = failure_tails(out, statuses)
    if tails:
        parts += ["failed tasks (last log lines):", tails]
    return "\n\n".join(p for p in parts if p), statuses


def watch(out: str | Path, interval: float = 10.0, write: Callable[[str], None] = print) -> list[TaskStatus]:
    """Redraw the status every `interval` seconds, with a progress bar, until no task is pending, running or
    requeued; returns the last statuses."""
    from tqdm import tqdm
    tty = sys.stdout.isatty()
    bar = None
    try:
        while True:
            text, statuses = status_report(out, all_rows=False)
            if tty:
                write("\033[2J\033[H" + text)
            else:
                write(text)
            done = sum(st.state == "finished" for st in statuses)
            if bar is None:
                bar = tqdm(total=len(statuses), desc="study", unit="task", dynamic_ncols=True, disable=not tty)
            bar.n = done
            bar.set_postfix({s: sum(st.state == s for st in statuses) for s in ("running", "pending", "failed")},
                            refresh=True)
            if not any(st.state in ACTIVE for st in statuses):
                return statuses
            time.sleep(interval)
    finally:
        if bar is not None:
            bar.close()
