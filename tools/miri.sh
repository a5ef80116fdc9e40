#!/usr/bin/env bash
# Runs the kernel's unsafe code under Miri (nightly), failing on any undefined behaviour.
#
# What Miri is for here: the only `unsafe` in the kernel is the SIMD convolution path
# (`kernel/src/simd/`: raw-pointer vector loads and stores, each with its SAFETY argument).
# Miri checks every one of those accesses for bounds, alignment and initialisation, which no
# ordinary test can. So the kernel is built with `-C target-feature=+avx2,+fma` (Miri runs
# the AVX2 intrinsics; the AVX-512 and NEON paths share the same generic tiling code in
# `simd/mod.rs` and differ only in their small `Simd` impls) and Miri runs:
#   - the `simd::` unit tests: three tiny shapes through both paths (windowed and 1x1) against
#     an f64 reference, the f16 widening on all 65,536 bit patterns, ReLU's NaN/-0 rule, and a
#     whole Miri-sized model sample and log p through the SIMD path;
#   - the golden tests (`kernel/tests/golden.rs`): two small models, f32 and f16, against the
#     NumPy reference, through the SIMD path and `half`'s and libm's code.
# Not under Miri any more: the safe scalar code (the blob reader, the scalar convolutions, the
# flow). Miri adds no UB check there; its overflow and bounds checks are the ordinary tests'
# (overflow checks are on in the test profile), the fuzz targets and the kernel's lints.
# `half` is built without F16C: Miri does not implement `vcvtps2ph`.
#
# Usage: tools/miri.sh [-- TEST-HARNESS-ARGS]   e.g. tools/miri.sh -- weights::
#   (with arguments: the kernel's lib and golden tests filtered by them, like before)
# (from anywhere; builds in target/miri like `cargo miri`)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
installed=$(rustup +nightly component list --installed)
for c in miri rust-src; do
    if ! grep -q "^$c" <<<"$installed"; then
        rustup +nightly component add miri rust-src
        break
    fi
done

start=$(date +%s)
# `soft-float`: libm's x86 `sqrtss` inline assembly is not something Miri can run; the
# pure-Rust libm paths it uses instead are the ones no_std targets without an FPU use.
export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+avx2,+fma"
miri() { cargo +nightly miri test -p clayflow-kernel --features soft-float "$@"; }
if [ $# -gt 0 ]; then
    miri --lib --test golden "$@"
else
    miri --lib -- simd::
    miri --test golden
fi
echo "miri: kernel SIMD and golden tests passed in $(($(date +%s) - start)) s"
