"""The files of a run directory, for any run (GAN training, classifier, evaluation), each written atomically:

  config.yaml   the resolved settings the run was started with      write_config / read_config
  status.json   {"state": "running" | "finished" | "failed" | "interrupted", "step", ...}
                                                                    write_status / read_status
  log.csv       one row per logging step, fixed columns; a resumed run drops the rows after its
                checkpoint (they are redone)                        CsvLog
  *.json        any other record                                    write_json / read_json
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

from hpcgan import jsonfile
from hpcgan.fsutil import atomic_write_bytes

CONFIG = "config.yaml"
STATUS = "status.json"
LOG = "log.csv"

# Exit codes of every run's entry point (train, classify); the sweep reads them from a task's return code.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_SIGNAL = 0, 1, 2, 3   # SIGNAL: checkpointed and stopped; rerun resumes


def write_json(path: str | Path, obj: Any) -> None:
    jsonfile.write_json(path, obj, indent=2, sort_keys=True)


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON in `path`; `default` when the file is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def write_status(run_dir: str | Path, status: dict) -> None:
    write_json(Path(run_dir) / STATUS, status)


def read_status(run_dir: str | Path) -> dict:
    """status.json of a run; {} when it has none (yet)."""
    return read_json(Path(run_dir) / STATUS, {})


def write_config(run_dir: str | Path, config: dict) -> None:
    from omegaconf import OmegaConf
    atomic_write_bytes(Path(run_dir) / CONFIG, OmegaConf.to_yaml(config).encode())


def read_config(run_dir: str | Path) -> dict:
    import yaml
    return yaml.safe_load((Path(run_dir) / CONFIG).read_text())


class CsvLog:
    """A CSV with fixed columns, appended a row at a time. Opening it for a run resumed at `resume_step`
    keeps the rows up to that step (a fresh run, resume_step 0, starts with the header only)."""

    def __init__(self, path: str | Path, columns: Iterable[str], resume_step: int = 0):
        self.path, self.columns = Path(path), tuple(columns)
        rows = []
        if self.path.is_file() and resume_step > 0:
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns)
        w.writeheader()
        w.writerows(self._cells(r) for r in rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())

    def _cells(self, row: dict) -> dict:
        return {k: row.get(k, "") for k in self.columns}

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(self._cells(row))

    def read(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))
