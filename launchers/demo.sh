#!/usr/bin/env bash
# The README's main command. On a fresh machine: sets up .venv, writes a synthetic
# corpus, trains a sentencepiece tokenizer, packs webdataset shards, then trains a tiny
# MoE language model on 2 ranks with expert parallelism (gloo on CPU, NCCL on GPUs).
# Extra arguments go to the trainer, e.g. `bash launchers/demo.sh --steps 20`.
# Environment: DEMO_OUT (default demo_out), NPROC (ranks, default 2),
#   LAUNCHER: torchrun (default), deepspeed, or mpirun (ranks from Open MPI, address via mpi4py).
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
args=(train --config configs/tiny_moe.yaml --set "data.manifest=$out/shards/manifest.json" "$@")
case "${LAUNCHER:-torchrun}" in
  torchrun)  run torchrun --standalone --nproc_per_node "$nproc" -m moe_train.demo "${args[@]}" ;;
  deepspeed) run deepspeed --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" moe_train/demo.py "${args[@]}" ;;
  mpirun)    run mpirun --allow-run-as-root --oversubscribe -n "$nproc" \
                 -x OMP_NUM_THREADS -x PATH python -m moe_train.demo "${args[@]}" ;;
  *) echo "LAUNCHER=${LAUNCHER}: must be torchrun, deepspeed or mpirun" >&2; exit 2 ;;
esac
