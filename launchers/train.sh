#!/usr/bin/env bash
# Train on this machine: `bash launchers/train.sh --config configs/X.yaml [--set a.b=c ...]`.
# Environment: LAUNCHER deepspeed (default) | torchrun | mpirun; NPROC processes (default:
# the number of GPUs, else 2); MASTER_PORT; MOE_TRAIN_GRACE_S (seconds the trainers get to
# checkpoint after Ctrl-C or SIGTERM, default 600). Prints the exact launcher command.
# On Slurm use slurm/*.sbatch (srun, one task per GPU) instead.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/launchers/setup_env.sh"
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m moe_train launch --launcher "${LAUNCHER:-deepspeed}" --nproc "$NPROC" -- "$@"
