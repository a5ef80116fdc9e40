#!/usr/bin/env bash
# Runs the kernel's unit tests and golden tests under Miri (nightly), failing on any error.
#
# What Miri adds here: the kernel itself forbids `unsafe`, so Miri checks for undefined
# behaviour inside its dependencies (`half`'s bit casts, `libm`) and turns every
# arithmetic overflow or out-of-bounds access on the test inputs into a hard error (debug
# assertions and overflow checks are on). Tests on full-size models (MNIST: 334k weights,
# ~65M multiply-adds per image) are `#[cfg_attr(miri, ignore = "...")]`; each one has a
# tiny-architecture twin that runs the same code paths under Miri. Property tests run
# fewer cases under `cfg(miri)`. The list: `grep -rn "miri" kernel/src kernel/tests`.
#
# Runs `--lib` and `--test golden` only, by name, so that a new, heavy integration test
# does not silently stretch CI; add it here once it is Miri-sized.
#
# Usage: tools/miri.sh [-- TEST-HARNESS-ARGS]   e.g. tools/miri.sh -- weights::
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
cargo +nightly miri test -p clayflow-kernel --features soft-float --lib --test golden "$@"
echo "miri: kernel lib + golden tests passed in $(($(date +%s) - start)) s"
