#!/usr/bin/env bash
# A throw-away SLURM cluster on this one machine, for the launcher's integration tests:
# munged + slurmctld + N slurmd "nodes" (node1..nodeN), all on 127.0.0.1, one slurmd per port
# (Debian's slurmd is built with multiple-slurmd support).
#
#   tests/slurm/cluster.sh start    install what is missing (apt), start what is not running; idempotent
#   tests/slurm/cluster.sh stop     cancel the cluster's jobs, stop the daemons this script started
#   tests/slurm/cluster.sh status   exit 0 when the cluster answers and all nodes are up
#
# Only processes named in this cluster's pid files are signalled (after checking /proc/PID/cmdline).
# start adds "127.0.0.1 node1 .. nodeN  # reid-slurm" to /etc/hosts (node names are the job's
# MASTER_ADDR) and links /etc/slurm/slurm.conf to the rendered conf (submitit's in-job
# `scontrol requeue` must find it); `stop --purge` removes both and the state directory.
#
# Settings (environment): REID_SLURM_BASE (/tmp/reid-slurm), REID_SLURM_NODES (2),
# REID_SLURM_CPUS (2 per node; may exceed the real cores), REID_SLURM_MEM_MB (8000),
# REID_SLURM_CTLD_PORT (6817), REID_SLURM_SLURMD_PORT (6821: first slurmd; the others follow).
set -euo pipefail

BASE="${REID_SLURM_BASE:-/tmp/reid-slurm}"
NODES="${REID_SLURM_NODES:-2}"
CPUS="${REID_SLURM_CPUS:-2}"
MEM="${REID_SLURM_MEM_MB:-8000}"
CTLD_PORT="${REID_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${REID_SLURM_SLURMD_PORT:-6821}"
CONF="$BASE/slurm.conf"
MARK="# reid-slurm"
export SLURM_CONF="$CONF"

say() { echo "[reid-slurm] $*"; }
die() { echo "[reid-slurm] error: $*" >&2; exit 1; }

# pid_of PIDFILE NAME: print the pid recorded in PIDFILE if that process is alive and runs NAME
pid_of() {
  local pid
  [ -s "$1" ] || return 1
  pid="$(tr -dc 0-9 < "$1")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$2" || return 1
  echo "$pid"
}

# wait_until SECONDS WHAT CMD...: poll CMD every 0.2 s
wait_until() {
  local deadline=$(( $(date +%s) + $1 )) what="$2"
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out waiting for $what (logs in $BASE/log)"
    sleep 0.2
  done
}

node_names() { local i; for i in $(seq 1 "$NODES"); do printf 'node%s ' "$i"; done; }

nodes_up() {
  [ "$(sinfo -h -N -t idle,mixed,allocated -o %N 2>/dev/null | sort -u | wc -l)" -ge "$NODES" ]
}

render_conf() {
  local i list
  list="$(node_names | xargs | tr ' ' ',')"
  cat <<EOF
# Rendered by tests/slurm/cluster.sh: a local test cluster, every node on 127.0.0.1.
ClusterName=reidlocal
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job is held for cred_expire seconds (default 120) before it may start again.
AuthInfo=cred_expire=5
# Schedule every second, so requeued and pending jobs start promptly.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No cgroups: processes are tracked through /proc, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
# SIGTERM -> SIGKILL delay on cancel, requeue and time limit (default 30 s).
KillWait=5
MailProg=/bin/true
ReturnToService=2
# The declared CPUs/memory may exceed this machine's (oversubscription for tests).
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
EOF
  for i in $(seq 1 "$NODES"); do
    echo "NodeName=node$i NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i - 1)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=$list Default=YES MaxTime=INFINITE State=UP"
}

install_packages() {
  local missing=0 cmd
  for cmd in slurmctld slurmd sbatch munged munge setpriv; do command -v "$cmd" >/dev/null || missing=1; done
  [ "$missing" = 0 ] && return 0
  command -v apt-get >/dev/null || die "slurm is not installed and apt-get is not available"
  say "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge util-linux >/dev/null
}

start_munge() {
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged is already answering (ours or the machine's): reuse it
  fi
  # munged runs as user munge, so its pid file lives in a folder that user owns
  install -d -o munge -g munge -m 0755 "$BASE/run/munge"
  rm -f "$BASE/run/munge/munged.pid"
  setsid nohup setpriv --reuid=munge --regid=munge --clear-groups \
    /usr/sbin/munged -F --force --pid-file="$BASE/run/munge/munged.pid" \
    >"$BASE/log/munged.out" 2>&1 </dev/null &
  wait_until 10 munged bash -c 'munge -n | unmunge'
  wait_until 5 "munged pid file" test -s "$BASE/run/munge/munged.pid"
  touch "$BASE/run/munged.ours"
}

setup_etc() {
  local line tmp
  mkdir -p /etc/slurm
  if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
    mv /etc/slurm/slurm.conf "/etc/slurm/slurm.conf.orig.$(date +%s)"
  fi
  ln -sfn "$CONF" /etc/slurm/slurm.conf
  line="127.0.0.1 $(node_names)$MARK"
  if ! grep -qxF "$line" /etc/hosts; then
    # /etc/hosts may be a bind mount: rewrite it in place rather than replacing the file
    tmp="$(grep -vF "$MARK" /etc/hosts || true)"
    printf '%s\n%s\n' "$tmp" "$line" > /etc/hosts
  fi
}

cmd_start() {
  local new i n running=0
  [ "$(id -u)" = 0 ] || die "must run as root (installs packages, starts daemons)"
  install_packages
  mkdir -p "$BASE"/{state,log,run,spool}
  start_munge
  new="$(render_conf)"
  pid_of "$BASE/run/slurmctld.pid" slurmctld >/dev/null && running=1
  if [ "$running" = 1 ] && [ "$new" != "$(cat "$CONF" 2>/dev/null)" ]; then
    say "configuration changed: restarting"
    KEEP_MUNGE=1 cmd_stop
    running=0
  fi
  printf '%s\n' "$new" > "$CONF"
  for i in $(seq 1 "$NODES"); do mkdir -p "$BASE/spool/node$i"; done
  setup_etc
  if [ "$running" = 0 ]; then
    rm -f "$BASE/run/slurmctld.pid"
    setsid nohup slurmctld -D -f "$CONF" >"$BASE/log/slurmctld.out" 2>&1 </dev/null &
    wait_until 30 slurmctld bash -c "scontrol ping | grep -q 'is UP'"
  fi
  for i in $(seq 1 "$NODES"); do
    n="node$i"
    pid_of "$BASE/run/slurmd-$n.pid" slurmd >/dev/null && continue
    rm -f "$BASE/run/slurmd-$n.pid"
    setsid nohup slurmd -D -N "$n" -f "$CONF" >"$BASE/log/slurmd-$n.out" 2>&1 </dev/null &
  done
  wait_until 60 "$NODES nodes" nodes_up
  say "up: $(sinfo -h -o '%P %D %T %N' | tr '\n' ' ')(SLURM_CONF=$CONF)"
}

# stop_all NAME PIDFILE...: SIGTERM every live one at once, SIGKILL what is left after 10 s
stop_all() {
  local name="$1" pf pid i left
  shift
  local pids=()
  for pf in "$@"; do
    if pid="$(pid_of "$pf" "$name")"; then kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); fi
    rm -f "$pf"
  done
  [ "${#pids[@]}" -gt 0 ] || return 0
  for i in $(seq 1 100); do
    left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null; done
  say "stopped $name (${pids[*]})"
}

cmd_stop() {
  local jobs i tmp
  if [ -f "$CONF" ] && pid_of "$BASE/run/slurmctld.pid" slurmctld >/dev/null; then
    jobs="$(squeue -h -o %A 2>/dev/null | xargs || true)"
    if [ -n "$jobs" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for i in $(seq 1 75); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  stop_all slurmd "$BASE"/run/slurmd-*.pid
  stop_all slurmctld "$BASE/run/slurmctld.pid"
  if [ -f "$BASE/run/munged.ours" ] && [ "${KEEP_MUNGE:-0}" != 1 ]; then
    stop_all munged "$BASE/run/munge/munged.pid"
    rm -f "$BASE/run/munged.ours"
  fi
  if [ "${1:-}" = "--purge" ]; then
    [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ] && rm -f /etc/slurm/slurm.conf
    if grep -qF "$MARK" /etc/hosts; then
      tmp="$(grep -vF "$MARK" /etc/hosts || true)"
      printf '%s\n' "$tmp" > /etc/hosts
    fi
    rm -rf "$BASE"
    say "purged $BASE"
  fi
}

cmd_status() {
  pid_of "$BASE/run/slurmctld.pid" slurmctld >/dev/null || { say "down"; return 1; }
  scontrol ping 2>/dev/null | grep -q 'is UP' || { say "slurmctld not answering"; return 1; }
  nodes_up || { say "not all $NODES nodes are up"; sinfo 2>/dev/null || true; return 1; }
  say "up: $(sinfo -h -o '%P %D %T %N' | tr '\n' ' ')(SLURM_CONF=$CONF)"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) shift; cmd_stop "$@" ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop [--purge]|status" >&2; exit 2 ;;
esac
