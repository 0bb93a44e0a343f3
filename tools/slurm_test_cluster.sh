#!/usr/bin/env bash
# A private one-node SLURM cluster for part_distillation's SLURM tests (tests/test_launch.py).
#
#   tools/slurm_test_cluster.sh start    # idempotent; first run installs the Debian packages
#   tools/slurm_test_cluster.sh status   # exit 0 when the controller answers and the node is usable
#   tools/slurm_test_cluster.sh stop     # cancel jobs, stop only the daemons this script started
#
# Runs as root on a machine without systemd: munged, MariaDB, slurmdbd (so that sacct and
# submitit's job states work), slurmctld and slurmd are started by hand on 127.0.0.1. Every
# file lives under $PD_SLURM_BASE (default /tmp/pd-slurm): configuration copies, state,
# logs, pid files. SLURM's clients only read /etc/slurm/{slurm,slurmdbd}.conf, so those two
# are (re)written from the copies when they differ. `stop` kills a daemon only when its pid
# file (written under the base dir) names a live process of the expected command.
#
# To start over from nothing: stop, then `rm -rf $PD_SLURM_BASE` (job ids restart at 1).
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

BASE=${PD_SLURM_BASE:-/tmp/pd-slurm}
HOST=$(hostname -s)
CLUSTER=pdtest
DB_PORT=${PD_SLURM_DB_PORT:-3317}
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
MY_CNF="$BASE/etc/my.cnf"

say() { echo "[slurm_test_cluster] $*"; }
die() { echo "[slurm_test_cluster] error: $*" >&2; exit 1; }

# pid_alive PIDFILE COMM: the pid file names a live process whose command is COMM
pid_alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# wait_until SECONDS CMD...: poll CMD every 0.25 s until it succeeds or time runs out
wait_until() {
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.25
  done
}

# Daemons this script may start: name, pid file, process name (/proc/PID/comm).
DAEMONS=(
  "slurmd     $BASE/run/slurmd.pid        slurmd"
  "slurmctld  $BASE/run/slurmctld.pid     slurmctld"
  "slurmdbd   $BASE/run/slurmdbd.pid      slurmdbd"
  "mariadb    $BASE/mysql/mysqld.pid      mariadbd"
  "munged     $BASE/run/munge/munged.pid  munged"
)

install_packages() {
  local installed
  installed=$(dpkg-query -W -f='${Status}\n' "${PACKAGES[@]}" 2>/dev/null | grep -c 'ok installed' || true)
  [ "$installed" = "${#PACKAGES[@]}" ] && return 0
  say "installing ${PACKAGES[*]} (log: $BASE.apt.log)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } \
    >"$BASE.apt.log" 2>&1 || die "apt-get failed, see $BASE.apt.log"
}

# install_if_changed SRC DEST MODE: copy SRC over DEST when they differ; return 0 if copied
install_if_changed() {
  cmp -s "$1" "$2" && return 1
  install -D -m "$3" "$1" "$2"
}

write_configs() {
  mkdir -p "$BASE"/{etc,state/ctld,state/d,log,run}
  install -d -o munge -g munge /run/munge "$BASE/run/munge"
  install -d -o mysql -g mysql "$BASE/mysql"
  # Both cgroup hierarchies are mounted in these sandboxes and systemd is absent, so no
  # cgroup plugins: linuxproc tracks processes, task/none binds nothing. Accounting goes to
  # slurmdbd, otherwise sacct fails and submitit cannot tell a cancelled job from a lost one.
  cat >"$BASE/etc/slurm.conf" <<EOF
# written by part_distillation tools/slurm_test_cluster.sh (base $BASE)
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# a requeued job waits cred_expire + 1 s before it may start again (default 120 s)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
MailProg=/bin/true
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobRequeue=1
KillWait=5
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 $(slurmd -C | head -1 | cut -d' ' -f2-) State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$BASE/etc/slurmdbd.conf" <<EOF
# written by part_distillation tools/slurm_test_cluster.sh (base $BASE)
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
SlurmUser=root
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=pdslurmdb
EOF
  cat >"$MY_CNF" <<EOF
[mariadbd]
user=mysql
datadir=$BASE/mysql/data
socket=$BASE/mysql/mysqld.sock
pid-file=$BASE/mysql/mysqld.pid
log-error=$BASE/mysql/mariadb.log
bind-address=127.0.0.1
port=$DB_PORT
skip-name-resolve
innodb_lock_wait_timeout=900
[client]
socket=$BASE/mysql/mysqld.sock
EOF
  SLURM_CONF_CHANGED=0
  if install_if_changed "$BASE/etc/slurm.conf" /etc/slurm/slurm.conf 644; then SLURM_CONF_CHANGED=1; fi
  install_if_changed "$BASE/etc/slurmdbd.conf" /etc/slurm/slurmdbd.conf 600 || true
}

start_munge() {
  [ -s /etc/munge/munge.key ] || { mungekey -c; chown munge: /etc/munge/munge.key; }
  if ! (munge -n | unmunge) >/dev/null 2>&1; then  # a munged that works is fine, whoever owns it
    say "starting munged"
    runuser -u munge -- munged --pid-file="$BASE/run/munge/munged.pid"
    wait_until 20 sh -c 'munge -n | unmunge' || die "munged does not answer"
  fi
}

start_mariadb() {
  if [ ! -d "$BASE/mysql/data/mysql" ]; then
    say "initialising MariaDB in $BASE/mysql/data"
    mariadb-install-db --defaults-file="$MY_CNF" >"$BASE/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed, see $BASE/log/mariadb-install.log"
  fi
  if ! pid_alive "$BASE/mysql/mysqld.pid" mariadbd; then
    say "starting mariadbd on 127.0.0.1:$DB_PORT"
    setsid mariadbd --defaults-file="$MY_CNF" </dev/null >/dev/null 2>&1 &
  fi
  wait_until 60 mariadb-admin --defaults-file="$MY_CNF" ping || die "mariadbd does not answer, see $BASE/mysql/mariadb.log"
  mariadb --defaults-file="$MY_CNF" -e "
    CREATE USER IF NOT EXISTS slurm@'127.0.0.1' IDENTIFIED BY 'pdslurmdb';
    GRANT ALL ON slurm_acct_db.* TO slurm@'127.0.0.1';"
}

start_slurmdbd() {
  if ! pid_alive "$BASE/run/slurmdbd.pid" slurmdbd; then
    say "starting slurmdbd"
    slurmdbd
  fi
  wait_until 60 sacctmgr -n list cluster || die "slurmdbd does not answer, see $BASE/log/slurmdbd.log"
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" \
    || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

start_slurm_daemons() {
  if ! pid_alive "$BASE/run/slurmctld.pid" slurmctld; then
    say "starting slurmctld"
    slurmctld
  elif [ "$SLURM_CONF_CHANGED" = 1 ]; then
    say "slurm.conf changed: scontrol reconfigure"
    scontrol reconfigure
  fi
  wait_until 30 scontrol ping || die "slurmctld does not answer, see $BASE/log/slurmctld.log"
  if ! pid_alive "$BASE/run/slurmd.pid" slurmd; then
    say "starting slurmd"
    slurmd
  fi
}

node_usable() {
  case $(sinfo -h -n "$HOST" -o %T 2>/dev/null) in
    idle|mixed|allocated|completing) return 0 ;;
    down*|drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 ;;
  esac
  return 1
}

smoke_job() {
  local jid
  jid=$(sbatch --parsable -J pd-smoke -t 1 -o /dev/null --wrap true) || die "sbatch failed"
  # also absorbs the few seconds the first batch job waits after slurmctld starts
  wait_until 60 sh -c "scontrol show job $jid -o | grep -q JobState=COMPLETED" \
    || die "smoke job $jid did not complete: $(scontrol show job "$jid" -o 2>&1 | grep -o 'JobState=[A-Z_]*')"
}

foreign_controller() {
  # a controller answers but is not the one whose pid file this script wrote
  scontrol ping >/dev/null 2>&1 && ! pid_alive "$BASE/run/slurmctld.pid" slurmctld
}

cmd_start() {
  [ "$(id -u)" = 0 ] || die "must run as root (installs packages, writes /etc/slurm)"
  local t0=$SECONDS
  mkdir -p "$(dirname "$BASE")"
  install_packages
  if foreign_controller; then
    die "a SLURM controller not started from $BASE is already running; stop it first (or set PD_SLURM_BASE to its base)"
  fi
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm_daemons
  wait_until 60 node_usable || die "node $HOST not usable: $(sinfo -h -o %T 2>&1), see $BASE/log/slurmd.log"
  smoke_job
  say "up in $((SECONDS - t0)) s (base $BASE)"
  sinfo
}

cmd_stop() {
  set +e
  if pid_alive "$BASE/run/slurmctld.pid" slurmctld && scontrol ping >/dev/null 2>&1; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null
      wait_until 15 sh -c '[ -z "$(squeue -h -o %A)" ]'
    fi
  fi
  local entry name pidfile comm pid
  for entry in "${DAEMONS[@]}"; do
    read -r name pidfile comm <<<"$entry"
    if pid_alive "$pidfile" "$comm"; then
      pid=$(cat "$pidfile")
      say "stopping $name (pid $pid)"
      kill -TERM "$pid"
      wait_until 30 sh -c "! kill -0 $pid" || { say "$name did not exit, SIGKILL"; kill -KILL "$pid"; }
    fi
    # the process is gone (or never was ours): the pid file is stale either way
    rm -f "$pidfile"
  done
  return 0
}

cmd_status() {
  local entry name pidfile comm ok=0
  for entry in "${DAEMONS[@]}"; do
    read -r name pidfile comm <<<"$entry"
    if pid_alive "$pidfile" "$comm"; then
      printf '%-10s running (pid %s)\n' "$name" "$(cat "$pidfile")"
    else
      printf '%-10s not started by this script\n' "$name"
    fi
  done
  if scontrol ping >/dev/null 2>&1; then
    echo "controller: $(scontrol ping | head -1)"
    sinfo
    squeue
    node_usable || ok=1
  else
    echo "controller: not reachable"
    ok=1
  fi
  return $ok
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status   (base: \$PD_SLURM_BASE, default /tmp/pd-slurm)" >&2; exit 2 ;;
esac
