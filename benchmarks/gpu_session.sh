#!/usr/bin/env bash
# Everything a session lent a GPU runs, in one call of at most ~8 minutes (the device tool
# gives 15 minutes a session, the machine's start included). Results land in
# ${OUT:-gpu_results}/ (logs and JSON); put the tables in docs/benchmarks.md with the device.
#
# The GPU machine has PyTorch but no network and no DeepSpeed/webdataset: first, here,
#   bash benchmarks/gpu_wheels.sh          # builds .whl/ (~10 MiB, git-ignored)
# then through the device tool, carrying .whl:
#   bash benchmarks/gpu_session.sh
# Steps (each with its own timeout, so one hang cannot eat the rest):
#   1. the GPU tests (tests/gpu, attention incl. flex_attention's CUDA gradients, host reads)
#   2. host syncs per training step under torch.cuda.set_sync_debug_mode("warn")
#      (0 expected in the forward + backward in capacity mode)
#   3. the bf16 MoE layer against DeepSpeed's MoE at E = 8, 64, 128
#   4. the training step's MFU: tiny and the Switch-Base-8-like config, bf16
#   5. fused against loop (and foreach) AdamW: the optimizer's share of the step
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${OUT:-gpu_results}"
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$repo"
else  # a machine with network: the README's set-up
    source launchers/setup_env.sh
    export PYTHONPATH="$repo"
fi
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
py="$(command -v python3)"
nvidia-smi | tee "$out/nvidia-smi.txt"
run() { echo "+ $*" | tee -a "$out/commands.txt"; "$@"; }
run timeout 150 "$py" -m pytest tests/gpu tests/test_attention.py tests/test_host_reads.py -q -ra -p no:cacheprovider \
    2>&1 | tee "$out/gpu_tests.txt"
run timeout 60 "$py" -m benchmarks.sync_debug --device cuda --config tiny 2>&1 | tee "$out/sync_debug.txt"
run timeout 90 "$py" -m benchmarks.moe_layer --device cuda --dtype bf16 --reps 20 \
    --json "$out/moe_layer_bf16.json" 2>&1 | tee "$out/moe_layer_bf16.txt"
run timeout 90 "$py" -m benchmarks.train_step --device cuda --dtype bf16 --reps 10 --parts timing \
    --configs tiny,switch8 --json "$out/train_step_bf16.json" 2>&1 | tee "$out/train_step_bf16.txt"
run timeout 60 "$py" -m benchmarks.train_step --device cuda --dtype bf16 --reps 10 --parts optimizer \
    --configs switch8 --json "$out/optimizer_bf16.json" 2>&1 | tee "$out/optimizer_bf16.txt"
