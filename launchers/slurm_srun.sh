#!/usr/bin/env bash
# Runs `python -m moe_train train ARGS...` inside a Slurm allocation (an sbatch script or
# an salloc shell): one srun task per GPU on every node of the job. No ssh, no hostfile,
# no launcher daemon: each task reads its rank from SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID; the rendezvous is the first node of the job.
#
#   bash launchers/slurm_srun.sh --config configs/moe_64e.yaml [--set a.b=c ...] [--resume ...]
#
# The slurm/*.sbatch templates exec this script, so it IS their batch shell; all the
# Slurm logic lives here:
#   * MASTER_ADDR = the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`,
#     MASTER_PORT = 20000 + SLURM_JOB_ID % 20000 (same on every node, stable across
#     requeues), exported for the tasks; never taken from the submitting shell.
#   * It prints the job header (job id, SLURM_RESTART_COUNT, nodes, tasks) and the exact
#     srun command, and runs srun verbosely (-v: which tasks run on which node, and each
#     task's exit status).
#   * Preemption: SIGUSR1 (from `#SBATCH --signal=B:USR1@120` before the time limit, or
#     `scancel --signal=USR1 --batch JOBID`) or SIGTERM to this shell is passed on to srun
#     AS SIGUSR1; srun relays SIGUSR1 to every task. (Never SIGTERM to srun: srun answers
#     SIGTERM by cancelling its step, and the tasks are killed without a grace period.)
#     The trainer stops at the next step boundary, every rank writes one checkpoint and
#     exits 85 (moe_train.train.control.EXIT_REQUEUE). Then, in a batch job that is still
#     running, this script runs `scontrol requeue $SLURM_JOB_ID` and exits 0; the requeued
#     job resumes from that checkpoint (`--resume auto`, the trainer's default). A job that
#     Slurm is ending (plain `scancel`: SIGTERM to every task, KillWait to finish; or
#     preemption, or the time limit itself) also checkpoints but is not requeued.
#   * Exit status: 0 when training finished (or a checkpoint was written and the job
#     requeued), 85 when a checkpoint was written but the job could not be requeued
#     (salloc, a cancelled job), otherwise srun's status: the highest task exit code.
#
# Environment:
#   NPROC_PER_NODE   tasks per node (default: SLURM_NTASKS_PER_NODE of the allocation,
#                    else its GPUs per node, else 1)
#   MOE_TRAIN_PYTHON the interpreter command (default: python; words are split, e.g.
#                    "apptainer exec train.sif python")
set -uo pipefail

_log() { echo "[slurm] $*" >&2; }

_slurm_require_allocation() {
  if [ -z "${SLURM_JOB_ID:-}" ] || [ -z "${SLURM_JOB_NODELIST:-}" ]; then
    _log "ERROR: not inside a Slurm allocation (SLURM_JOB_ID/SLURM_JOB_NODELIST unset): " \
         "submit with sbatch slurm/train_multinode.sbatch, or run this inside salloc"
    exit 2
  fi
}

# MASTER_ADDR / MASTER_PORT and the per-node task count, from Slurm's own variables.
_slurm_rendezvous() {
  local first
  first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)"
  if [ -z "$first" ]; then
    _log "ERROR: \`scontrol show hostnames $SLURM_JOB_NODELIST\` gave no host"
    exit 2
  fi
  export MASTER_ADDR="$first"
  export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
  # A RANK/WORLD_SIZE/LOCAL_RANK leaking from the submitting shell would win over Slurm's
  # variables in the trainer's rank discovery (torchrun's variables come first).
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK
  NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  local gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
  gpus="${gpus##*:}"   # --gpus-per-node=a100:4 -> 4
  if [ -n "${NPROC_PER_NODE:-}" ]; then
    TASKS_PER_NODE="$NPROC_PER_NODE"
  elif [[ "${SLURM_NTASKS_PER_NODE:-}" =~ ^[0-9]+$ ]]; then
    TASKS_PER_NODE="$SLURM_NTASKS_PER_NODE"
  elif [[ "$gpus" =~ ^[0-9]+$ ]] && [ "$gpus" -gt 0 ]; then
    TASKS_PER_NODE="$gpus"
  else
    TASKS_PER_NODE=1
  fi
}

_slurm_header() {
  _log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-?}) SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}" \
       "started $(date '+%F %T') on $(hostname)"
  _log "nodes ${SLURM_JOB_NODELIST} (${NNODES}), ${TASKS_PER_NODE} tasks per node," \
       "GPUs per node ${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-none}}," \
       "CPUs per task ${SLURM_CPUS_PER_TASK:-default}"
  _log "MASTER_ADDR=${MASTER_ADDR} (first host of the node list) MASTER_PORT=${MASTER_PORT}" \
       "(20000 + job id % 20000)"
}

# First thing: a SIGUSR1 or SIGTERM to this shell must not kill it (the default action)
# before srun runs; one that comes that early is remembered and training is not started.
_slurm_traps() {
  _STEP_PID=""
  _STOP_SIGNAL=""
  trap '_slurm_relay USR1' USR1
  trap '_slurm_relay TERM' TERM
}

# Runs "$@" (an srun command line) in the background, relays SIGUSR1/SIGTERM to it as
# SIGUSR1, waits for it (again after each signal: a trapped signal ends `wait` early) and
# sets SLURM_STEP_RC to its exit status.
_slurm_run_step() {
  if [ -n "$_STOP_SIGNAL" ]; then
    _log "SIG$_STOP_SIGNAL came before training started: not starting it (the newest checkpoint," \
         "if any, stays the one to resume from)"
    SLURM_STEP_RC=85
    _NOT_STARTED=1
    return
  fi
  # Print the exact command, quoted where a shell needs it, so it can be pasted.
  local quoted="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then quoted+=" $word"; else quoted+=" $(printf '%q' "$word")"; fi
  done
  echo "+ MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT${quoted}" >&2
  "$@" &
  _STEP_PID=$!
  # a signal between the two lines above found no srun to relay to
  [ -z "$_STOP_SIGNAL" ] || _slurm_relay "$_STOP_SIGNAL"
  local rc="" r
  while :; do
    _INTERRUPTED=0
    wait "$_STEP_PID"
    r=$?
    # 127: the status was already collected by the previous wait (a signal came between
    # that wait's return and this loop's check).
    if [ "$r" -eq 127 ] && [ -n "$rc" ]; then break; fi
    rc=$r
    [ "$_INTERRUPTED" = 1 ] || break
  done
  trap - USR1 TERM
  SLURM_STEP_RC=$rc
}

_slurm_relay() {
  _INTERRUPTED=1
  _STOP_SIGNAL="${_STOP_SIGNAL:-$1}"
  [ -n "$_STEP_PID" ] || _log "$(date +%T) SIG$1 to the batch shell before srun started"
  if [ -n "$_STEP_PID" ] && kill -0 "$_STEP_PID" 2>/dev/null; then
    _log "$(date +%T) SIG$1 to the batch shell: relaying SIGUSR1 to srun (pid $_STEP_PID), which" \
         "passes it to every task; the trainer checkpoints at the next step and exits 85"
    kill -USR1 "$_STEP_PID" 2>/dev/null
  fi
}

# Maps the step's exit status to the job's: 85 -> requeue (batch jobs) and 0.
_slurm_finish() {
  local rc="$1"
  case "$rc" in
    0)
      _log "$(date +%T) training finished (exit 0)"
      return 0 ;;
    85)
      [ -n "${_NOT_STARTED:-}" ] || _log "$(date +%T) checkpoint written, exit 85 (requeue me)"
      # Requeue only a batch job that is still RUNNING: a job Slurm is ending (scancel,
      # preemption, time limit) shows COMPLETING, and `scontrol requeue` would bring even a
      # cancelled job back (seen on Slurm 22.05).
      local job_line
      job_line="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null)"
      if [[ "$job_line" != *BatchFlag=1* ]]; then
        _log "not a batch job (salloc?): not requeued; run again to resume from the checkpoint"
        return 85
      fi
      if [[ "$job_line" != *JobState=RUNNING* ]]; then
        local state="${job_line#*JobState=}"
        _log "job $SLURM_JOB_ID is ${state%% *} (cancelled, preempted or past its time limit: Slurm" \
             "is ending it): not requeued; resubmit it to resume from the checkpoint"
        return 85
      fi
      local out
      if out="$(scontrol requeue "$SLURM_JOB_ID" 2>&1)"; then
        _log "requeued job $SLURM_JOB_ID: it resumes from the checkpoint when it runs again" \
             "(restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"
        return 0
      fi
      _log "scontrol requeue $SLURM_JOB_ID failed: ${out:-no message} (cancelled or not a batch" \
           "job?); resubmit to resume from the checkpoint"
      return 85 ;;
    *)
      if [ "${_SLURM_LAUNCHER:-srun}" = torchrun ] && [ -n "$_STOP_SIGNAL" ]; then
        _log "$(date +%T) srun exited $rc after SIG$_STOP_SIGNAL: torchrun exits non-zero after a stop" \
             "signal whatever its workers did, so exit 85 cannot be seen here and the job is not" \
             "requeued; a 'checkpoint step N' line above means the checkpoint was written and" \
             "a resubmitted job resumes from it (use launchers/slurm_srun.sh for automatic requeue)"
      elif [ -n "$_STOP_SIGNAL" ]; then
        _log "$(date +%T) FAILED: srun exited $rc after SIG$_STOP_SIGNAL (a task did not exit 85;" \
             "the checkpoint may be missing; see the task exit lines above)"
      else
        _log "$(date +%T) FAILED: srun exited $rc (the highest task exit code; which tasks" \
             "failed: the 'srun: error:' lines above)"
      fi
      return "$rc" ;;
  esac
}

# Sourced (by launchers/slurm_torchrun.sh): the functions only.
if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 0; fi

_slurm_traps
_slurm_require_allocation
_slurm_rendezvous
_slurm_header
read -r -a python_cmd <<<"${MOE_TRAIN_PYTHON:-python}"
srun_args=(srun -v --nodes="$NNODES" --ntasks=$((NNODES * TASKS_PER_NODE)) --ntasks-per-node="$TASKS_PER_NODE")
# Slurm 22.05 srun does not inherit --cpus-per-task from the allocation: pass it on.
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
_slurm_run_step "${srun_args[@]}" "${python_cmd[@]}" -m moe_train train "$@"
_slurm_finish "$SLURM_STEP_RC"
exit $?
