#!/usr/bin/env bash
# The project's test command (README, CI): every test of the workspace, with NVRTC present so
# that the CUDA compile check (tests/cuda_nvrtc.rs) runs instead of being impossible.
# Installs the pinned NVRTC wheel from PyPI on first use (see cuda/nvrtc-env.sh); no GPU needed.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cuda/nvrtc-env.sh
source cuda/nvrtc-env.sh
export CLAYFLOW_REQUIRE_NVRTC=1
cargo test --workspace "$@"
