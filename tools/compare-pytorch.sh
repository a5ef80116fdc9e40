#!/usr/bin/env bash
# clayflow vs PyTorch on this machine, in one run: one table, each row both sides measured
# alternately (A B, B A, ...), medians, and the ratio.
#
#   bash tools/compare-pytorch.sh                 # ~5-8 minutes on 2 cores
#   ROUNDS=5 bash tools/compare-pytorch.sh        # more rounds
#   ONLY=train,sample1 bash tools/compare-pytorch.sh
#
# Env:
#   VENV      the Python venv with torch (default /tmp/clayflow-torch-venv). If its python
#             cannot import torch, tools/reference/setup.sh installs torch, numpy and
#             safetensors into it (PyPI's Linux wheel is the CUDA build, several GB; it runs
#             on the CPU all the same).
#   ROUNDS    alternating rounds (default 3).
#   ONLY      comma-separated workloads: train, eval, sample1, sample64, sample64-kernel.
#   OUT       where the Markdown table goes (default target-native/compare-pytorch.md; the
#             raw times go to the same name with .json), ready to paste into BENCHMARKS.md.
#
# Our side is built with RUSTFLAGS="-C target-cpu=native" into target-native/: the kernel's
# SIMD paths are chosen at compile time by target flags, as a user building for their own
# machine would. PyTorch uses whatever its wheel dispatches to at run time (MKL, oneDNN).
# Nothing here is used by the build, the tests or CI.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-/tmp/clayflow-torch-venv}"
ROUNDS="${ROUNDS:-3}"
ONLY="${ONLY:-}"
OUT="${OUT:-target-native/compare-pytorch.md}"

if ! "$VENV/bin/python" -c 'import torch, numpy' >/dev/null 2>&1; then
    echo "== installing torch into $VENV (tools/reference/setup.sh)" >&2
    VENV="$VENV" bash tools/reference/setup.sh
fi

echo "== building examples/bench_ours.rs with -C target-cpu=native (target-native/)" >&2
RUSTFLAGS="-C target-cpu=native" cargo build --release --example bench_ours \
    --target-dir target-native >&2

export RUSTFLAGS="-C target-cpu=native"  # recorded in the table's header
exec "$VENV/bin/python" tools/reference/compare.py \
    --ours target-native/release/examples/bench_ours \
    --python "$VENV/bin/python" --rounds "$ROUNDS" --only "$ONLY" --out "$OUT"
