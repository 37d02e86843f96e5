"""Submitting a study to Slurm: one submitit executor per stage, the `sbatch --test-only` preflight, the
dependencies of each array (plan_arrays) and every stage's arrays at once, later ones waiting on earlier ones.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from hpcgan.sweep.run import TaskRunner
from hpcgan.sweep.settings import STAGES, StudySettings, SweepError
from hpcgan.sweep.tasks import LaunchResult, record_submission


def _stage_groups(todo: list[dict]) -> list[tuple[str, list[dict]]]:
    return [(stage, [t for t in todo if t["stage"] == stage]) for stage in STAGES if any(t["stage"] == stage for t in todo)]


def slurm_executor(out: Path, s: StudySettings, stage: str, res: dict, dependency: str | None = None):
    """A submitit SlurmExecutor for one stage's array, with the stage's resources."""
    import submitit
    c = s.cluster
    ex = submitit.SlurmExecutor(folder=out / "submitit" / "%j", max_num_timeout=c.max_requeues, python=c.python)
    params: dict[str, Any] = {"job_name": f"hpcgan-{s.name}-{stage}", "time": res["time_min"], "nodes": res["nodes"],
                              "ntasks_per_node": 1, "cpus_per_task": res["cpus"], "signal_delay_s": c.signal_delay_s,
                              "array_parallelism": res["array_parallelism"], "setup": list(c.setup) or None}
    if res.get("gpus"):
        params["gpus_per_node"] = res["gpus"]
    if res.get("mem_gb"):
        params["mem"] = f"{int(res['mem_gb'] * 1024)}M"
    for k in ("partition", "account", "qos", "constraint"):
        if res.get(k):
            params[k] = res[k]
    extra: dict[str, Any] = {"requeue": True, **res.get("sbatch", {})}
    if dependency:
        extra["dependency"] = dependency
        if c.kill_on_invalid_dep:
            extra["kill-on-invalid-dep"] = "yes"
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None}, additional_parameters=extra)
    return ex


def preflight(out: Path, ex, stage: str, n: int) -> None:
    """`sbatch --test-only` of the stage's job script: a request the partition cannot meet fails here."""
    folder = out / "submitit"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f".preflight-{stage}.sh"
    script.write_text(ex._make_submission_file_text("true", "preflight"))
    try:
        r = subprocess.run(["sbatch", "--test-only", f"--array=0-{max(0, n - 1)}", str(script)], capture_output=True,
                           text=True, timeout=60)
    finally:
        script.unlink(missing_ok=True)
    if r.returncode != 0:
        reason = " ".join((r.stderr or r.stdout).split()) or f"exit code {r.returncode}"
        raise SweepError(f"stage {stage}: Slurm refuses its request ({_describe_request(ex.parameters)}): {reason}. "
                         f"Change resources.{stage} in the study or the cluster file (configs/cluster/); nothing "
                         "was submitted")


def _describe_request(p: dict) -> str:
    keys = ("partition", "nodes", "cpus_per_task", "gpus_per_node", "mem", "time", "account", "qos", "constraint")
    return ", ".join(f"{k}={p[k]}" for k in keys if p.get(k) is not None)


def _afterok(ids: set[str], arrays: dict[str, tuple[str, list[str]]]) -> str:
    """afterok on these job ids; every task of an array submitted now -> the array's id alone."""
    ids = set(ids)
    for array_id, (_, names) in arrays.items():
        mine = {f"{array_id}_{i}" for i in range(len(names))}
        if len(names) > 1 and mine <= ids:
            ids = (ids - mine) | {array_id}
    return "afterok:" + ":".join(sorted(ids, key=lambda j: [int(x) for x in j.split("_")]))


def plan_arrays(tasks: list[dict], job_of: dict[str, str], arrays: dict[str, tuple[str, list[str]]]
                ) -> list[tuple[list[dict], str | None]]:
    """One stage's arrays as [(tasks, dependency)]: the tasks that wait on no queued job, then those that do.
    These wait on exactly the upstream tasks they need: `aftercorr:A` when they line up one to one with an
    array A submitted now (task i waits for A's task i only: one failed GAN does not cancel the others'
    evaluations), and `afterok` on the other job ids."""
    free = [t for t in tasks if not any(d in job_of for d in t["deps"])]
    waiting = [t for t in tasks if any(d in job_of for d in t["deps"])]
    plans: list[tuple[list[dict], str | None]] = [(free, None)] if free else []
    if not waiting:
        return plans
    corr, covered = None, set()
    for array_id, (_, names) in arrays.items():
        index = {n: i for i, n in enumerate(names)}
        mapped = [[index[d] for d in t["deps"] if d in index] for t in waiting]
        if len(names) == len(waiting) > 1 and all(len(m) == 1 for m in mapped) \
                and sorted(m[0] for m in mapped) == list(range(len(names))):
            waiting = [t for _, t in sorted(zip((m[0] for m in mapped), waiting), key=lambda p: p[0])]
            corr, covered = array_id, set(names)
            break
    ids = {job_of[d] for t in waiting for d in t["deps"] if d in job_of and d not in covered}
    parts = ([f"aftercorr:{corr}"] if corr else []) + ([_afterok(ids, arrays)] if ids else [])
    return plans + [(waiting, ",".join(parts))]


def submit_slurm(out: Path, doc: dict, todo: list[dict], active: dict[str, str], s: StudySettings,
                 result: LaunchResult, write: Callable[[str], None]) -> None:
    """Each stage as job arrays (plan_arrays), all at once, later stages waiting on earlier ones."""
    from submitit.core.utils import FailedJobError
    groups = _stage_groups(todo)
    for stage, tasks in groups:  # every request checked before anything is submitted
        preflight(out, slurm_executor(out, s, stage, tasks[0]["resources"]), stage,
                  min(len(tasks), s.cluster.max_array_size))
    job_of: dict[str, str] = dict(active)   # task -> the job it runs (or will run) in
    arrays: dict[str, tuple[str, list[str]]] = {}
    submitted_ids: list[str] = []
    try:
        size = s.cluster.max_array_size
        for stage, stage_tasks in groups:
            chunks = [stage_tasks[i:i + size] for i in range(0, len(stage_tasks), size)]
            for tasks, dep in (plan for chunk in chunks for plan in plan_arrays(chunk, job_of, arrays)):
                ex = slurm_executor(out, s, stage, tasks[0]["resources"], dep)
                runners = [TaskRunner(str(out), t["name"], wait_s=max(10, s.cluster.signal_delay_s - 20)) for t in tasks]
                try:
                    jobs = ex.submit_array(runners)
                except FailedJobError as e:
                    raise SweepError(f"stage {stage}: sbatch failed ({_describe_request(ex.parameters)}): "
                                     f"{' '.join(str(e).split())}") from None
                array_id = jobs[0].job_id.split("_")[0]
                submitted_ids.append(array_id)
                names = [t["name"] for t in tasks]
                arrays[array_id] = (stage, names)
                job_of.update({t["name"]: j.job_id for t, j in zip(tasks, jobs)})
                record_submission(out, {"executor": "slurm", "stage": stage, "job_id": array_id,
                                        "array": len(jobs) > 1, "tasks": names, "dependency": dep,
                                        "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
                result.submitted.setdefault(stage, []).append(array_id)
                width = min(len(tasks), tasks[0]["resources"]["array_parallelism"])
                write(f"{stage}: {len(tasks)} task(s) -> job {array_id}"
                      + (f" (array 0-{len(tasks) - 1}%{width})" if len(jobs) > 1 else "")
                      + (f", after {dep}" if dep else ""))
    except BaseException:
        if submitted_ids:  # a half-submitted study would wait forever on the missing stage: take it back
            subprocess.run(["scancel", *submitted_ids], capture_output=True, timeout=60)
            write(f"cancelled what this launch had submitted ({', '.join(submitted_ids)})")
        raise
