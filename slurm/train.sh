#!/bin/bash
# Train a hpcgan GAN on Slurm: one node or many, GPUs or CPU only; continues by itself when preempted
# or about to hit its time limit.
#
#   (the job log is <job-name>-<jobid>.out in the submit directory; sbatch --output=DIR/%x-%j.out moves it,
#    but Slurm will not create DIR)
#   sbatch slurm/train.sh shards=data/shards run_dir=runs/wgan model=wgan_gp_ac steps=50000
#   sbatch --nodes=2 --gpus-per-node=4 --cpus-per-task=32 --time=24:00:00 slurm/train.sh shards=... run_dir=...
#   sbatch --partition=cpu --cpus-per-task=8 slurm/train.sh shards=... run_dir=... precision=fp32
# Everything after the script name is a Hydra override for `python -m hpcgan.train` (configs/train.yaml).
# Options on the sbatch command line override the #SBATCH defaults below.
#
# Per node, one srun task runs torchrun, which starts one worker per GPU (nproc = GPUs allocated on the
# node: SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else nvidia-smi; on a CPU-only node NPROC, default 1).
# One node: `torchrun --standalone`; several: c10d rendezvous hosted on the first node of the job.
#
# Time limit / preemption: Slurm sends SIGUSR2 to this script 120 s before the time limit
# (--signal=B:USR2@120). The script hands it to srun, which hands it to torchrun on every node, which
# passes it to its workers (--signals-to-handle); hpcgan.train then saves a checkpoint and exits, and the
# script requeues the job (scontrol requeue). The requeued job resumes from run_dir's newest checkpoint
# (hpcgan.train does that by itself) and appends to the same log (--open-mode=append).
# torchrun exits non-zero when it was signalled, whatever the workers' exit codes, so the script decides
# from "the warning came and the training did not end cleanly" (rc != 0), not from an exit code.
# scancel (SIGTERM to everything) also makes the training checkpoint, but does not requeue: cancel means stop.
# Keep the warning lead time (@120) well below the time limit: Slurm may send it up to ~30 s early, and a
# warning that arrives while the workers are still starting (before they handle it) ends them unsaved.
#
# Environment knobs (exported at sbatch time, --export=ALL is Slurm's default):
#   HPCGAN_VENV   virtualenv to activate (default: $SLURM_SUBMIT_DIR/.venv if it exists)
#   NPROC         workers per node (default: GPUs on the node, 1 without GPUs)
#   MASTER_PORT   rendezvous port on the first node (default: 20000 + job id % 20000)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun waits for workers to save before SIGKILL (default 90)
#
#SBATCH --job-name=hpcgan-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail   # no -e: the exit status of the training decides what happens next

log() { echo "[train.sh $(date '+%F %T')] $*"; }
die() { echo "[train.sh] ERROR: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "submit this script with sbatch (it needs a Slurm job allocation)"
cd "${SLURM_SUBMIT_DIR:-$PWD}" || die "cannot cd to the submit directory ${SLURM_SUBMIT_DIR:-}"

# --- Python environment --------------------------------------------------------------------------------
if [ -n "${HPCGAN_VENV:-}" ]; then
  [ -f "$HPCGAN_VENV/bin/activate" ] || die "HPCGAN_VENV=$HPCGAN_VENV has no bin/activate"
  # shellcheck disable=SC1091
  . "$HPCGAN_VENV/bin/activate"
elif [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
command -v torchrun >/dev/null || die "torchrun not found: activate the project's venv before sbatch or set HPCGAN_VENV"

# --- workers per node ----------------------------------------------------------------------------------
gpus_on_node() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]; then
    echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .; return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU'; return; fi
  echo 0
}
GPUS=$(gpus_on_node)   # counted on the first node; nodes of one job are assumed alike
if [ "${GPUS:-0}" -gt 0 ]; then NPROC=${NPROC:-$GPUS}; else NPROC=${NPROC:-1}; fi
CPUS=${SLURM_CPUS_PER_TASK:-1}
# threads per worker: the task's CPUs shared among its workers
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 ))}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-90}
NNODES=${SLURM_NNODES:-1}

# --- launcher ------------------------------------------------------------------------------------------
if [ "$NNODES" -gt 1 ]; then
  FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  # the address Slurm itself reaches that node at (NodeAddr: the node name on most clusters)
  MASTER_ADDR=$(scontrol show node "$FIRST_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}
  MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
  # c10d assigns node ranks itself (torchrun ignores --node_rank); the agent on MASTER_ADDR hosts the store
  RDZV=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
        --rdzv_id="$SLURM_JOB_ID")
else
  RDZV=(--standalone --nnodes=1)
fi
# torchrun passes on only the signals it handles (default SIGTERM,SIGINT,SIGHUP,SIGQUIT); add SIGUSR2
# where this torch has the option, else forward the warning as SIGTERM (which hpcgan.train also obeys).
# (grep torch's launcher source: `torchrun --help` would import torch, seconds on a busy node)
TORCH_RUN_PY=$(python -c 'import importlib.util as u, os; print(os.path.join(u.find_spec("torch").submodule_search_locations[0], "distributed", "run.py"))')
if grep -q 'signals_to_handle' "$TORCH_RUN_PY" 2>/dev/null; then
  SIGOPT=("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"); FORWARD=USR2
else
  SIGOPT=(); FORWARD=TERM
fi

log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $NNODES node(s) [${SLURM_JOB_NODELIST:-}]:" \
    "$NPROC worker(s)/node, GPUs/node=$GPUS, OMP_NUM_THREADS=$OMP_NUM_THREADS"
[ "$NNODES" -gt 1 ] && log "rendezvous: c10d at $MASTER_ADDR:$MASTER_PORT"
log "hpcgan.train overrides: $*"

# --- run, with the time-limit warning handled ----------------------------------------------------------
warned=0
srun_pid=
# shellcheck disable=SC2317  # trap handlers are called indirectly
on_warning() {  # SIGUSR2 from Slurm (--signal=B:USR2@...): make every worker checkpoint and exit
  warned=1
  log "time-limit warning (SIGUSR2): asking the workers to checkpoint"
  [ -z "$srun_pid" ] && return
  if [ "$FORWARD" = USR2 ]; then
    kill -USR2 "$srun_pid" 2>/dev/null          # srun passes USR2 to torchrun on every node
  else
    scancel --signal=TERM "$SLURM_JOB_ID"       # signals every step's processes (not this script)
  fi
}
# shellcheck disable=SC2317
on_term() {     # scancel / preemption: Slurm signals the steps too; just wait for the save
  log "SIGTERM: the workers checkpoint and stop"
}
trap on_warning USR2
trap on_term TERM

# srun does not pass --cpus-per-task on from sbatch in every Slurm version: say it.
# ${SIGOPT[@]+"${SIGOPT[@]}"}: an empty array is an "unbound variable" under set -u in bash < 4.4
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS" --kill-on-bad-exit=1 \
  torchrun "${RDZV[@]}" --nproc_per_node="$NPROC" --max_restarts=0 ${SIGOPT[@]+"${SIGOPT[@]}"} -m hpcgan.train "$@" &
srun_pid=$!
while :; do
  wait "$srun_pid"; rc=$?
  # wait returns >128 as soon as a trapped signal arrives; srun is then still running
  if [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
  break
done
log "training exited with status $rc"

if [ "$warned" = 1 ] && [ "$rc" != 0 ]; then
  log "requeueing job $SLURM_JOB_ID to continue from the checkpoint"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  log "scontrol requeue failed; resubmit the same command to continue"
fi
exit "$rc"
