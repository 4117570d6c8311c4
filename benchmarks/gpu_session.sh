#!/usr/bin/env bash
# Everything a session lent a GPU should run, in one call (the device tool gives ~15
# minutes including the machine's start): the GPU tests, then the bf16 benchmarks.
# Results land in ${OUT:-gpu_results}/ (JSON and logs); paste the tables into docs/benchmarks.md.
#   bash benchmarks/gpu_session.sh
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source launchers/setup_env.sh
out="${OUT:-gpu_results}"
mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt"
run() { echo "+ $*" | tee -a "$out/commands.txt"; "$@"; }
run timeout 240 python -m pytest tests/gpu tests/test_attention.py -q -ra 2>&1 | tee "$out/gpu_tests.txt"  # + flex_attention's CUDA gradients
run timeout 240 python -m benchmarks.moe_layer --device cuda --dtype bf16 --reps 20 \
    --json "$out/moe_layer_bf16.json" 2>&1 | tee "$out/moe_layer_bf16.txt"
run timeout 240 python -m benchmarks.train_step --device cuda --dtype bf16 --reps 20 --parts timing \
    --json "$out/train_step_bf16.json" 2>&1 | tee "$out/train_step_bf16.txt"
