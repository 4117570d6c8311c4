#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment in .venv.
# Torch goes in FIRST and pinned: on a machine without a GPU, torch==2.13.0 (CPU build);
# deepspeed installed before torch would pull a multi-GB CUDA build. Source this file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MOE_TRAIN_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.moe_train_installed"
if [ ! -f "$stamp" ] || [ "$repo/setup.py" -nt "$stamp" ]; then
  echo "[setup_env] creating/updating $venv (one-time, about 1-2 minutes)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2 || true
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_spec="${MOE_TRAIN_TORCH:-torch>=2.13.0}"   # CUDA build for this driver
  else
    torch_spec="${MOE_TRAIN_TORCH:-torch==2.13.0}"   # CPU build
  fi
  echo "[setup_env] pip install $torch_spec" >&2
  "$venv/bin/python" -m pip install -q "$torch_spec" >&2
  echo "[setup_env] pip install -e $repo[dev]" >&2
  "$venv/bin/python" -m pip install -q -e "$repo[dev]" >&2
  touch "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
# DeepSpeed compiles a small shared-memory op on first use (30-60 s on CPU); keep the
# build with this venv so two checkouts (or torch versions) never rebuild each other's.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}"
