"""Running one task: its command (torchrun for several ranks, over nodes), the task lock, signals and requeue;
TaskRunner is what a Slurm array task runs (a submitit Checkpointable).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hpcgan import REPO_ROOT
from hpcgan.rundir import EXIT_SIGNAL
from hpcgan.sweep.queue import slurm_cmd
from hpcgan.sweep.settings import STUDY_FILE, TaskError
from hpcgan.sweep.tasks import TaskFiles, finished, job_id, pid_alive, read_study

logger = logging.getLogger("hpcgan.sweep")


def _node_rank() -> int:
    """Which node of a multi-node task this is (submitit starts one task per node)."""
    return int(os.environ.get("SLURM_PROCID", "0")) if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" else 0


def command(task: dict, python: str | None = None) -> list[str]:
    """The full command of a task on this node: the entry point itself, or torchrun around it for several
    ranks (standalone on one node; c10d rendezvous on the job's first node for several)."""
    python = python or sys.executable
    r = task["resources"]
    ranks, nodes = int(r.get("ranks") or 1), int(r.get("nodes") or 1)
    if ranks <= 1 and nodes <= 1:
        return [python, *task["argv"]]
    run = [python, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--max_restarts=0",
           *_torchrun_signal_option()]
    if nodes > 1:
        jid = int(os.environ.get("SLURM_JOB_ID", "0"))
        run += [f"--nnodes={nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={_first_node()}:{20000 + jid % 20000}",
                f"--rdzv_id={jid}"]
    else:
        run += ["--standalone", "--nnodes=1"]
    return run + task["argv"]


def _torchrun_signal_option() -> list[str]:
    """torchrun passes on only the signals it handles: add USR2 (the time-limit warning) where this torch has
    the option (as slurm/train.sh does)."""
    import importlib.util
    spec = importlib.util.find_spec("torch")
    run_py = Path(spec.submodule_search_locations[0]) / "distributed" / "run.py" if spec else None
    if run_py and run_py.is_file() and "signals_to_handle" in run_py.read_text():
        return ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"]
    return []


def _first_node() -> str:
    """The address of the job's first node, as Slurm itself reaches it (its NodeAddr; slurm/train.sh does the
    same): the rendezvous host of a multi-node task."""
    nodes = os.environ.get("SLURM_JOB_NODELIST", "")
    r = slurm_cmd(["scontrol", "show", "hostnames", nodes]) if nodes else None
    if r is None or r.returncode != 0 or not r.stdout.split():
        return socket.gethostname()
    first = r.stdout.split()[0]
    info = slurm_cmd(["scontrol", "show", "node", first])
    m = re.search(r"NodeAddr=(\S+)", info.stdout) if info is not None and info.returncode == 0 else None
    return m[1] if m else first


def _threads(task: dict) -> int:
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or min(task["resources"].get("cpus") or 1, os.cpu_count() or 1))
    return max(1, cpus // int(task["resources"].get("ranks") or 1))


def run_task(study_dir: str | Path, name: str, runner: "TaskRunner | None" = None) -> dict:
    """Run one task of a study here: skip it when finished, refuse when an upstream task is not finished or the
    run directory is busy, else run its command (output to tasks/<name>/output.log) holding its lock, and record
    the outcome in tasks/<name>/state.json. Returns the state; raises TaskError when the task did not finish."""
    study_dir = Path(study_dir).resolve()
    doc = read_study(study_dir)
    task = doc["by_name"].get(name)
    if task is None:
        raise TaskError(f"{study_dir}: no task {name!r} in {STUDY_FILE}")
    if _node_rank() != 0:  # another node of a multi-node task: its share of the ranks, no bookkeeping
        if finished(task):
            return {"state": "finished"}
        rc = _run_command(task, None, runner, study_dir)
        if rc != 0:
            raise TaskError(f"{name}: node {_node_rank()} exited with {rc}")
        return {"state": "finished"}
    files = TaskFiles(study_dir, name)
    if finished(task):
        return files.update(state="finished", note="already finished")
    missing = [d for d in task["deps"] if not finished(doc["by_name"][d])]
    if missing:
        files.update(state="failed", error=f"upstream not finished: {', '.join(missing)}", ended=time.time(),
                     job=job_id())
        raise TaskError(f"{name}: needs {', '.join(missing)}, which did not finish (python tools/sweep.py status "
                        f"out={study_dir})")
    owner = {"job": job_id(), "host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex(),
             "time": time.time()}
    with files.locked(owner):
        attempt = int(files.state().get("attempt", 0)) + 1
        files.update(state="running", attempt=attempt, job=owner["job"], host=owner["host"], pid=owner["pid"],
                     started=time.time(), ended=None, rc=None, error=None, note=None)
        try:
            rc = _run_command(task, files, runner, study_dir)
        except KeyboardInterrupt:
            files.update(state="failed", error="interrupted (Ctrl-C)", ended=time.time())
            raise
        ok = finished(task)
        state = files.update(state="finished" if ok else "failed", rc=rc, ended=time.time(),
                             error=None if ok else _failure(rc, files.log))
    if not ok:
        raise TaskError(f"{name}: {state['error']}; log: {files.log}\n{tail(files.log, 15)}")
    return state


def _failure(rc: int, log: Path) -> str:
    if rc == 0:
        return "the command exited 0 but its outputs are not complete"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc == EXIT_SIGNAL:
        return "stopped by a signal after a checkpoint (exit 3); relaunch to resume"
    return f"exit code {rc}"


def _run_command(task: dict, files: TaskFiles | None, runner, study_dir: Path) -> int:
    cmd = command(task)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(_threads(task)))
    log = files.log if files else Path(study_dir) / "tasks" / task["name"] / f"output-node{_node_rank()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n=== {time.strftime('%F %T')} job {job_id()} on {socket.gethostname()}: "
                f"{shlex.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        if runner is not None:
            runner._proc = proc
        try:
            while True:  # polled: a signal handler (submitit's, on USR2) may run while we wait
                try:
                    return proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    continue
        except KeyboardInterrupt:  # the child got the SIGINT too: let it save and stop
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=120)
            raise
        finally:
            if runner is not None:
                runner._proc = None


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait (from a signal handler) until process `pid` has ended; True when it did within `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pid_alive(pid):
            return True
        time.sleep(0.5)
    return False


try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a dependency
    _Checkpointable = object


class TaskRunner(_Checkpointable):
    """What a Slurm array task runs: run_task(study_dir, name). A submitit Checkpointable: at the time-limit
    warning or a preemption (USR2 from Slurm, which reaches the command too), checkpoint() waits for the command
    to save and stop, marks the task requeued, and hands submitit a fresh runner for the same task, which
    submitit requeues; the command resumes from its run directory."""

    def __init__(self, study_dir: str, name: str, wait_s: float = 100.0):
        self.study_dir, self.name, self.wait_s = str(study_dir), name, wait_s
        self._proc = None

    def __call__(self) -> dict:
        return run_task(self.study_dir, self.name, self)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission
        proc = self._proc
        if proc is not None and not _wait_exit(proc.pid, self.wait_s):
            logger.warning("%s: the command did not stop within %.0f s of the signal", self.name, self.wait_s)
        if _node_rank() == 0:
            TaskFiles(self.study_dir, self.name).update(state="requeued", ended=time.time(),
                                                        note="time limit or preemption: requeued")
        return DelayedSubmission(TaskRunner(self.study_dir, self.name, self.wait_s))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state, _proc=None)


def tail(path: Path, n: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    lines = [ln.split("\r")[-1] for ln in lines]  # progress bars: the last redraw of a line
    return "\n".join(lines[-n:])
