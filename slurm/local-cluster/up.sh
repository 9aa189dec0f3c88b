#!/usr/bin/env bash
# Bring up a real SLURM cluster on this machine for tests: munge, MariaDB + slurmdbd (so sacct and
# submitit's job states work), slurmctld and one slurmd per node (n1..nN, all on 127.0.0.1, CPUs=2).
# Idempotent: daemons already running are left alone; a second run takes well under a second.
# Root only; works on a fresh Debian (runs install.sh when the packages are missing).
#   EBMSCALE_SLURM_NODES=3 (2..9)  EBMSCALE_SLURM_CPUS=2  EBMSCALE_SLURM_MEM_MB=4000
# Stop with down.sh (by pid). Logs: /var/log/slurm/. Test: sinfo; srun -N2 hostname.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES=${EBMSCALE_SLURM_NODES:-3}
CPUS=${EBMSCALE_SLURM_CPUS:-2}
MEM=${EBMSCALE_SLURM_MEM_MB:-4000}
CLUSTER=ebmtest
RUN=/run/ebmscale-slurm
LOG=/var/log/slurm
ETC=/etc/slurm
DBPASS=ebmscale-local
t0=${EPOCHREALTIME/,/.}
say() { echo "local-cluster/up.sh: $*"; }
die() { echo "local-cluster/up.sh: ERROR: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "must run as root"
[[ $NODES =~ ^[1-9]$ ]] || die "EBMSCALE_SLURM_NODES must be 1..9, got '$NODES'"
bash "$HERE/install.sh" >/dev/null

# alive PIDFILE COMM: the pid file names a live process with that command name
alive() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(cat "$1") && [[ -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$2"* ]]
}
# wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.1 s
wait_for() {
  local _tries=$(( $1 * 10 )) _what=$2 _i; shift 2
  for ((_i = 0; _i < _tries; _i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$_what did not come up within ${_tries}00 ms; see $LOG/"
}

install -d -m 0755 $RUN $LOG /var/lib/slurm/slurmctld
install -d -o munge -g munge -m 0755 /run/munge
install -d -o mysql -g mysql -m 0755 /run/mysqld

# --- node names must resolve (the rendezvous uses the first host of the node list) ---
names=(); for ((k = 1; k <= NODES; k++)); do names+=("n$k"); done
for n in "${names[@]}"; do
  if ! getent hosts "$n" >/dev/null; then
    echo "127.0.0.1 ${names[*]}  # ebmscale local SLURM test cluster" >> /etc/hosts
    break
  fi
done

# --- munge ---
if [[ ! -s /etc/munge/munge.key ]]; then
  if command -v mungekey >/dev/null; then runuser -u munge -- mungekey --create --keyfile /etc/munge/munge.key
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
if ! alive /run/munge/munged.pid munged; then
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  wait_for 10 munged bash -c 'munge -n | unmunge'
fi

# --- MariaDB (accounting store for slurmdbd), unix socket only ---
if [[ ! -d /var/lib/mysql/mysql ]]; then
  mariadb-install-db --user=mysql --datadir=/var/lib/mysql >$LOG/mariadb-install.log 2>&1
fi
if ! alive /run/mysqld/mysqld.pid mariadbd; then
  setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --skip-networking \
    --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid \
    --innodb-buffer-pool-size=64M --log-error=$LOG/mariadb.log </dev/null >/dev/null 2>&1 &
  wait_for 30 mariadb mysqladmin --socket=/run/mysqld/mysqld.sock ping
  wait_for 10 mariadb-pidfile test -s /run/mysqld/mysqld.pid
fi
mysql --socket=/run/mysqld/mysqld.sock -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

# --- configs ---
nodelines=""
for ((k = 1; k <= NODES; k++)); do
  nodelines+="NodeName=n$k NodeAddr=127.0.0.1 Port=$((17000 + k)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"$'\n'
done
conf="# Written by ebmscale slurm/local-cluster/up.sh: a test cluster on one machine.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
AuthType=auth/munge
AuthInfo=cred_expire=10
CommunicationParameters=NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
${nodelines}PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
"
dbdconf="AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
"
install -d -m 0755 $ETC
if ! printf '%s' "$conf" | cmp -s - $ETC/slurm.conf; then
  if alive $RUN/slurmctld.pid slurmctld; then
    say "slurm.conf changed: restarting slurmctld and slurmd"
    bash "$HERE/down.sh" --slurm-only >/dev/null
  fi
  printf '%s' "$conf" > $ETC/slurm.conf
fi
if ! printf '%s' "$dbdconf" | cmp -s - $ETC/slurmdbd.conf; then
  printf '%s' "$dbdconf" > $ETC/slurmdbd.conf
  chmod 0600 $ETC/slurmdbd.conf
fi

# --- slurmdbd, cluster registration ---
if ! alive $RUN/slurmdbd.pid slurmdbd; then
  /usr/sbin/slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
fi
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx $CLUSTER; then
  sacctmgr -i add cluster $CLUSTER >/dev/null
fi

# --- slurmctld and one slurmd per node ---
ctld_started=0
if ! alive $RUN/slurmctld.pid slurmctld; then
  /usr/sbin/slurmctld
  wait_for 30 slurmctld bash -c 'scontrol ping | grep -q UP'
  ctld_started=1
fi
if [[ $ctld_started == 1 ]]; then
  # jobs recovered from the saved state belong to an earlier session (their processes are gone); a
  # requeueable one would start again and hold the nodes: a freshly started test cluster starts empty
  leftover=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [[ -n ${leftover// } ]]; then scancel $leftover 2>/dev/null || true; say "cancelled leftover jobs: $leftover"; fi
fi
for n in "${names[@]}"; do
  install -d -m 0755 /var/spool/slurmd-$n
  if ! alive $RUN/slurmd-$n.pid slurmd; then /usr/sbin/slurmd -N "$n"; fi
done
nodes_idle() {
  local states; states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  local node
  for node in "${names[@]}"; do
    grep -Eq "^$node (idle|mix|alloc)" <<<"$states" || { grep -Eq "^$node (down|drain)" <<<"$states" \
      && scontrol update nodename="$node" state=resume 2>/dev/null; return 1; }
  done
}
wait_for 30 "slurmd on ${names[*]}" nodes_idle
say "cluster '$CLUSTER' up: ${NODES} nodes (n1..n$NODES, $CPUS CPUs each) in $(awk -v a="$t0" -v b="${EPOCHREALTIME/,/.}" 'BEGIN{printf "%.1f", b-a}') s"
sinfo
