#!/usr/bin/env python
"""Studies of thousands of tasks: how the study directory, the local executor and `status` behave, written as JSON.

Measures, with the sweep's own functions:
  expand     seconds to expand the paper's grid widened to thousands of tasks (more seeds), and its task count;
  run        a study of N no-op tasks (each a real process: `python -c` writing its marker file) on the local
             executor: seconds in all and per task (the executor's own cost: locks, state files, a process);
  status     seconds of `tools/sweep.py status` (every task's state from the study directory) when all are done;
  relaunch   seconds to find that nothing is left to do (what a relaunch pays before submitting anything);
  files      files and bytes the study directory holds per task.

    python tools/bench_sweep.py [--tasks 3000] [--out tools/benchmarks/bench_sweep-cpu2.json] [--work DIR]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan import sweep  # noqa: E402
from hpcgan.fsutil import atomic_write_bytes  # noqa: E402
from hpcgan.jsonfile import dumps  # noqa: E402

NOOP = "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True); (p / 'done').touch()"


def noop_study(out: Path, n: int) -> dict:
    """study.json of `n` independent no-op tasks (the tiny study's settings, the train stage's resources)."""
    s = sweep.load_study("tiny")
    res = s.stage_resources("train")
    tasks = [sweep.Task(f"noop/t{i:05d}", "train", str(out / "runs" / f"t{i:05d}"),
                        ["-c", NOOP, str(out / "runs" / f"t{i:05d}")], grid={"i": i}, resources=res,
                        check={"kind": "file", "file": "done"}) for i in range(n)]
    return sweep.write_study(out, s, tasks, "noop", [], "local")


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - t0, 3)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=3000, help="no-op tasks in the study")
    p.add_argument("--grid-seeds", type=int, default=100, help="seeds of the widened paper grid (expand only)")
    p.add_argument("--out", default="runs/bench/bench_sweep.json")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir, removed afterwards)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = {"tool": "tools/bench_sweep.py", "args": vars(args), "host": platform.node(), "cores": os.cpu_count(),
              "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    seeds = "[" + ",".join(str(i) for i in range(args.grid_seeds)) + "]"
    paper = sweep.load_study("paper", ["data.shards=/data/real128", f"gan.seeds={seeds}", f"classify.seeds={seeds}"])
    with tempfile.TemporaryDirectory(prefix="bench_sweep-", dir=args.work) as tmp:
        work = Path(tmp)
        tasks, seconds = timed(lambda: sweep.expand(paper, work / "paper"))
        result["expand"] = {"tasks": len(tasks), "seconds": seconds}

        out = work / "noop"
        doc, seconds = timed(lambda: noop_study(out, args.tasks))
        result["write_study"] = {"tasks": args.tasks, "seconds": seconds}
        doc = sweep.read_study(out)
        launched = sweep.LaunchResult("local")
        _, seconds = timed(lambda: sweep.run_local(out, doc, doc["tasks"], launched, lambda line: None))
        result["run"] = {"tasks": args.tasks, "failed": len(launched.failed), "seconds": seconds,
                         "seconds_per_task": round(seconds / args.tasks, 4)}
        (text, statuses), seconds = timed(lambda: sweep.status_report(out))
        result["status"] = {"seconds": seconds, "finished": sum(st.state == "finished" for st in statuses),
                            "report_lines": text.count("\n") + 1}
        todo, seconds = timed(lambda: [st for st in sweep.collect_status(out) if st.state in ("failed", "missing")])
        result["relaunch"] = {"seconds": seconds, "todo": len(todo)}
        files = [f for f in out.rglob("*") if f.is_file()]
        result["files"] = {"files": len(files), "bytes": sum(f.stat().st_size for f in files),
                           "per_task": round(len(files) / args.tasks, 2)}
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = dumps(result, indent=2) + "\n"
    atomic_write_bytes(Path(args.out), text.encode())
    print(text)
    return result


if __name__ == "__main__":
    main()
