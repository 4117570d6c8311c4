#!/usr/bin/env bash
# Runs `python -m moe_train train ARGS...` inside a Slurm allocation under torchrun: one
# srun task per node, each a torchrun agent that starts that node's processes (one per
# GPU); the agents meet at a c10d rendezvous on the first node of the job. No ssh, no
# hostfile.
#
#   bash launchers/slurm_torchrun.sh --config configs/moe_64e.yaml [--set a.b=c ...]
#
# In an sbatch script: `exec bash launchers/slurm_torchrun.sh --config "$CONFIG" "$@"`
# in place of launchers/slurm_srun.sh (which the slurm/*.sbatch templates use).
# Rendezvous: MASTER_ADDR = first host of `scontrol show hostnames $SLURM_JOB_NODELIST`,
# port 20000 + SLURM_JOB_ID % 20000, rendezvous id = the job id. Processes per node:
# NPROC_PER_NODE, else the allocation's --ntasks-per-node, else its GPUs per node, else 1.
#
# Signals: SIGUSR1/SIGTERM to this shell are relayed to srun as SIGUSR1 (as in
# slurm_srun.sh); the agents take SIGUSR1 (--signals-to-handle) and pass it to the
# trainers, which checkpoint and exit 85; the agents wait MOE_TRAIN_GRACE_S (default 600)
# for them (--shutdown-timeout; torchrun's own default is 30 s) before killing them.
# Difference from slurm_srun.sh: torchrun exits 1 after a stop signal, and for any worker
# exit code other than 0, so the job cannot tell "checkpoint written" from a failure and
# is NOT requeued automatically; resubmit it and `--resume auto` continues from the
# checkpoint. For automatic requeue use launchers/slurm_srun.sh.
#
# Environment: NPROC_PER_NODE, MOE_TRAIN_GRACE_S, MOE_TRAIN_PYTHON (see slurm_srun.sh).
set -uo pipefail
# shellcheck source=launchers/slurm_srun.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm_srun.sh"   # its functions, not its main part
_SLURM_LAUNCHER=torchrun

_slurm_traps
_slurm_require_allocation
_slurm_rendezvous
_slurm_header
read -r -a python_cmd <<<"${MOE_TRAIN_PYTHON:-python}"
srun_args=(srun -v --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1)
# The one task per node gets the CPUs of all its node's ranks.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  srun_args+=(--cpus-per-task=$((SLURM_CPUS_PER_TASK * TASKS_PER_NODE)))
fi
# `python -m torch.distributed.run` is torchrun, with the trainer's own interpreter.
torchrun_args=("${python_cmd[@]}" -m torch.distributed.run
  --nnodes="$NNODES" --nproc-per-node="$TASKS_PER_NODE"
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  --shutdown-timeout="${MOE_TRAIN_GRACE_S:-600}")
_slurm_run_step "${srun_args[@]}" "${torchrun_args[@]}" -m moe_train train "$@"
_slurm_finish "$SLURM_STEP_RC"
exit $?
