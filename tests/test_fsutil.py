"""Atomic outputs: what a killed run leaves behind is swept by the next one, and only when it is safe."""
import logging
import os
import socket
import subprocess
import sys

import pytest

from hpcgan.fsutil import atomic_dir, sweep_stale_staging


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sweep_removes_only_what_a_dead_local_process_left(tmp_path, caplog):
    final = tmp_path / "shards"
    host = socket.gethostname()
    dead, live = _dead_pid(), os.getpid()
    paths = {
        "dead_staging": tmp_path / f".shards.staging-{host}@{dead}-abc123",
        "dead_old": tmp_path / f".shards.old-{host}@{dead}",
        "live": tmp_path / f".shards.staging-{host}@{live}-def456",
        "other_host": tmp_path / f".shards.staging-elsewhere.node@{dead}-ghi789",
        "old_naming": tmp_path / ".shards.staging-xyz",
        "other_dir": tmp_path / f".other.staging-{host}@{dead}-abc",
    }
    for p in paths.values():
        (p / "part").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="hpcgan.fsutil"):
        kept = sweep_stale_staging(final)
    assert not paths["dead_staging"].exists() and not paths["dead_old"].exists()
    assert sorted(kept) == sorted([paths["live"], paths["other_host"], paths["old_naming"]])
    assert all(paths[k].exists() for k in ("live", "other_host", "old_naming", "other_dir"))
    assert any("left by an interrupted run" in r.getMessage() for r in caplog.records)
    assert any(r.levelno == logging.WARNING and "another run" in r.getMessage() for r in caplog.records)


def test_atomic_dir_replaces_whole_and_cleans_up_on_error(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as stage:
        (stage / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as stage:
            (stage / "a").write_text("2")
            raise RuntimeError("boom")
    assert (final / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(final) as stage:
        assert stage.name.startswith(f".out.staging-{socket.gethostname()}@{os.getpid()}-")
        (stage / "b").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_outputs_get_the_umask_permissions_not_private_temp_ones(tmp_path, umask, file_mode, dir_mode):
    """mkstemp/mkdtemp make 0600/0700 files: a lab's shards, checkpoints and logs on shared project space
    would be unreadable to the rest of the group. Atomic outputs get what open()/mkdir() would give."""
    code = f"""
import os
os.umask({umask:#o})
from pathlib import Path
from hpcgan.fsutil import atomic_dir, atomic_write_bytes
atomic_write_bytes(Path({str(tmp_path)!r}) / "log.csv", b"step\\n")
with atomic_dir(Path({str(tmp_path)!r}) / "shards") as d:
    (d / "train-000000.tar").write_bytes(b"x")
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "log.csv").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "shards").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "shards" / "train-000000.tar").stat().st_mode & 0o777 == file_mode
