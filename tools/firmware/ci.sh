#!/usr/bin/env bash
# CI for the Cortex-M4F firmware: builds it against the 1 MiB flash / 192 KiB RAM budget
# (an overrun fails the link), runs it in QEMU, and fails on
#   * a non-zero exit of the firmware (kernel error, panic, fault, stack overflow),
#   * a checksum or bits/dim line that differs from the host's (same kernel, blob, seed),
#   * flash > 1 MiB, RAM (.data + .bss + peak stack) > 192 KiB,
#   * instructions per sample above FW_MAX_INSN (default: the issue's 150,000,000).
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

step "build the firmware (thumbv7em-none-eabihf, 1 MiB flash / 192 KiB RAM)"
(cd "$here" && cargo build --release --locked)
elf="$here/target/thumbv7em-none-eabihf/release/clayflow-firmware"

step "run it in QEMU (mps2-an386, Cortex-M4F, -icount shift=0)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The runner from .cargo/config.toml, run from a scratch directory so the PGM lands there.
runner="$(sed -n 's/^runner = "\(.*\)"$/\1/p' "$here/.cargo/config.toml")"
set +e
(cd "$work" && timeout 900 $runner "$elf") >"$work/device.txt" 2>"$work/device.err"
status=$?
set -e
cat "$work/device.txt"
cat "$work/device.err" >&2
if ((status != 0)); then
    echo "FAIL: the firmware exited with status $status" >&2
    exit 1
fi
pgm_bytes=$(stat -c %s "$work/clayflow-sample.pgm" 2>/dev/null || echo 0)
if ((pgm_bytes != 13 + 784)); then
    echo "FAIL: the PGM written through semihosting has $pgm_bytes bytes, expected 797" >&2
    exit 1
fi

step "the host's result lines (same kernel, blob, seed, digit)"
(cd "$root" && cargo run --profile test --quiet --example firmware_host) >"$work/host.txt"
cat "$work/host.txt"
grep -E '^(checksum|digit):' "$work/device.txt" >"$work/device-results.txt" || true
if ! diff -u "$work/host.txt" "$work/device-results.txt"; then
    echo "FAIL: device and host results differ (the f32 sample or log_prob is not bit-identical)" >&2
    exit 1
fi
echo "device and host agree bit for bit"

step "budgets"
read -r text data bss < <(arm-none-eabi-size -A "$elf" | awk '
    $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" { t += $2 }
    $1 == ".data" { d += $2 }
    $1 == ".bss" || $1 == ".uninit" { b += $2 }
    END { print t, d, b }')
flash=$((text + data))
stack=$(sed -n 's/^stack: peak \([0-9]*\) bytes.*/\1/p' "$work/device.txt")
insn=$(sed -n 's/^instructions: sample \([0-9]*\)$/\1/p' "$work/device.txt")
ram=$((data + bss + stack))
fail=0
check() { # name value budget
    if (($2 > $3)); then echo "FAIL: $1 $2 > $3"; fail=1; else echo "ok: $1 $2 <= $3"; fi
}
check "flash bytes" "$flash" "$FLASH_BUDGET"
check "RAM bytes (data + bss + peak stack)" "$ram" "$RAM_BUDGET"
check "instructions per sample" "$insn" "$FW_MAX_INSN"
if ((fail)); then exit 1; fi

# Opt-in (FW_GLOW=1): the `glow` variant (MNIST_GLOW, random weights) against the same flash
# and RAM budgets. It has no host twin and no instruction budget (it reports its count).
if [[ "${FW_GLOW:-0}" == 1 ]]; then
    step "glow variant: build, run, flash and RAM budgets"
    (cd "$here" && cargo build --release --locked --features glow --target-dir target/glow)
    gelf="$here/target/glow/thumbv7em-none-eabihf/release/clayflow-firmware"
    set +e
    (cd "$work" && timeout 900 $runner "$gelf") >"$work/glow.txt" 2>&1
    gstatus=$?
    set -e
    grep -E '^(clayflow|checksum|digit|instructions|stack):' "$work/glow.txt" || true
    if ((gstatus != 0)); then
        echo "FAIL: the glow firmware exited with status $gstatus" >&2
        exit 1
    fi
    read -r text data bss < <(arm-none-eabi-size -A "$gelf" | awk '
        $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" { t += $2 }
        $1 == ".data" { d += $2 }
        $1 == ".bss" || $1 == ".uninit" { b += $2 }
        END { print t, d, b }')
    stack=$(sed -n 's/^stack: peak \([0-9]*\) bytes.*/\1/p' "$work/glow.txt")
    check "glow flash bytes" "$((text + data))" "$FLASH_BUDGET"
    check "glow RAM bytes (data + bss + peak stack)" "$((data + bss + stack))" "$RAM_BUDGET"
    if ((fail)); then exit 1; fi
fi
echo
echo "firmware CI passed"
