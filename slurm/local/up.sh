#!/usr/bin/env bash
# Bring up a real Slurm (Debian packages: slurmctld, slurmd, munge) on this machine, as root, without
# systemd: one node "localhost", or several slurmd here (SLURM_NODES). For tests and trying slurm/train.sh.
#   bash slurm/local/up.sh                 # idempotent: a cluster that already answers is left alone
#   export SLURM_CONF=/tmp/hpcgan-slurm/etc/slurm.conf   # (printed at the end) for sbatch/squeue/...
#   bash slurm/local/down.sh               # stop it
# Env: SLURM_BASE (default /tmp/hpcgan-slurm), SLURM_NODE_CPUS (CPUs each node advertises, default
# max(nproc, 8): oversubscribing a small box lets a few tiny jobs run at once),
# SLURM_NODES (default 1: one node named "localhost"; N > 1: nodes n1..nN, one slurmd each, all on this
# machine: a multi-node cluster for testing), SLURM_PORT (default 6817: slurmctld; slurmd use the next ports).
# A second cluster beside the first needs its own SLURM_BASE and SLURM_PORT.
# No accounting (no slurmdbd): `sacct` does not work; use `scontrol show job` (jobs stay MinJobAge=300 s).
set -euo pipefail
BASE=${SLURM_BASE:-/tmp/hpcgan-slurm}
NCPU=${SLURM_NODE_CPUS:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}
NNODES=${SLURM_NODES:-1}
PORT=${SLURM_PORT:-6817}
if [ "$NNODES" = 1 ]; then NODES=(localhost); else mapfile -t NODES < <(seq -f 'n%g' 1 "$NNODES"); fi
export SLURM_CONF=$BASE/etc/slurm.conf

# state of every node, one word ("idle" when all are idle)
node_state() { timeout 10 sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ' | sed 's/ $//' || true; }
# alive = exists and is not a zombie (PID 1 in some containers reaps re-parented daemons late)
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${s#Z}" = "$s" ]; }
ctld_pid() { [ -s "$BASE/run/slurmctld.pid" ] && cat "$BASE/run/slurmctld.pid"; }
# (sinfo retries for ~9 s when no controller answers, so ask only when ours is running)
if [ -s "$SLURM_CONF" ] && pid=$(ctld_pid) && alive "$pid"; then
  case "$(node_state)" in idle*|mix*|alloc*|comp*)   # answers and accepts jobs: leave it alone
    echo "slurm already up"; echo "export SLURM_CONF=$SLURM_CONF"; exit 0;;
  esac
fi
[ "$(id -u)" = 0 ] || { echo "up.sh: must run as root to install/start Slurm (or point SLURM_CONF at a cluster)" >&2; exit 2; }

# 0) packages, only when missing (apt lists refreshed only then)
missing=""
for p in slurmctld slurmd slurm-client munge; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "installing:$missing"
  apt-get update -qq
  # shellcheck disable=SC2086  # word splitting of the package list is intended
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# 1) munge (reuse one that already answers); Debian's postinst normally creates the key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged               # forks; pid in /run/munge/munged.pid
  mkdir -p "$BASE/run" && touch "$BASE/run/munged.ours"   # down.sh stops munged only if we started it
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null
fi

# 2) leftover daemons of an earlier, broken bring-up go first (by PID; zombies do not count)
for f in "$BASE"/run/slurmd-*.pid "$BASE"/run/slurmctld.pid; do
  if [ -s "$f" ] && alive "$(cat "$f")"; then kill "$(cat "$f")" 2>/dev/null || true; sleep 0.5; fi
done
# fresh controller state: job ids restart at 1
rm -rf "$BASE/state" "$BASE/spool"
mkdir -p "$BASE"/{etc,state,log,run}
for n in "${NODES[@]}"; do mkdir -p "$BASE/spool/slurmd-$n"; done

# 3) slurm.conf: nodes are named "localhost" or n1..nN (slurmd -N NAME), so the hostname does not matter;
#    several slurmd on one host differ by port
MEM_MB=$(awk -v n="$NNODES" '/MemTotal/ {printf "%d", $2/1024*0.9/n}' /proc/meminfo)
NODE_LINES=""; i=0
for n in "${NODES[@]}"; do
  i=$((i + 1)); p=""; [ "$NNODES" = 1 ] || p=" Port=$((PORT + 1 + i))"
  NODE_LINES+="NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1$p CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN"$'\n'
done
NODE_LIST=$(IFS=,; echo "${NODES[*]}")
cat > "$SLURM_CONF" <<CONF
ClusterName=hpcgan
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 -> 121 s)
AuthInfo=cred_expire=5
MpiDefault=none
# linuxproc + task/none: no cgroup setup needed in containers/VMs
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
# defaults batch_sched_delay=3 s / bf_interval=30 s add seconds of latency per job / requeue
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without DefMemPerCPU each job takes the whole node's memory and jobs run one at a time
DefMemPerCPU=1000
# lets the node advertise more CPUs than it has
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd-%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
${NODE_LINES}PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

# 4) daemons (they fork; PIDs in $BASE/run/*.pid)
slurmctld -f "$SLURM_CONF"
for n in "${NODES[@]}"; do slurmd -f "$SLURM_CONF" -N "$n"; done

# 5) wait until every node is idle
for _ in $(seq 1 120); do [ "$(node_state)" = idle ] && break; sleep 0.25; done
if [ "$(node_state)" != idle ]; then
  echo "up.sh: slurm nodes not idle ($(node_state)); last log lines:" >&2; tail -n 20 "$BASE"/log/*.log >&2; exit 1
fi
sinfo
echo "export SLURM_CONF=$SLURM_CONF"
