#!/usr/bin/env bash
# CI fuzz smoke run: builds every cargo-fuzz target and runs each for FUZZ_SECONDS (default
# 30) from the committed seed corpus in tools/fuzz/seeds/. Exits non-zero on the first crash,
# panic, failed invariant, timeout (> 10 s on one input) or out-of-memory (> 2 GiB), after
# printing the reproducer's path. New inputs go to a temporary folder; the seeds are never
# modified.
#
# Usage: tools/fuzz/ci.sh            (from anywhere; needs rustup's nightly toolchain)
#        FUZZ_SECONDS=5 tools/fuzz/ci.sh
#        FUZZ_TARGETS="blob idx" tools/fuzz/ci.sh
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.1
SECS=${FUZZ_SECONDS:-30}
TARGETS=${FUZZ_TARGETS:-"blob idx cifar image_folder checkpoint"}

cd "$(dirname "$0")"

if ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

echo "== building fuzz targets (release, debug assertions, AddressSanitizer)"
cargo +nightly fuzz build --fuzz-dir .

# Longest input per target: a little above the largest committed seed.
max_len() {
    case "$1" in
        blob) echo 4096 ;;
        idx) echo 4096 ;;
        cifar) echo 8192 ;;
        image_folder) echo 8192 ;;
        checkpoint) echo 24576 ;;
        *) echo 4096 ;;
    esac
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in $TARGETS; do
    echo "== fuzzing $t for ${SECS}s"
    mkdir -p "$work/$t" "artifacts/$t"
    if ! cargo +nightly fuzz run --fuzz-dir . "$t" "$work/$t" "seeds/$t" -- \
        -max_total_time="$SECS" -max_len="$(max_len "$t")" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 >"$work/$t.log" 2>&1; then
        tail -n 60 "$work/$t.log"
        echo "FAIL: fuzz target $t crashed; reproducer under tools/fuzz/artifacts/$t/"
        echo "      (replay: cd tools/fuzz && cargo +nightly fuzz run --fuzz-dir . $t <file>)"
        exit 1
    fi
    grep -E 'DONE|stat::number_of_executed_units' "$work/$t.log" || true
done
echo "== fuzz smoke run passed: $TARGETS"
