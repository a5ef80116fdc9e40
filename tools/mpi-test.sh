#!/usr/bin/env bash
# Data-parallel training under MPI (CI's `mpi` stage; needs no GPU): builds the trainer with
# `--features mpi` and runs, under `mpirun -np 2` (Open MPI):
#   - the Collective seam's conformance checks on two ranks,
#   - a rank with other data stopping the job before training,
#   - two ranks training the weights one process trains with the same global batch, and the
#     run resuming on one rank,
#   - a killed rank ending the job within seconds with an intact, resumable checkpoint
# (trainer/tests/mpi.rs). Installs Open MPI and libclang (for rsmpi's bindings) from Debian
# packages when they are missing. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v mpirun >/dev/null || need+=(openmpi-bin)
command -v mpicc >/dev/null || need+=(libopenmpi-dev)
ldconfig -p | grep -q 'libclang[-.0-9]*\.so' || need+=(libclang-dev)
if ((${#need[@]})); then
    echo "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
mpirun --version | head -1
cargo clippy -p clayflow-trainer --all-targets --features mpi -- -D warnings
cargo test -p clayflow-trainer --features mpi --lib collective "$@"
cargo test -p clayflow-trainer --features mpi --test mpi "$@" -- --nocapture
