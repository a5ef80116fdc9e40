#!/usr/bin/env bash
# Creates a throwaway Python venv with PyTorch for the reference benchmark in this folder.
# Not part of the build, the tests or CI. Usage: bash tools/reference/setup.sh
# Env: VENV (default /tmp/clayflow-torch-venv), PYTHON (default python3),
#      TORCH_VERSION (default 2.15.0, the newest on PyPI when this was written).
# The PyPI torch wheel for Linux x86_64 is the CUDA build (several GB of nvidia-* wheels);
# the CPU is used all the same. Run it under `nice -n 19` on a busy machine.
set -euo pipefail
VENV="${VENV:-/tmp/clayflow-torch-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.15.0}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install "torch==${TORCH_VERSION}" numpy safetensors
"$VENV/bin/python" -c 'import torch, numpy, safetensors; print("torch", torch.__version__, "numpy", numpy.__version__, "safetensors", safetensors.__version__)'
echo "venv ready: $VENV  (activate with: source $VENV/bin/activate)"
