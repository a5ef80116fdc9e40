#!/usr/bin/env bash
# The data-parallel cost table of BENCHMARKS.md: every preset's training step at one global
# batch as 1 rank x 2 threads and as 2 ranks x 1 thread (Open MPI), with the all-reduce's
# share of the step and the bytes all-reduced. Needs what tools/mpi-test.sh installs.
# Usage: tools/data-parallel-bench.sh [GLOBAL_BATCH] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-64}
steps=${2:-6}
cargo build -q --release -p clayflow-trainer --features mpi --example data_parallel
bin=target/release/examples/data_parallel
"$bin" "$batch" "$steps" 2
mpirun --allow-run-as-root --oversubscribe -np 2 "$bin" "$batch" "$steps" 1 | tail -n +2
