#!/usr/bin/env bash
# Runs the kernel's tests (unit, golden, bad_input, doc) and the suite's roundtrip and
# trainer_kernel tests under each compile-time SIMD path of the convolution, so every path
# passes the same tests as the scalar reference (which the normal `cargo test` covers).
#
#   tools/simd-test.sh            avx2, avx512 (if this CPU has it, else reported NOT RUN),
#                                 neon (cross build; tests under qemu-user when installed)
#   tools/simd-test.sh avx2 ...   only the named sets; asking for avx512 on a CPU without
#                                 it, or for neon-run without qemu, is an error
#
# Sets:  avx2      RUSTFLAGS="-C target-feature=+avx2,+fma,+f16c"   target-avx2/
#        avx512    RUSTFLAGS="-C target-cpu=native" (AVX-512 CPU)    target-native/
#        neon      cargo build + kernel tests for aarch64-unknown-linux-gnu under
#                  qemu-aarch64 (needs `rustup target add aarch64-unknown-linux-gnu` and
#                  `apt-get install qemu-user gcc-aarch64-linux-gnu`; without qemu it only
#                  builds, and says so)                               target-aarch64/
# Separate target dirs keep the main target/ build valid. Each run also checks, through
# CLAYFLOW_EXPECT_PATH, that the kernel really compiled the path the flags ask for.
set -euo pipefail
cd "$(dirname "$0")/.."

sets=("$@")
explicit=1
if [ ${#sets[@]} -eq 0 ]; then
    sets=(avx2 avx512 neon)
    explicit=0
fi

cpu_has() { grep -qw "$1" /proc/cpuinfo; }
not_run=()
ran=()

x86_set() { # name rustflags target-dir expected-path
    local name=$1 flags=$2 dir=$3 path=$4
    echo "=== $name: RUSTFLAGS=\"$flags\" ($dir)"
    export CLAYFLOW_EXPECT_PATH=$path
    RUSTFLAGS="$flags" cargo test --target-dir "$dir" -p clayflow-kernel
    RUSTFLAGS="$flags" cargo test --target-dir "$dir" -p clayflow-suite \
        --test roundtrip --test trainer_kernel
    unset CLAYFLOW_EXPECT_PATH
    ran+=("$name: kernel unit+golden+bad_input+stack+doc, suite roundtrip+trainer_kernel")
}

for s in "${sets[@]}"; do
    case "$s" in
    avx2)
        for f in avx2 fma f16c; do
            cpu_has "$f" || { echo "error: this CPU lacks $f; cannot run the avx2 set" >&2; exit 1; }
        done
        x86_set avx2 "-C target-feature=+avx2,+fma,+f16c" target-avx2 avx2
        ;;
    avx512)
        if ! cpu_has avx512f; then
            if [ $explicit -eq 1 ]; then
                echo "error: this CPU has no AVX-512F (no avx512f in /proc/cpuinfo); the avx512 set cannot run here" >&2
                exit 1
            fi
            not_run+=("avx512: this CPU has no avx512f")
            continue
        fi
        x86_set avx512 "-C target-cpu=native" target-native avx512
        ;;
    neon)
        echo "=== neon: aarch64-unknown-linux-gnu (target-aarch64)"
        if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
            echo "error: rustup target aarch64-unknown-linux-gnu is not installed" >&2
            exit 1
        fi
        if command -v qemu-aarch64 >/dev/null && command -v aarch64-linux-gnu-gcc >/dev/null; then
            export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
            export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
            # Doc tests need a host-runnable rustdoc setup; unit and integration tests run.
            CLAYFLOW_EXPECT_PATH=neon cargo test --target-dir target-aarch64 \
                --target aarch64-unknown-linux-gnu -p clayflow-kernel --lib --tests
            ran+=("neon: kernel unit+golden+bad_input+stack under qemu-aarch64 (suite tests not run: they need the trainer cross-built)")
        else
            if [ $explicit -eq 1 ] && [ "${SIMD_TEST_NEON_BUILD_ONLY:-0}" != 1 ]; then
                echo "error: qemu-aarch64 or aarch64-linux-gnu-gcc missing (apt-get install qemu-user gcc-aarch64-linux-gnu), or set SIMD_TEST_NEON_BUILD_ONLY=1" >&2
                exit 1
            fi
            cargo build --target-dir target-aarch64 --target aarch64-unknown-linux-gnu -p clayflow-kernel
            ran+=("neon: cross BUILD only (no qemu-aarch64 / aarch64 linker): tests NOT run")
        fi
        ;;
    *)
        echo "error: unknown set '$s' (avx2, avx512, neon)" >&2
        exit 2
        ;;
    esac
done

echo
echo "simd-test summary:"
for r in "${ran[@]}"; do echo "  ran      $r"; done
for r in "${not_run[@]+"${not_run[@]}"}"; do echo "  NOT RUN  $r"; done
