#!/usr/bin/env bash
# Regenerates the PTX shipped in the binary (cuda/kernels/ptx/*.ptx) from cuda/kernels/*.cu with
# the pinned NVRTC (cuda/nvrtc-env.sh installs the wheel), for the architecture and with the
# options the trainer uses (clayflow_cuda_kernels::{PTX_ARCH, nvrtc_options}). Run it after
# changing a .cu file and commit the result; tests/cuda_nvrtc.rs fails in CI until you do.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cuda/nvrtc-env.sh
source cuda/nvrtc-env.sh
CLAYFLOW_BLESS_PTX=1 CLAYFLOW_REQUIRE_NVRTC=1 \
    cargo test -p clayflow-suite --test cuda_nvrtc -- --exact shipped_ptx_is_up_to_date
git status --short cuda/kernels/ptx
