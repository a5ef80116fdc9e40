#!/usr/bin/env bash
# benches/kernel_conv on the scalar, AVX2 and AVX-512 builds, one after the other in one
# command (the path is a compile-time choice, so each is its own build and target dir):
# one core's FMA peak and the 7x7 conv's share of it, GFLOP/s per conv shape, and
# sample / log_prob times at batch 1. Arguments are criterion filters, e.g.
#   tools/simd-bench.sh kernel_b1_          # only sample / log_prob
#   tools/simd-bench.sh conv_b1_            # only the convolutions
# Run it on a quiet machine; on a shared one compare ratios within one run.
set -euo pipefail
cd "$(dirname "$0")/.."
sets=(scalar avx2 avx512)
grep -qw avx512f /proc/cpuinfo || { echo "note: no AVX-512F on this CPU; skipping that set"; sets=(scalar avx2); }
for s in "${sets[@]}"; do
    case $s in
    scalar) flags="" dir=target ;;
    avx2) flags="-C target-feature=+avx2,+fma,+f16c" dir=target-avx2 ;;
    avx512) flags="-C target-cpu=native" dir=target-native ;;
    esac
    echo "=== $s: RUSTFLAGS=\"$flags\" cargo bench --bench kernel_conv --target-dir $dir"
    RUSTFLAGS="$flags" cargo bench --bench kernel_conv --target-dir "$dir" -- "$@" 2>&1 |
        grep -E "kernel path|^(conv|kernel)_b1|time:|thrpt:" | sed 's/^ *//'
done
