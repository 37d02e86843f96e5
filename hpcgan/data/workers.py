"""Process pools of the data stage (sharding, simulation): one rule for starting and stopping them.

Ctrl-C is the parent's to handle (it stops the pool and removes its staging directory); workers
ignore SIGINT, which would otherwise make each print a KeyboardInterrupt traceback.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor


def cores() -> int:
    """CPU cores this process may run on (a Slurm allocation's, not the node's)."""
    return len(os.sched_getaffinity(0))


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def ordered_map(workers: int, chunksize: int = 8):
    """map(fn, tasks) in task order: the built-in one for one worker, else a process pool's.

    concurrent.futures, not multiprocessing.Pool: an exception in a worker (even KeyboardInterrupt) comes back to
    the caller, and a worker that dies (killed, out of memory) raises BrokenProcessPool instead of hanging forever.
    """
    if workers <= 1:
        yield map
        return
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_ignore_sigint)
    try:
        yield lambda fn, tasks: ex.map(fn, tasks, chunksize=chunksize)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
