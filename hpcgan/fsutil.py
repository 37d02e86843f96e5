"""Outputs appear whole or not at all: atomic files and directories."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it back at once (once)
    os.umask(mask)
    return mask


def _as_created(mode: int) -> int:
    """The permissions open()/mkdir() would give (mode & ~umask), for mkstemp/mkdtemp results, which are
    private (0600/0700): results on a cluster's shared project space must stay readable by the group."""
    return mode & ~_umask()


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """A binary file object that becomes `path` only when the block ends without an error: written to a temp
    file beside it, fsynced, renamed over it; on any error (raise inside the block to refuse what was
    written) the temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _as_created(0o666))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over it."""
    with atomic_file(path) as f:
        f.write(data)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_staging(final: str | Path) -> list[Path]:
    """Remove the `.name.staging-HOST@PID-*` / `.name.old-HOST@PID` siblings of `final` left by a run that was
    killed (SIGKILL, node failure) on this host and is no longer alive. Returns the ones kept: another
    host's (on a shared filesystem its process may still be running) or a live process's, with a warning."""
    final = Path(final).resolve()
    kept = []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:staging|old)-(?P<host>[^@]+)@(?P<pid>\d+)(?:-[^-]+)?$")
    host = socket.gethostname()
    for p in sorted(final.parent.glob(f".{final.name}.*")):
        m = pattern.match(p.name)
        if not m:
            if ".staging-" in p.name or ".old-" in p.name:
                kept.append(p)  # an older naming without host/pid: cannot tell whether it is in use
            continue
        if m["host"] == host and not _pid_alive(int(m["pid"])):
            logger.info("removing %s, left by an interrupted run (process %s is gone)", p, m["pid"])
            shutil.rmtree(p, ignore_errors=True)
        else:
            kept.append(p)
    if kept:
        logger.warning("staging directories of another run (another host, a live process, or an older version; "
                       "delete them if no run is writing %s): %s", final, ", ".join(map(str, kept)))
    return kept


@contextlib.contextmanager
def atomic_dir(final: str | Path, sweep: bool = True):
    """Yield a fresh staging directory; on success it replaces `final` in one rename.

    On any exception the staging directory is removed; after a kill it stays as a hidden
    `.name.staging-HOST@PID-*` sibling, which the next atomic_dir for the same `final` removes once that
    process is gone (sweep=False: the caller has already swept). A previous `final` is never touched until
    the new one is complete.
    """
    final = Path(final).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        sweep_stale_staging(final)
    tag = f"{socket.gethostname()}@{os.getpid()}"  # host names never hold an @
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-{tag}-", dir=final.parent))
    try:
        os.chmod(staging, _as_created(0o777))
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{tag}"
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
