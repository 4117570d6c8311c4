#!/usr/bin/env bash
# Builds .whl/: the packages benchmarks/gpu_session.sh needs that the lent GPU machine's
# image lacks (it has PyTorch, numpy, tensorboard, sentencepiece, pyyaml, tqdm, pytest,
# mpi4py), for its Python 3.12 on x86-64. DeepSpeed ships only a source archive; its
# wheel is pure Python (its CUDA ops compile at first use), so it is built here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
py="${PYTHON:-python3}"
"$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl webdataset==1.0.2 braceexpand==0.1.7 hjson ninja py-cpuinfo pydantic pydantic-core \
    annotated-types typing-inspection msgpack einops
ls -la .whl
