"""Shared pytest fixtures. Markers (slow, slurm, real_data) are registered in pyproject.toml.

`simulated_shards` (session): a factory, scale -> the embedded simulator's cells at that scale sharded at 32 px
(seed 0), built once per session and scale. Tests only read them (a test that changes shards copies them first).

`slurm_cluster` (session): a real Slurm to submit to. It uses the cluster SLURM_CONF (or
/etc/slurm/slurm.conf) points at when `sinfo` answers; otherwise, as root, it starts the project's own
single-node cluster with slurm/local/up.sh (and stops it at the end of the session if it started it);
otherwise the test is skipped with the reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "slurm" / "local"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models on a shared 2-core machine: one intra-op thread avoids thrashing, and is restored.
    A module uses it with pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def simulated_shards(tmp_path_factory):
    from hpcgan.data.build import build
    from hpcgan.data.simulate import simulate
    made: dict[float, Path] = {}

    def make(scale: float) -> Path:
        if scale not in made:
            root = tmp_path_factory.mktemp(f"sim-{scale}")
            simulate(root / "sim", seed=0, scale=scale, progress=False)
            build({s: str(root / "sim" / s) for s in ("pbc", "aml", "lab")}, root / "shards", size=32, seed=0,
                  progress=False, contact_sheet=False)
            made[scale] = root / "shards"
        return made[scale]
    return make


def train_4_and_2_plus_2(shards: Path, tmp_path: Path, model: str, *extra: str) -> tuple[dict, dict, Path]:
    """Train `model` (width 8, batch 4, CPU) 4 steps straight and 2 + 2 steps with a resume in between; returns
    (straight newest checkpoint, resumed newest checkpoint, straight run dir) for bit-exact resume tests."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from hpcgan import CONFIG_DIR
    from hpcgan.checkpoint import load_latest
    from hpcgan.rundir import EXIT_OK
    from hpcgan.train import run

    def cfg(run_dir, steps):
        with initialize_config_dir(str(CONFIG_DIR), version_base=None):
            c = compose("train", overrides=[f"shards={shards}", f"run_dir={run_dir}", f"model={model}",
                                            f"steps={steps}", "batch_size=4", "model.width=8", "backend=webdataset",
                                            "num_threads=1", "progress=false", "tensorboard=false", "ckpt_every=2",
                                            "log_every=2", "sample_every=0", "samples_per_class=1", "device=cpu",
                                            *extra])
        return OmegaConf.to_container(c, resolve=True)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(cfg(straight, 4)) == EXIT_OK
    assert run(cfg(resumed, 2)) == EXIT_OK
    assert run(cfg(resumed, 4)) == EXIT_OK
    return load_latest(straight)[0], load_latest(resumed)[0], straight


@dataclass
class SlurmCluster:
    env: dict          # os.environ + SLURM_CONF: pass to every subprocess that calls sbatch/squeue/scontrol
    conf: str | None   # SLURM_CONF path (None: the system default /etc/slurm/slurm.conf)
    started: bool      # True when this session brought it up (and will stop it)

    def run(self, *cmd: str, timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sbatch, scontrol, ...) against this cluster; text output."""
        return subprocess.run(list(cmd), env=kw.pop("env", self.env), text=True, capture_output=True,
                              timeout=timeout, check=check, **kw)


def _sinfo_answers(env: dict) -> str | None:
    """None when sinfo reports a usable node, else why not."""
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, text=True, capture_output=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    states = r.stdout.split()
    if r.returncode != 0:
        return f"sinfo rc={r.returncode}: {r.stderr.strip()[-300:]}"
    if not any(s.rstrip("*~#").startswith(("idle", "mix", "alloc", "comp")) for s in states):
        return f"no usable Slurm node (states: {states})"
    return None


def _bring_up() -> tuple[dict | None, str | None, bool]:
    """(env, conf, started) of a reachable cluster, or (None, reason, False)."""
    env = dict(os.environ)
    conf = env.get("SLURM_CONF")
    # Ask an existing cluster only when one is configured: without a controller sinfo retries for ~10 s.
    why = "no sinfo on PATH" if not shutil.which("sinfo") else "no SLURM_CONF and no /etc/slurm/slurm.conf"
    if shutil.which("sinfo") and (conf or Path("/etc/slurm/slurm.conf").is_file()):
        why = _sinfo_answers(env)
        if why is None:
            return env, conf, False
    if os.geteuid() != 0:
        return None, f"no reachable Slurm ({why}) and not root, so slurm/local/up.sh cannot start one", False
    try:
        r = subprocess.run(["bash", str(LOCAL_SLURM / "up.sh")], env=env, text=True, capture_output=True,
                           timeout=600)
    except subprocess.TimeoutExpired:
        return None, "slurm/local/up.sh timed out after 600 s", False
    if r.returncode != 0:
        return None, f"slurm/local/up.sh failed (rc={r.returncode}): {(r.stdout + r.stderr).strip()[-600:]}", False
    conf = next((line.split("=", 1)[1] for line in r.stdout.splitlines() if line.startswith("export SLURM_CONF=")),
                None)
    if conf is None:
        return None, f"slurm/local/up.sh printed no SLURM_CONF line: {r.stdout[-300:]}", False
    env["SLURM_CONF"] = conf
    reason = _sinfo_answers(env)
    if reason:
        return None, f"slurm/local/up.sh ran but {reason}", False
    return env, conf, "already up" not in r.stdout


@pytest.fixture(scope="session")
def slurm_cluster():
    env, conf_or_reason, started = _bring_up()
    if env is None:
        pytest.skip(f"Slurm not available: {conf_or_reason}")
    cluster = SlurmCluster(env=env, conf=conf_or_reason, started=started)
    yield cluster
    if started:
        subprocess.run(["bash", str(LOCAL_SLURM / "down.sh")], env=env, capture_output=True, timeout=120)
