#!/usr/bin/env python
"""A study in one command: every stage's tasks submitted at once as Slurm job arrays that wait on each other,
or run here in order; re-running resumes (hpcgan/sweep/, configs/study/, configs/cluster/).

  python tools/sweep.py study=tiny out=studies/tiny [executor=auto|slurm|local] [OVERRIDES...]
  python tools/sweep.py out=studies/tiny                  # again: the same study, its unfinished tasks only
  python tools/sweep.py status out=studies/tiny [--watch] [--interval=S] [--active]

OVERRIDES are Hydra overrides of the study (gan.steps=50 gan.seeds=[0,1] resources.train.gpus=2
cluster=mysite); the data-selecting data.scarce and data.sources are replaced, not merged, and ~KEY
removes a key ('~data.scarce': no cut). The launch prints the resolved data, models, regimes and seeds. executor=auto: slurm where sbatch is on PATH, else local. Relaunching without study=
reuses the study and overrides of the last launch (study.json).
`status` prints every task (pending, running, requeued, finished, failed, missing) with Slurm's view where it
has one, a count per stage, and the last log lines of failed tasks; --watch redraws until nothing is under way
(--active: only the tasks that are not finished).

Exit status: 0 launched / all finished; 1 some task failed (local) or status shows failures; 2 bad input.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from hpcgan.rundir import read_json  # noqa: E402
from hpcgan.settings import SettingsError  # noqa: E402
from hpcgan.sweep import STUDY_FILE, SweepError, launch, load_study, status_report, watch  # noqa: E402

USAGE = __doc__.split("\n\n")[1]


def split_args(argv: list[str]) -> tuple[str, dict[str, str], list[str], set[str]]:
    """(command, our own key=value settings, study overrides, --flags)."""
    command = "launch"
    if argv and argv[0] in ("launch", "status"):
        command, argv = argv[0], argv[1:]
    own, overrides, flags = {}, [], set()
    for a in argv:
        if a.startswith("--"):
            flags.add(a)
        elif a.split("=", 1)[0] in ("study", "out", "executor"):
            k, _, v = a.partition("=")
            own[k] = v
        elif "=" in a or a.startswith("~"):   # ~KEY removes a key of the study
            overrides.append(a)
        else:
            raise SettingsError(f"{a!r}: expected key=value (usage below)\n{USAGE}")
    return command, own, overrides, flags


def merge_overrides(old: list[str], new: list[str]) -> list[str]:
    """The last launch's overrides with these on top (one per key, the newest)."""
    merged = {o.split("=", 1)[0].lstrip("+~"): o for o in [*old, *new]}
    return list(merged.values())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        command, own, overrides, flags = split_args(list(sys.argv[1:] if argv is None else argv))
        if "out" not in own:
            raise SettingsError(f"out=DIR is required (the study directory)\n{USAGE}")
        out = Path(own["out"])
        if command == "status":
            return status(out, flags)
        unknown = flags - {"--watch"}
        if unknown:
            raise SettingsError(f"unknown option(s) {sorted(unknown)} for a launch")
        study = own.get("study")
        if study is None:  # the same study as the last launch into `out`
            previous = read_json(out / STUDY_FILE) or {}
            if not previous:
                raise SettingsError(f"study=NAME is required: {out} has no {STUDY_FILE} yet\n{USAGE}")
            study, overrides = previous["study"], merge_overrides(previous.get("overrides", []), overrides)
        settings = load_study(study, overrides)
        result = launch(settings, out, own.get("executor", "auto"), study=study, overrides=overrides)
    except (SettingsError, SweepError) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    if result.executor == "slurm" and result.submitted:
        print(f"follow it: python tools/sweep.py status out={out} --watch")
    if "--watch" in flags and result.executor == "slurm":
        return status(out, {"--watch"})
    if result.failed:
        print(f"{len(result.failed)} task(s) did not finish: python tools/sweep.py status out={out}", file=sys.stderr)
        return 1
    return 0


def status(out: Path, flags: set[str]) -> int:
    unknown = {f for f in flags if f.split("=")[0] not in ("--watch", "--interval", "--active")}
    if unknown:
        raise SettingsError(f"unknown option(s) {sorted(unknown)} for status\n{USAGE}")
    interval = next((float(f.split("=", 1)[1]) for f in flags if f.startswith("--interval=")), 10.0)
    if "--watch" in flags:
        statuses = watch(out, interval)
    else:
        text, statuses = status_report(out, all_rows="--active" not in flags)
        print(text)
    return 1 if any(st.state == "failed" for st in statuses) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SettingsError, SweepError) as e:  # from status()
        print(f"sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `... status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
