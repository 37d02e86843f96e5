#!/usr/bin/env bash
# Stop what slurm/local/up.sh started, by PID: jobs, slurmd, slurmctld, slurmdbd and its MariaDB (pid files
# under SLURM_BASE), and munged if up.sh started it
# (STOP_MUNGE=1 / 0 forces stopping / keeping it; another cluster on this machine may share it).
set -u
BASE=${SLURM_BASE:-/tmp/hpcgan-slurm}
export SLURM_CONF=$BASE/etc/slurm.conf
# alive = exists and is not a zombie (PID 1 in some containers reaps re-parented daemons late)
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${s#Z}" = "$s" ]; }
stop() {  # stop PID... : SIGTERM, wait up to 10 s, then SIGKILL
  local p any; [ $# -gt 0 ] || return 0
  kill "$@" 2>/dev/null
  for _ in $(seq 1 100); do
    any=0; for p in "$@"; do alive "$p" && any=1; done
    [ $any = 0 ] && return 0; sleep 0.1
  done
  for p in "$@"; do alive "$p" && kill -9 "$p" 2>/dev/null; done
  return 0
}
pid_in() { [ -s "$1" ] && cat "$1"; }
[ -s "$SLURM_CONF" ] && timeout 10 scancel --user="$(id -un)" --quiet 2>/dev/null
p=(); for f in "$BASE"/run/slurmd-*.pid "$BASE"/run/slurmctld.pid; do x=$(pid_in "$f") && p+=("$x"); done
stop "${p[@]}"
x=$(pid_in "$BASE/run/slurmdbd.pid") && stop "$x"     # after slurmctld: it sends its last records there
x=$(pid_in "$BASE/mysql/mysqld.pid") && stop "$x"
rm -f "$BASE"/run/*.pid "$BASE/mysql/mysqld.pid"
STOP_MUNGE=${STOP_MUNGE:-$([ -e "$BASE/run/munged.ours" ] && echo 1 || echo 0)}
if [ "$STOP_MUNGE" = 1 ] && x=$(pid_in /run/munge/munged.pid); then stop "$x"; fi
rm -f "$BASE/run/munged.ours"
exit 0
