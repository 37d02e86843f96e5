#!/usr/bin/env bash
# Bring up a real Slurm (Debian packages: slurmctld, slurmd, munge; slurmdbd + mariadb-server for accounting)
# on this machine, as root, without systemd: one node "localhost", or several slurmd here (SLURM_NODES).
# For tests and trying slurm/train.sh.
#   bash slurm/local/up.sh                 # idempotent: a cluster that already answers is left alone
#   export SLURM_CONF=/tmp/hpcgan-slurm/etc/slurm.conf   # (printed at the end) for sbatch/squeue/...
#   bash slurm/local/down.sh               # stop it
# Env: SLURM_BASE (default /tmp/hpcgan-slurm), SLURM_NODE_CPUS (CPUs each node advertises, default
# max(nproc, 8): oversubscribing a small box lets a few tiny jobs run at once),
# SLURM_NODES (default 1: one node named "localhost"; N > 1: nodes n1..nN, one slurmd each, all on this
# machine: a multi-node cluster for testing), SLURM_PORT (default 6817: slurmctld; slurmd use the next ports),
# SLURM_ACCOUNTING (default 1: slurmdbd + a private MariaDB under SLURM_BASE, so `sacct` works and submitit
# sees cancelled/crashed jobs; 0: none), SLURM_DBD_PORT (default SLURM_PORT+2, after the slurmd ports with
# SLURM_NODES > 1), SLURM_DB_PORT (MariaDB on 127.0.0.1, default 33306 + SLURM_PORT - 6817).
# A second cluster beside the first needs its own SLURM_BASE and SLURM_PORT (the other ports follow).
# Every bring-up starts fresh: job ids restart at 1 and the accounting database is emptied with them.
# EnforcePartLimits=ALL: a request the partition cannot meet fails at submission instead of pending forever.
set -euo pipefail
BASE=${SLURM_BASE:-/tmp/hpcgan-slurm}
NCPU=${SLURM_NODE_CPUS:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}
NNODES=${SLURM_NODES:-1}
PORT=${SLURM_PORT:-6817}
ACCT=${SLURM_ACCOUNTING:-1}
DBD_PORT=${SLURM_DBD_PORT:-$(( PORT + 2 + (NNODES > 1 ? NNODES : 0) ))}
DB_PORT=${SLURM_DB_PORT:-$(( 33306 + PORT - 6817 ))}
DB=$BASE/mysql
CLUSTER=hpcgan
if [ "$NNODES" = 1 ]; then NODES=(localhost); else mapfile -t NODES < <(seq -f 'n%g' 1 "$NNODES"); fi
export SLURM_CONF=$BASE/etc/slurm.conf

# state of every node, one word ("idle" when all are idle)
node_state() { timeout 10 sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ' | sed 's/ $//' || true; }
# alive = exists and is not a zombie (PID 1 in some containers reaps re-parented daemons late)
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${s#Z}" = "$s" ]; }
pid_alive() { [ -s "$1" ] && alive "$(cat "$1")"; }   # pid_alive PIDFILE
# accounting as asked: slurm.conf names slurmdbd and it (and its MariaDB) run, or no accounting was asked for
acct_ok() {
  if [ "$ACCT" = 1 ]; then grep -q '^AccountingStorageType=accounting_storage/slurmdbd' "$SLURM_CONF" &&
    pid_alive "$BASE/run/slurmdbd.pid" && pid_alive "$DB/mysqld.pid"
  else grep -q '^AccountingStorageType=accounting_storage/none' "$SLURM_CONF"; fi
}
# (sinfo retries for ~9 s when no controller answers, so ask only when ours is running)
if [ -s "$SLURM_CONF" ] && pid_alive "$BASE/run/slurmctld.pid" && acct_ok; then
  case "$(node_state)" in idle*|mix*|alloc*|comp*)   # answers and accepts jobs: leave it alone
    echo "slurm already up"; echo "export SLURM_CONF=$SLURM_CONF"; exit 0;;
  esac
fi
[ "$(id -u)" = 0 ] || { echo "up.sh: must run as root to install/start Slurm (or point SLURM_CONF at a cluster)" >&2; exit 2; }

# 0) packages, only when missing (apt lists refreshed only then)
missing=""
pkgs="slurmctld slurmd slurm-client munge"; [ "$ACCT" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
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
for f in "$BASE"/run/slurmd-*.pid "$BASE"/run/slurmctld.pid "$BASE/run/slurmdbd.pid" "$DB/mysqld.pid"; do
  if pid_alive "$f"; then kill "$(cat "$f")" 2>/dev/null || true; sleep 0.5; fi
done
rm -f "$BASE"/run/*.pid   # (stale ones would name unrelated processes to down.sh)
# fresh controller state (job ids restart at 1) and accounting database (else sacct mixes old and new jobs)
rm -rf "$BASE/state" "$BASE/spool" "$DB"
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
if [ "$ACCT" = 1 ]; then
  # jobacct_gather/linux reads /proc (no cgroups needed): sacct also shows CPU time and MaxRSS
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
cat > "$SLURM_CONF" <<CONF
ClusterName=$CLUSTER
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
$ACCT_LINES
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
# a request the partition cannot meet (more CPUs/memory/nodes/time than it has) is refused by sbatch
EnforcePartLimits=ALL
${NODE_LINES}PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

# 4) accounting: a private MariaDB (datadir under $BASE, TCP on 127.0.0.1:$DB_PORT), then slurmdbd (it reads
#    slurmdbd.conf from the directory of $SLURM_CONF; the file must be 0600 and owned by its SlurmUser)
if [ "$ACCT" = 1 ]; then
  mkdir -p "$DB"
  mariadb-install-db --no-defaults --user=root --datadir="$DB/data" --auth-root-authentication-method=socket \
    --skip-test-db --skip-name-resolve >"$DB/install.log" 2>&1 || { cat "$DB/install.log" >&2; exit 1; }
  # setsid + no tty: it outlives this script; mariadbd writes its own pid file
  setsid mariadbd --no-defaults --user=root --datadir="$DB/data" --socket="$DB/mysql.sock" \
    --pid-file="$DB/mysqld.pid" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --log-error="$DB/error.log" \
    </dev/null >/dev/null 2>&1 &
  sql() { mariadb --no-defaults --socket="$DB/mysql.sock" -uroot -e "$1"; }
  for _ in $(seq 1 100); do sql "SELECT 1" >/dev/null 2>&1 && break; sleep 0.1; done
  sql "SELECT 1" >/dev/null || { echo "up.sh: MariaDB did not start; log:" >&2; tail -n 20 "$DB/error.log" >&2; exit 1; }
  sql "CREATE DATABASE slurm_acct_db; CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  DBD_CONF=$BASE/etc/slurmdbd.conf
  ( umask 077; cat > "$DBD_CONF" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
  )
  chown root:root "$DBD_CONF"; chmod 600 "$DBD_CONF"
  slurmdbd                                            # forks; finds slurmdbd.conf next to $SLURM_CONF
  # register the cluster before slurmctld starts (sacctmgr reaches slurmdbd via slurm.conf's port)
  for _ in $(seq 1 100); do timeout 10 sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.1; done
  timeout 10 sacctmgr -i add cluster "$CLUSTER" >/dev/null || {
    echo "up.sh: slurmdbd does not answer; last log lines:" >&2; tail -n 20 "$BASE/log/slurmdbd.log" >&2; exit 1; }
fi

# 5) daemons (they fork; PIDs in $BASE/run/*.pid)
slurmctld -f "$SLURM_CONF"
for n in "${NODES[@]}"; do slurmd -f "$SLURM_CONF" -N "$n"; done

# 6) wait until every node is idle
for _ in $(seq 1 120); do [ "$(node_state)" = idle ] && break; sleep 0.25; done
if [ "$(node_state)" != idle ]; then
  echo "up.sh: slurm nodes not idle ($(node_state)); last log lines:" >&2; tail -n 20 "$BASE"/log/*.log >&2; exit 1
fi
sinfo
echo "export SLURM_CONF=$SLURM_CONF"
