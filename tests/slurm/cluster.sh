#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests/test_slurm.py and for
# trying the sbatch templates by hand:
#
#   bash tests/slurm/cluster.sh start    # install (once), configure, start; idempotent
#   export SLURM_CONF=/tmp/moe_train_slurm/slurm.conf     # (start prints this line)
#   sbatch --nodes=2 --ntasks-per-node=2 --gpus-per-node=2 --cpus-per-task=1 \
#       slurm/train_multinode.sbatch configs/tiny_moe.yaml --set parallel.device=cpu ...
#   bash tests/slurm/cluster.sh status   # controller ping + sinfo; exit 1 when not up
#   bash tests/slurm/cluster.sh stop     # kills the daemons it started; idempotent
#
# Run as root (the daemons run as root; SlurmUser=root). On first use it installs
# Debian's Slurm and MUNGE (`apt-get update` once, then `apt-get install -y slurmctld
# slurmd slurm-client munge`), non-interactively.
#
# Layout: one slurmctld and two slurmd's (`slurmd -N n1`, `-N n2`) on 127.0.0.1, ports
# 17001-17002 (controller 16817), each node claiming 4 CPUs and 2 stand-in "GPUs"
# (gres/gpu backed by /dev/null and /dev/zero, so --gpus-per-node requests are scheduled
# as on a GPU cluster; there is no GPU behind them). n1 and n2 are added to /etc/hosts as 127.0.0.1 so
# that `MASTER_ADDR=$(first host of the nodelist)` resolves. Its own munged on a private
# socket (auth/munge); if munged cannot start, auth/none. Scheduler settings make a
# requeued job run again within ~15 s (cred_expire=10, 2 s scheduling interval), not
# after the default ~2 minutes. No slurmdbd, so no sacct: use `scontrol show job`.
#
# Environment: MOE_TRAIN_SLURM_DIR (work dir: config, state, logs; default
# /tmp/moe_train_slurm), MOE_TRAIN_SLURM_AUTH (munge | none; default munge with fallback).
set -uo pipefail

dir="${MOE_TRAIN_SLURM_DIR:-/tmp/moe_train_slurm}"
conf="$dir/slurm.conf"
nodes=(n1 n2)
ctld_port=16817
cpus_per_node=4
gpus_per_node=2   # gres.conf below names two device files

say() { echo "[slurm-cluster] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
# Exit 3: Slurm is missing and cannot be installed here (not root, no apt-get, apt-get
# failed); tests/test_slurm.py skips on it, and fails on any other error.
cannot_install() { say "CANNOT INSTALL: $*"; exit 3; }

export SLURM_CONF="$conf"

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---------------------------------------------------------------------------- install
install_slurm() {
  local missing=()
  for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || cannot_install "not root: cannot install Slurm (missing: ${missing[*]})"
  command -v apt-get >/dev/null 2>&1 || cannot_install "no apt-get: cannot install Slurm (missing: ${missing[*]})"
  say "installing Slurm and MUNGE with apt-get (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null >&2 || cannot_install "apt-get update failed"
  apt-get install -y -qq slurmctld slurmd slurm-client munge </dev/null >&2 \
    || cannot_install "apt-get install slurmctld slurmd slurm-client munge failed"
  for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null 2>&1 || die "$bin still missing after apt-get install"
  done
}

# ----------------------------------------------------------------------------- config
ensure_hosts() {
  local name
  for name in "${nodes[@]}"; do
    if ! getent hosts "$name" >/dev/null 2>&1; then
      echo "127.0.0.1 $name" >>/etc/hosts || die "cannot add $name to /etc/hosts"
      say "added '127.0.0.1 $name' to /etc/hosts"
    fi
  done
}

write_config() {
  local auth="$1" ctld_host
  ctld_host="$(hostname -s 2>/dev/null || hostname)"
  mkdir -p "$dir/ctld" "$dir/log" "$dir/run"
  for n in "${nodes[@]}"; do mkdir -p "$dir/slurmd/$n"; done
  local auth_lines
  if [ "$auth" = munge ]; then
    auth_lines="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=10"
  else
    auth_lines="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10"
  fi
  cat >"$conf" <<EOF
# Written by tests/slurm/cluster.sh: two logical nodes on 127.0.0.1.
ClusterName=moetrain
SlurmctldHost=$ctld_host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
$auth_lines
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/slurmd/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
# process-tree tracking: works in containers too (proctrack/cgroup needs a usable cgroup mount)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
MinJobAge=600
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$cpus_per_node Gres=gpu:$gpus_per_node State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  # Stand-in GPUs: Slurm 22.05 registers a gres/gpu only with a character device behind
  # it (a count-only gpu reports 0 and the node goes INVAL); /dev/null and /dev/zero are
  # two that exist everywhere. Nothing opens them (TaskPlugin=task/none, no cgroup device
  # constraint); jobs see CUDA_VISIBLE_DEVICES=0,1 and SLURM_GPUS_ON_NODE=2.
  cat >"$dir/gres.conf" <<EOF
Name=gpu File=/dev/null,/dev/zero
EOF
  cat >"$dir/cgroup.conf" <<EOF
CgroupAutomount=yes
EOF
}

# ---------------------------------------------------------------------------- daemons
start_munge() {
  mkdir -p "$dir/munge" "$dir/log"
  chmod 0700 "$dir/munge"
  if [ ! -s "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
    chmod 0400 "$dir/munge/munge.key"
  fi
  pid_alive "$dir/munge/munged.pid" && return 0
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket.2" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed" >>"$dir/log/munged.log" 2>&1 </dev/null || return 1
  for _ in $(seq 50); do
    [ -S "$dir/munge/munge.socket.2" ] && pid_alive "$dir/munge/munged.pid" && return 0
    sleep 0.1
  done
  return 1
}

up() {
  # The controller answers and every node is in a usable state. (Without a config file
  # the Slurm clients retry for 60 s before failing: check for it first.)
  [ -f "$conf" ] || return 1
  scontrol ping 2>/dev/null | grep -q "is UP" || return 1
  local states
  states="$(sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
  [ "$(echo "$states" | grep -cE ' (idle|mix|alloc|comp)$')" -eq ${#nodes[@]} ]
}

cmd_start() {
  if up; then
    say "already running ($conf)"
    echo "export SLURM_CONF=$conf"
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || cannot_install "must run as root (the Slurm daemons run as root here)"
  cmd_stop quiet
  install_slurm
  ensure_hosts
  local auth="${MOE_TRAIN_SLURM_AUTH:-munge}"
  if [ "$auth" = munge ] && ! start_munge; then
    say "WARNING: munged did not start (see $dir/log/munged.log); using auth/none"
    auth=none
  fi
  write_config "$auth"
  # -c: start with an empty state (no jobs left over from an earlier cluster).
  slurmctld -c -f "$conf" </dev/null >>"$dir/log/slurmctld.out" 2>&1 \
    || die "slurmctld failed to start; see $dir/log/slurmctld.log"
  for n in "${nodes[@]}"; do
    slurmd -f "$conf" -N "$n" </dev/null >>"$dir/log/slurmd-$n.out" 2>&1 \
      || die "slurmd -N $n failed to start; see $dir/log/slurmd-$n.log"
  done
  for _ in $(seq 300); do
    if up; then
      say "up: $(sinfo -h -o '%P %D nodes %t %N' | tr '\n' ' ')(auth/$auth, $conf)"
      echo "export SLURM_CONF=$conf"
      return 0
    fi
    sleep 0.1
  done
  say "nodes did not become idle within 30 s:"
  sinfo -N -l >&2 || true
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log"/slurmd-*.log >&2 2>/dev/null || true
  return 1
}

# The daemons' pids, from the pid files this script's daemons wrote.
daemon_pidfiles() {
  for n in "${nodes[@]}"; do echo "$dir/run/slurmd-$n.pid"; done
  echo "$dir/run/slurmctld.pid"
  echo "$dir/munge/munged.pid"
}

cmd_stop() {
  local quiet="${1:-}" file pid pids=()
  # Jobs first, so no training processes outlive the cluster (they get SIGTERM, then
  # SIGKILL after KillWait).
  if up; then
    local jobs
    jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null
      for _ in $(seq 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  while read -r file; do
    [ -f "$file" ] || continue
    pid="$(cat "$file")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
    rm -f "$file"
  done < <(daemon_pidfiles)
  for _ in $(seq 100); do
    local alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    pids=("${alive[@]}")
    [ ${#pids[@]} -eq 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  [ "$quiet" = quiet ] || say "stopped"
  return 0
}

cmd_status() {
  if [ ! -f "$conf" ]; then say "not configured ($conf missing)"; return 1; fi
  scontrol ping 2>&1 || true
  sinfo -N -l 2>&1 || true
  if up; then echo "export SLURM_CONF=$conf"; return 0; fi
  return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
