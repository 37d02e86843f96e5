"""Process-group setup for torchrun or srun, device choice, and stop-on-signal.

Launchers (either works, nothing to configure):
  torchrun --standalone --nproc_per_node=N -m hpcgan.train ...   (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)
  srun --ntasks=N python -m hpcgan.train ...                      (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID;
                                                                   MASTER_ADDR/MASTER_PORT from the job script)
  python -m hpcgan.train ...                                      (one process, no process group)
Backend: nccl when the process drives a CUDA device, gloo on CPU.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Signals that mean "save and leave": SIGTERM (scancel, preemption, torchrun shutting down) and SIGUSR2
# (what slurm/train.sh asks Slurm to send shortly before the time limit, --signal=USR2@...). SIGINT too.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(*names: str) -> int | None:
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return None


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or Slurm's environment; (0, 1, 0) for a plain run.

    torchrun's variables win over Slurm's, since torchrun inside an sbatch job sees both.
    """
    if _env_int("RANK") is not None and _env_int("WORLD_SIZE") is not None:
        return _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK") or 0
    if _env_int("SLURM_PROCID") is not None and (_env_int("SLURM_NTASKS") or 1) > 1 and _in_slurm_step():
        return _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID") or 0
    return 0, 1, 0


_SLURM_BATCH_STEP = 4294967294  # the step id Slurm gives a batch script


def _in_slurm_step() -> bool:
    """Whether srun started this process. The batch script itself also sees SLURM_PROCID=0 and
    SLURM_NTASKS=N (sbatch --ntasks=N), but no other rank will ever join it: it is one process."""
    step = _env_int("SLURM_STEP_ID", "SLURM_STEPID")
    return step is not None and step != _SLURM_BATCH_STEP


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The one rule that turns a `device=` setting into a torch.device, for training, loading and generating.

    auto: this process's GPU when torch sees one, else the CPU; cuda: the GPU of this local rank
    (cuda:<local_rank>); cuda:N and cpu as written. ValueError for a name that is none of these,
    RuntimeError when the GPU asked for is not there (with what to do instead).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: choose auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device={device!r}: choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={device} requested but torch sees no CUDA device; use device=auto or cpu")
    n_gpus = torch.cuda.device_count()
    if dev.index is None and local_rank >= n_gpus:
        # NCCL would refuse two ranks on one GPU ("Duplicate GPU detected") deep inside a collective
        raise RuntimeError(f"local rank {local_rank} but this node has {n_gpus} GPU(s): start at most {n_gpus} "
                           f"process(es) per node (torchrun --nproc_per_node={n_gpus}), or run on the CPU with "
                           "device=cpu")
    if dev.index is not None and dev.index >= n_gpus:
        raise RuntimeError(f"device={device} but torch sees {n_gpus} CUDA GPU(s); use device=auto, cuda or cpu")
    return torch.device("cuda", local_rank if dev.index is None else dev.index)


def init(device: str = "auto") -> DistEnv:
    """Join the process group (if launched with several processes) and pick this process's device."""
    rank, world, local = launch_env()
    if world == 1 and (_env_int("SLURM_NTASKS") or 1) > 1 and not _in_slurm_step():
        logger.warning("SLURM_NTASKS=%s but this process was not started by srun: training as ONE process; "
                       "for %s ranks launch with srun (or use slurm/train.sh)", os.environ["SLURM_NTASKS"],
                       os.environ["SLURM_NTASKS"])
    dev = resolve_device(device, local_rank=local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    env = DistEnv(rank, world, local, dev, None)
    if world > 1:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError(f"rank {rank}/{world}: MASTER_ADDR and MASTER_PORT must be set (torchrun sets "
                               "them; under srun export them in the job script)")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        env.backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=env.backend, rank=rank, world_size=world, **kwargs)
        logger.info("rank %d/%d on %s (%s)", rank, world, dev, env.backend)
    return env


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_max(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


class StopFlag:
    """Records that a stop signal arrived; the training loop checks it once per step.

    The handler only sets a flag (no I/O, no collectives in a signal handler); ranks agree on stopping by
    an all_reduce of `requested` in the loop, so every rank stops at the same step even when the signal
    reached only some of them.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signum: int | None = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: leave now, without the checkpoint
        if self.signum is None:
            logger.warning("received %s: will checkpoint and stop after the current step",
                           signal.Signals(signum).name)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def leave(self, env: DistEnv, write_status, step: int, total: int,
              done: str = "checkpoint written; rerun to resume") -> int:
        """After the run's checkpoint at a stop signal: status "interrupted" (main rank), a line saying what was
        done and how to go on, every rank leaving together; returns the exit code (rundir.EXIT_SIGNAL)."""
        from hpcgan.rundir import EXIT_SIGNAL
        name = self.name or "a stop signal (on another rank)"
        if env.is_main:
            write_status("interrupted", signal=name)
            print(f"stopped by {name} at step {step}/{total}; {done}", file=sys.stderr, flush=True)
        barrier(env)
        return EXIT_SIGNAL
