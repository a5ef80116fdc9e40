#!/usr/bin/env bash
# Issue 19's levers table: quiet 10-minute `clayflow train --ranks 2` runs, one after
# another, each changing settings from the default. Prints one table row per run: name,
# arguments, steps, images/s, validation bits/dim of the final model and of the run's
# best-validation checkpoint, and the load average when the run started. Run it on an
# otherwise idle machine; each run takes about 11 minutes.
#
#   bash tools/levers-10min.sh OUT_DIR [NAME=ARGS ...]
#
# Without NAME=ARGS it runs the mnist-glow list of BENCHMARKS.md section 9 (2026-12-06).
# ARGS are extra `clayflow train` flags, e.g. "flip=--preset color-glow --flip". CLAYFLOW
# overrides the binary (default target/release/clayflow).
set -euo pipefail
out=${1:?usage: levers-10min.sh OUT_DIR [NAME=ARGS ...]}
shift
mkdir -p "$out"
bin=${CLAYFLOW:-target/release/clayflow}
runs=("$@")
if ((${#runs[@]} == 0)); then
    runs=(
        # Explicit batch and rate, so that the list means the same whatever the defaults.
        "baseline=--batch-size 64 --lr 2e-3"
        "lr-3e-3=--batch-size 64 --lr 3e-3"
        "batch-32=--batch-size 32 --lr 2e-3"
        "lr-4e-3=--batch-size 64 --lr 4e-3"
        "batch-32-lr-3e-3=--batch-size 32 --lr 3e-3"
        "batch-16=--batch-size 16 --lr 2e-3"
    )
fi
for r in "${runs[@]}"; do
    name=${r%%=*}
    args=${r#*=}
    load=$(cut -d' ' -f1 /proc/loadavg)
    # shellcheck disable=SC2086
    "$bin" train --ranks 2 --quiet --minutes 10 --out "$out/$name" $args >"$out/$name.log" 2>&1
    line=$(grep -m1 '^trained ' "$out/$name.log")
    steps=$(sed -E 's/^trained ([0-9]+) steps.*/\1/' <<<"$line")
    ips=$(sed -E 's/.*\(([0-9]+) images\/s\).*/\1/' <<<"$line")
    bpd=$(sed -E 's/.*validation ([0-9.]+) bits\/dim.*/\1/' <<<"$line")
    best=$(grep -m1 '^best checkpoint: ' "$out/$name.log" |
        sed -E 's/.*\(step ([0-9]+), validation ([0-9.]+) bits\/dim\).*/\2 (step \1)/')
    printf '| %s | `%s` | %s | %s | %s | %s | %s |\n' \
        "$name" "${args:-(default)}" "$steps" "$ips" "$bpd" "${best:-none}" "$load" |
        tee -a "$out/table.md"
done
