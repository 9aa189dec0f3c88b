#!/usr/bin/env bash
# Stop the local SLURM test cluster started by up.sh, each daemon by its pid file.
#   down.sh               stop everything (slurmd, slurmctld, slurmdbd, MariaDB, munged)
#   down.sh --slurm-only  stop slurmd and slurmctld (up.sh uses it after a config change)
#   down.sh --purge       also delete the job state, spool folders and the accounting database
set -uo pipefail
RUN=/run/ebmscale-slurm
mode=${1:-all}
stop() {  # stop PIDFILE COMM
  local f=$1 comm=$2 p
  [[ -s $f ]] || return 0
  p=$(cat "$f")
  if [[ -r /proc/$p/comm && $(cat /proc/$p/comm) == "$comm"* ]]; then
    kill "$p" 2>/dev/null
    for ((i = 0; i < 100; i++)); do [[ -d /proc/$p ]] || break; sleep 0.1; done
    [[ -d /proc/$p ]] && kill -9 "$p" 2>/dev/null
    echo "local-cluster/down.sh: stopped $comm (pid $p)"
  fi
  rm -f "$f"
}
for f in $RUN/slurmd-*.pid; do [[ -e $f ]] && stop "$f" slurmd; done
stop $RUN/slurmctld.pid slurmctld
[[ $mode == --slurm-only ]] && exit 0
stop $RUN/slurmdbd.pid slurmdbd
stop /run/mysqld/mysqld.pid mariadbd
stop /run/munge/munged.pid munged
if [[ $mode == --purge ]]; then
  rm -rf /var/lib/slurm/slurmctld/* /var/spool/slurmd-n*
  rm -rf /var/lib/mysql/slurm_acct_db
  echo "local-cluster/down.sh: purged job state and accounting database"
fi
exit 0
