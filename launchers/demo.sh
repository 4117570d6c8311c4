#!/usr/bin/env bash
# The README's main command. On a fresh machine: sets up .venv, writes a synthetic
# corpus, trains a sentencepiece tokenizer, packs webdataset shards, then pretrains a tiny
# MoE language model on 2 ranks with expert parallelism and DeepSpeed ZeRO-2 (gloo on
# CPU, NCCL on GPUs) through `moe_train train`, with checkpoints and TensorBoard events
# under DEMO_OUT. Extra arguments go to the trainer, e.g. `bash launchers/demo.sh --steps 20`
# or `--resume none` (by default a second run resumes from the newest checkpoint).
# Environment: DEMO_OUT (default demo_out), NPROC (ranks, default 2),
#   LAUNCHER: deepspeed (default), torchrun, or mpirun (ranks from Open MPI, address via mpi4py).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source launchers/setup_env.sh
out="${DEMO_OUT:-demo_out}"
nproc="${NPROC:-2}"
run() { echo "+ $*" >&2; "$@"; }

[ -f "$out/corpus.jsonl" ] || run python -m moe_train.demo corpus --out "$out/corpus.jsonl"
[ -f "$out/tok/sp.model" ] || run python data_tools/train_tokenizer.py \
    --input "$out/corpus.jsonl" --output "$out/tok/sp" --vocab-size 512
[ -f "$out/shards/manifest.json" ] || run python data_tools/make_shards.py \
    --input "$out/corpus.jsonl" --tokenizer "$out/tok/sp.model" --output "$out/shards" \
    --seq-len 64 --val-fraction 0.02 --samples-per-shard 256
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# --steps N is the demo's shorthand for --set train.max_steps=N.
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) extra+=(--set "train.max_steps=$2"); shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
args=(--config configs/tiny_moe.yaml --set "data.manifest=$out/shards/manifest.json"
      --set "checkpoint.dir=$out/checkpoints" --set "logging.dir=$out/runs" "${extra[@]}")
# moe_train.launch prints the launcher's exact command and forwards SIGTERM/SIGINT to
# the trainers as a checkpoint-and-stop request (launchers/train.sh does the same).
exec python -m moe_train.launch --launcher "${LAUNCHER:-deepspeed}" --nproc "$nproc" -- "${args[@]}"
