#!/usr/bin/env bash
# CI step for the CUDA kernels (no GPU needed):
#  1. installs the pinned NVRTC wheel (cuda/nvrtc-env.sh) and compiles every cuda/kernels/*.cu
#     for sm_80 and sm_90, failing on compile errors or register spills (tests/cuda_nvrtc.rs);
#  2. runs the simulator's self-tests and the CUDA-vs-CPU parity tests, which execute the same
#     kernels on the CPU (cuda/ crate, tests/cuda_parity.rs), and every preset's training steps
#     with their per-step transfer counts (tests/cuda_glow.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cuda/nvrtc-env.sh
source cuda/nvrtc-env.sh
export CLAYFLOW_REQUIRE_NVRTC=1
cargo test --locked -p clayflow-suite --test cuda_nvrtc -- --nocapture
cargo test --locked -p clayflow-cuda-sim
cargo test --locked -p clayflow-suite --test cuda_parity
cargo test --locked -p clayflow-suite --test cuda_glow -- --nocapture
