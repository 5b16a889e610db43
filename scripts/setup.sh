#!/usr/bin/env bash
# Create .venv and install longctx with its test extras, the cluster executors' libraries and GGUF reading.
# On a machine without an NVIDIA GPU, torch is installed first as the pinned CPU build, so that
# no multi-GB CUDA build is downloaded; with a GPU, the same pin resolves to the CUDA build and
# the optional [gpu] kernels may be added with LONGCTX_GPU_EXTRAS=1. LONGCTX_VENV names another
# virtualenv folder (scripts/compat.sh builds its own there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LONGCTX_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PIP install -q "torch==2.13.0"
else
  # The CPU wheel: found locally on the project's machines, else from PyTorch's CPU wheel index.
  $PIP install -q "torch==2.13.0+cpu" 2>/dev/null \
    || $PIP install -q "torch==2.13.0+cpu" --extra-index-url "https://download.pytorch.org/whl/cpu"
fi
# The distribution was called `longctx` before it became `longctx-eval` (the name `longctx` on the
# package registry is another project's); a venv set up before the rename drops the old record.
if $PIP show -q longctx >/dev/null 2>&1; then $PIP uninstall -q -y longctx; fi
$PIP install -q -e ".[dev,cluster,gguf]"
if [ "${LONGCTX_GPU_EXTRAS:-0}" = 1 ]; then $PIP install -q -e ".[gpu]"; fi
"$VENV/bin/python" -c "import torch, longctx; print('longctx set up: torch', torch.__version__, '| cuda' if torch.cuda.is_available() else '| cpu')"
