#!/usr/bin/env bash
# In-process ranks against rayon inside each op, on the same cores: `clayflow train` of
# mnist-glow at one global batch as 1 rank x THREADS threads and as THREADS ranks x 1 thread
# (`--ranks`), alternating ROUNDS times, and the training images/s of each (the final
# report's: the session's steps over its wall time, the last validation and samples included).
# Usage: tools/in-process-bench.sh [BATCH] [STEPS] [ROUNDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-64}
steps=${2:-150}
rounds=${3:-3}
threads=${4:-2}
cargo build -q --release -p clayflow-trainer
bin=target/release/clayflow
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run() { # ranks round
    "$bin" --device cpu --threads "$threads" train --quiet --ranks "$1" --batch-size "$batch" \
        --steps "$steps" --val-split 100 --samples 4 --out "$tmp/r$1-$2" 2>/dev/null |
        sed -n 's/.*(\([0-9.]*\) images\/s).*/\1/p'
}
printf 'round\t1x%s images/s\t%sx1 images/s\tratio\n' "$threads" "$threads"
for i in $(seq "$rounds"); do
    one=$(run 1 "$i")
    many=$(run "$threads" "$i")
    printf '%s\t%s\t%s\t%s\n' "$i" "$one" "$many" "$(echo "scale=3; $many / $one" | bc)"
done
