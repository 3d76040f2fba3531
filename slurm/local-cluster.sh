#!/usr/bin/env bash
# A REAL single-node SLURM cluster on this machine, from Debian's packages: munged, MariaDB,
# slurmdbd (accounting: submitit learns job states only through sacct), slurmctld, slurmd.
# Debian 12, root, no systemd and no cgroups needed.
#
#   slurm/local-cluster.sh start    install what is missing, write the config, start what is down,
#                                   wait until the node is idle (about 15 s from nothing; a no-op when up)
#   slurm/local-cluster.sh stop     stop the daemons this script started (by pid file), newest first
#   slurm/local-cluster.sh status   daemons and sinfo; exit 0 only when the cluster takes jobs
#
# Cluster "cap-local", one partition "debug" (slurm/local.yaml is its profile). Knobs:
#   CAP_SLURM_NODE_CPUS=N   advertise N CPUs instead of the detected layout (oversubscription)
#   CAP_SLURM_APT_UPDATE=0  skip `apt-get update` before installing missing packages
set -euo pipefail

ACTION=${1:-start}
CLUSTER=cap-local
PARTITION=debug
ETC=/etc/slurm SPOOL=/var/spool/slurm LOGDIR=/var/log/slurm
MYSQL_RUN=/run/mysqld
MYSQL_SOCK=$MYSQL_RUN/mysqld.sock
DB_PASS=cap-local-slurmdbd   # a local-only account on 127.0.0.1 / the unix socket
# name:pidfile, in start order
DAEMONS=(munged:/run/munge/munged.pid mariadbd:$MYSQL_RUN/mysqld.pid slurmdbd:/run/slurmdbd.pid
         slurmctld:/run/slurmctld.pid slurmd:/run/slurmd.pid)

log() { printf '[local-cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The pid in $1 if that process is alive and is $2: a stale pid file (crash, reboot, reused pid) is not a daemon.
live_pid() {
  local p
  [ -s "$1" ] || return 1
  p=$(tr -dc '0-9' <"$1")
  [ -n "$p" ] && [ -d "/proc/$p" ] || return 1
  grep -qs -- "$2" "/proc/$p/comm" || grep -qsa -- "$2" "/proc/$p/cmdline" || return 1
  echo "$p"
}

pidfile_of() { local d; for d in "${DAEMONS[@]}"; do [ "${d%%:*}" = "$1" ] && echo "${d#*:}"; done; return 0; }

stop_daemon() {
  local f p
  f=$(pidfile_of "$1")
  if p=$(live_pid "$f" "$1"); then
    log "stopping $1 (pid $p)"
    kill "$p" 2>/dev/null || true
    for _ in $(seq 60); do [ -d "/proc/$p" ] || break; sleep 0.25; done
    [ -d "/proc/$p" ] && { log "$1 ignored SIGTERM for 15 s: SIGKILL"; kill -9 "$p" 2>/dev/null || true; }
  fi
  rm -f "$f"
}

node_state() { sinfo -h -n "$(hostname -s)" -o '%T' 2>/dev/null | head -1 || true; }

do_status() {
  local d n p rc=0
  for d in "${DAEMONS[@]}"; do
    n=${d%%:*}
    if p=$(live_pid "${d#*:}" "$n"); then echo "$n: running (pid $p)"; else echo "$n: not running"; rc=1; fi
  done
  command -v sinfo >/dev/null && [ -f $ETC/slurm.conf ] && sinfo 2>&1 || rc=1
  case "$(node_state)" in idle|mixed|allocated|completing) ;; *) rc=1 ;; esac
  return $rc
}

install_packages() {
  local pkgs=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server) missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} = 0 ] && return
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  [ "${CAP_SLURM_APT_UPDATE:-1}" = 1 ] && apt-get update -qq
  # without recommends: about 25 packages instead of 60 (no hdf5/rocm/ipmi plugins); no service starts (no systemd)
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/cap-local-cluster-apt.log 2>&1 \
    || { tail -20 /tmp/cap-local-cluster-apt.log >&2; die "apt-get install failed"; }
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -m 0700 /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key --force
  fi
  chown -R munge:munge /etc/munge; chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge   # /run is empty after a boot, and no systemd makes it
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  if ! live_pid /run/munge/munged.pid munged >/dev/null; then
    rm -f /run/munge/munged.pid
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged   # must run as the key's owner
  fi
  for _ in $(seq 40); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.25; done
  die "munge does not answer (/var/log/munge/munged.log)"
}

start_mariadb() {
  install -d -o mysql -g mysql -m 0755 $MYSQL_RUN
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/tmp/cap-mariadb-install.log 2>&1
  if ! mariadb-admin --socket=$MYSQL_SOCK ping >/dev/null 2>&1; then
    log "starting mariadbd"
    # not a daemon by itself: detach fully, so that a CI pipe is not held open by it
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=$MYSQL_RUN/mysqld.pid --socket=$MYSQL_SOCK \
      --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M </dev/null >>/var/log/cap-local-mariadb.log 2>&1 &
    for _ in $(seq 120); do mariadb-admin --socket=$MYSQL_SOCK ping >/dev/null 2>&1 && break; sleep 0.25; done
    mariadb-admin --socket=$MYSQL_SOCK ping >/dev/null 2>&1 || die "mariadbd did not start (/var/log/cap-local-mariadb.log)"
  fi
  mariadb --socket=$MYSQL_SOCK -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

# Writes $2 to $1 when it differs; returns 0 when it wrote.
write_if_changed() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ] && return 1; printf '%s\n' "$2" >"$1"; log "wrote $1"; }

write_config() {
  local host=$1 hw mem node overrides="" changed=1
  install -d -m 0755 $ETC $SPOOL/ctld $SPOOL/d $LOGDIR
  hw=$(slurmd -C | head -1)   # NodeName=x CPUs=2 Boards=1 SocketsPerBoard=1 ... RealMemory=24105
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  if [ -n "${CAP_SLURM_NODE_CPUS:-}" ]; then
    node="CPUs=$CAP_SLURM_NODE_CPUS"; overrides="SlurmdParameters=config_overrides"
  else
    node=$(grep -o 'CPUs=.*ThreadsPerCore=[0-9]*' <<<"$hw")   # the exact topology: no "reconfigured" drain
  fi
  write_if_changed $ETC/slurm.conf "# written by cap's slurm/local-cluster.sh: a single-node cluster for tests
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (default 120): short, for the requeue tests
AuthInfo=cred_expire=5
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
# no cgroups: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# look at pending jobs every few seconds (defaults 60/30 s): a requeued job starts again promptly
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# a job that can never run is refused at submit time instead of pending forever
EnforcePartLimits=ALL
$overrides
NodeName=$host NodeAddr=127.0.0.1 $node RealMemory=$((mem * 95 / 100)) State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP" || changed=0
  if write_if_changed $ETC/slurmdbd.conf "AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$LOGDIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db"; then changed=1; fi
  chmod 0600 $ETC/slurmdbd.conf   # slurmdbd refuses a readable config (it holds the password)
  if [ $changed = 1 ]; then       # daemons running on an old config are restarted
    stop_daemon slurmd; stop_daemon slurmctld; stop_daemon slurmdbd
  fi
}

start_slurm_daemon() {
  local f
  f=$(pidfile_of "$1")
  live_pid "$f" "$1" >/dev/null && return
  rm -f "$f"
  log "starting $1"
  "/usr/sbin/$1" || die "$1 did not start ($LOGDIR/$1.log)"   # forks into the background
  for _ in $(seq 40); do live_pid "$f" "$1" >/dev/null && return; sleep 0.25; done
  tail -20 "$LOGDIR/$1.log" >&2 || true
  die "$1 wrote no pid file"
}

do_start() {
  local t0=$SECONDS host state=""
  [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts system daemons)"
  install_packages
  host=$(hostname -s)
  # slurmd names itself by hostname, and submitit uses it as MASTER_ADDR
  getent hosts "$host" >/dev/null || { log "adding $host to /etc/hosts"; echo "127.0.0.1 $host" >>/etc/hosts; }
  start_munge
  start_mariadb
  write_config "$host"
  start_slurm_daemon slurmdbd
  for _ in $(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.25; done
  start_slurm_daemon slurmctld
  for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.25; done
  start_slurm_daemon slurmd
  for i in $(seq 240); do
    state=$(node_state)
    case "$state" in
      idle|mixed|allocated|completing) break ;;
      down*|drain*|fail*) [ $((i % 8)) = 0 ] && scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.25
  done
  case "$state" in idle|mixed|allocated|completing) ;; *) die "node $host is '$state' ($LOGDIR/slurmd.log)" ;; esac
  for _ in $(seq 40); do sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx $CLUSTER && break; sleep 0.25; done
  sacctmgr -n -P show cluster format=cluster | grep -qx $CLUSTER || die "slurmctld did not register with slurmdbd"
  log "cluster $CLUSTER up: node $host $state, partition $PARTITION ($((SECONDS - t0)) s); logs in $LOGDIR"
}

case "$ACTION" in
  start) do_start ;;
  stop) [ "$(id -u)" = 0 ] || die "must run as root"
        for d in slurmd slurmctld slurmdbd mariadbd munged; do stop_daemon $d; done ;;
  status) do_status ;;
  *) die "usage: $0 start|stop|status" ;;
esac
