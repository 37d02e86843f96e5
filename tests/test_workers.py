"""hpcgan.data.workers: the data stage's one process-pool rule. Results come back in task order, a worker's
exception reaches the caller, and a worker that dies (the OOM killer's SIGKILL) ends the map with an error
instead of hanging the job until its time limit."""
import os
import signal
from concurrent.futures.process import BrokenProcessPool

import pytest

from hpcgan.data.workers import ordered_map


def _square(x: int) -> int:
    return x * x


def _fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("bad task 3")
    return x


def _killed_on_five(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)   # what the OOM killer does to a worker
    return x


@pytest.mark.parametrize("workers", [1, 2])
def test_results_in_task_order(workers):
    with ordered_map(workers, chunksize=3) as pmap:
        assert list(pmap(_square, range(40))) == [x * x for x in range(40)]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_workers_exception_reaches_the_caller(workers):
    with pytest.raises(ValueError, match="bad task 3"):
        with ordered_map(workers, chunksize=1) as pmap:
            list(pmap(_fails_on_three, range(8)))


@pytest.mark.timeout(120)
def test_a_killed_worker_raises_instead_of_hanging():
    with pytest.raises(BrokenProcessPool):
        with ordered_map(2, chunksize=1) as pmap:
            list(pmap(_killed_on_five, range(20)))
