#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (localhost), for testing the batch scripts.
#
#   sudo bash launch/slurm/local_cluster.sh install # apt-get install slurm-wlm munge, if missing
#   sudo bash launch/slurm/local_cluster.sh start   # install if needed, configure, start, wait idle
#   export SLURM_CONF=/tmp/mmpt-slurm/slurm.conf     # (printed by start) then sbatch/squeue/sinfo
#   sudo bash launch/slurm/local_cluster.sh status
#   sudo bash launch/slurm/local_cluster.sh stop
#
# Debian's slurm-wlm (22.05) and munge are installed with apt when missing. Everything the cluster
# writes (slurm.conf, state, spool, logs, pid files) lives in MMPT_SLURM_DIR (default
# /tmp/mmpt-slurm); /etc/slurm is left alone, so clients need SLURM_CONF pointing at our file.
# Needs root: slurmd runs jobs as their submitting user and munged owns the auth key. Made for
# containers: process tracking by process group and no cgroup plugins (cgroups are often not
# writable in a container).
set -euo pipefail

dir="${MMPT_SLURM_DIR:-/tmp/mmpt-slurm}"
conf="$dir/slurm.conf"
ctld_port="${MMPT_SLURMCTLD_PORT:-6817}"
slurmd_port="${MMPT_SLURMD_PORT:-6818}"

log() { echo "[local_cluster] $*" >&2; }
die() { echo "[local_cluster] error: $*" >&2; exit 1; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munged missing and no apt-get to install slurm-wlm and munge"
  log "installing slurm-wlm and munge with apt-get"
  apt-get update -q >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged is already answering
  fi
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  runuser -u munge -- munged --force
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  # The node line exactly as slurmd detects this machine (CPUs, sockets, cores, memory): a
  # node that reports less than its configured resources would be drained.
  local node
  node="$(slurmd -C | head -n 1)"
  [[ "$node" == NodeName=* ]] || die "slurmd -C did not print a node line: $node"
  local host="${node%% *}"
  host="${host#NodeName=}"
  cat > "$conf" <<EOF
# One-node test cluster written by launch/slurm/local_cluster.sh
ClusterName=mmptlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No cgroups in containers: track job processes by process group, no task affinity plugin.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A node that went down (e.g. slurmd restarted) comes back by itself once it registers.
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  [ "$(id -u)" = 0 ] || die "start needs root (slurmd and munged)"
  install_packages
  start_munge
  write_conf
  export SLURM_CONF="$conf"
  running "$dir/slurmctld.pid" || slurmctld -f "$conf"
  running "$dir/slurmd.pid" || slurmd -f "$conf"
  for _ in $(seq 150); do
    if [ "$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1)" = "idle" ]; then
      log "cluster up: $(sinfo -h -N -o '%N %T %c CPUs')"
      echo "export SLURM_CONF=$conf"
      return 0
    fi
    sleep 0.2
  done
  sinfo -N -l >&2 || true
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  die "the node did not become idle in 30 s (logs above, in $dir/log)"
}

stop_daemon() {
  local pidfile="$1" name="$2"
  running "$pidfile" || return 0
  local pid
  pid="$(cat "$pidfile")"
  kill "$pid"
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  log "$name ($pid) did not stop on SIGTERM; sending SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  # Cancel what still runs first: slurmstepd would outlive slurmd and keep the job's processes.
  if running "$dir/slurmctld.pid"; then
    export SLURM_CONF="$conf"
    scancel --partition=local 2>/dev/null || true
    for _ in $(seq 100); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  # munged stays up: it is shared by anything on the machine that uses munge.
  stop_daemon "$dir/slurmd.pid" slurmd
  stop_daemon "$dir/slurmctld.pid" slurmctld
}

status() {
  export SLURM_CONF="$conf"
  sinfo -N -l && squeue
}

case "${1:-}" in
  install)
    [ "$(id -u)" = 0 ] || die "installing slurm-wlm and munge needs root"
    install_packages ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status   (state in MMPT_SLURM_DIR=$dir)" >&2; exit 2 ;;
esac
