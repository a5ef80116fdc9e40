#!/usr/bin/env bash
# CI for the Cortex-M4F firmware: builds both variants against the 1 MiB flash / 192 KiB RAM
# budget (an overrun fails the link) -- the default one with the trained mnist-glow model
# (what `clayflow train` trains by default) and the seed's MNIST RealNVP
# (--no-default-features) -- runs each in QEMU, and fails on
#   * a non-zero exit of the firmware (kernel error, panic, fault, stack overflow),
#   * a checksum, digit or score line that differs from the host's (same kernel, blob,
#     seed, inputs),
#   * a digit that does not score lowest of the three scored inputs (digit, negative, noise),
#   * flash > 1 MiB, RAM (.data + .bss + peak stack) > 192 KiB,
#   * instructions per sample or per log_prob above FW_MAX_INSN (default: 150,000,000);
# then builds the STM32F4-Discovery example (stm32f4-discovery/) and checks its sizes.
# Installs qemu-system-arm and binutils-arm-none-eabi with apt-get when missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
step() { printf '\n==> %s\n' "$*"; }

FLASH_BUDGET=$((1024 * 1024))
RAM_BUDGET=$((192 * 1024))
INSN_TARGET=150000000
FW_MAX_INSN="${FW_MAX_INSN:-$INSN_TARGET}"

step "firmware tools"
need=()
command -v qemu-system-arm >/dev/null || need+=(qemu-system-arm)
command -v arm-none-eabi-size >/dev/null || need+=(binutils-arm-none-eabi)
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target add thumbv7em-none-eabihf >/dev/null 2>&1 || true
qemu-system-arm --version | head -n 1

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The runner from .cargo/config.toml, run from a scratch directory so the PGM lands there.
runner="$(sed -n 's/^runner = "\(.*\)"$/\1/p' "$here/.cargo/config.toml")"

step "the host's result lines (same kernel, blobs, seed, inputs)"
(cd "$root" && cargo build --profile test --quiet --example firmware_host)
host="$root/target/debug/examples/firmware_host"
"$host" --model glow >"$work/host-glow.txt"
"$host" --model seed >"$work/host-seed.txt"

fail=0
check() { # name value budget
    if (($2 > $3)); then echo "FAIL: $1 $2 > $3"; fail=1; else echo "ok: $1 $2 <= $3"; fi
}

variant() { # name, cargo args...
    local name="$1"; shift
    step "$name: build (thumbv7em-none-eabihf, 1 MiB flash / 192 KiB RAM)"
    (cd "$here" && cargo build --release --locked --target-dir "target/$name" "$@")
    local elf="$here/target/$name/thumbv7em-none-eabihf/release/clayflow-firmware"

    step "$name: run in QEMU (mps2-an386, Cortex-M4F, -icount shift=0)"
    local dir="$work/$name"
    mkdir -p "$dir"
    set +e
    (cd "$dir" && timeout 900 $runner "$elf") >"$dir/device.txt" 2>"$dir/device.err"
    local status=$?
    set -e
    cat "$dir/device.txt"
    cat "$dir/device.err" >&2
    if ((status != 0)); then
        echo "FAIL: the $name firmware exited with status $status" >&2
        exit 1
    fi
    local pgm_bytes
    pgm_bytes=$(stat -c %s "$dir/clayflow-sample.pgm" 2>/dev/null || echo 0)
    if ((pgm_bytes != 13 + 784)); then
        echo "FAIL: the PGM written through semihosting has $pgm_bytes bytes, expected 797" >&2
        exit 1
    fi

    step "$name: device against host"
    grep -E '^(checksum|digit|score):' "$dir/device.txt" >"$dir/device-results.txt" || true
    if ! diff -u "$work/host-$name.txt" "$dir/device-results.txt"; then
        echo "FAIL: device and host results differ (the f32 sample or a log_prob is not bit-identical)" >&2
        exit 1
    fi
    echo "device and host agree bit for bit"
    # The anomaly score: the digit must be the most likely of the three inputs.
    if ! awk '$1 == "score:" { b[$2] = $3 } END {
            exit !(b["digit"] + 0.5 < b["negative"] && b["digit"] + 0.5 < b["noise"]) }' \
        "$dir/device-results.txt"; then
        echo "FAIL: the digit does not score clearly lowest (bits/dim)" >&2
        exit 1
    fi

    step "$name: budgets"
    local text data bss
    read -r text data bss < <(arm-none-eabi-size -A "$elf" | awk '
        $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" { t += $2 }
        $1 == ".data" { d += $2 }
        $1 == ".bss" || $1 == ".uninit" { b += $2 }
        END { print t, d, b }')
    local stack insn lp
    stack=$(sed -n 's/^stack: peak \([0-9]*\) bytes.*/\1/p' "$dir/device.txt")
    insn=$(sed -n 's/^instructions: sample \([0-9]*\)$/\1/p' "$dir/device.txt")
    lp=$(sed -n 's/^instructions: log_prob \([0-9]*\)$/\1/p' "$dir/device.txt")
    check "$name flash bytes" "$((text + data))" "$FLASH_BUDGET"
    check "$name RAM bytes (data + bss + peak stack)" "$((data + bss + stack))" "$RAM_BUDGET"
    check "$name instructions per sample" "$insn" "$FW_MAX_INSN"
    check "$name instructions per log_prob" "$lp" "$FW_MAX_INSN"
}

variant glow
variant seed --no-default-features

step "stm32f4-discovery: the real-board example builds (flashing needs a board: not in CI)"
board="$here/stm32f4-discovery"
(cd "$board" && cargo build --release --locked)
belf="$board/target/thumbv7em-none-eabihf/release/clayflow-stm32f4-discovery"
read -r text data bss < <(arm-none-eabi-size -A "$belf" | awk '
    $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" { t += $2 }
    $1 == ".data" { d += $2 }
    $1 == ".bss" || $1 == ".uninit" { b += $2 }
    END { print t, d, b }')
check "stm32f4-discovery flash bytes" "$((text + data))" "$FLASH_BUDGET"
# .data and .bss in the 128 KiB SRAM; the stack has the 64 KiB CCM RAM to itself.
check "stm32f4-discovery SRAM bytes (data + bss)" "$((data + bss))" "$((128 * 1024))"
if ((fail)); then exit 1; fi
echo
echo "firmware CI passed"
