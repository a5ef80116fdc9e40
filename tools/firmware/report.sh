#!/usr/bin/env bash
# Prints the firmware's measurement table: flash, RAM, peak stack, instructions per sample
# and per log_prob against the budgets, and f16 versus f32 weights (flash saved, change in
# the sample and in bits/dim). Needs qemu-system-arm and arm-none-eabi-size (ci.sh installs
# them). Takes a few minutes: it builds four firmware variants and runs three in QEMU.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
runner="$(sed -n 's/^runner = "\(.*\)"$/\1/p' "$here/.cargo/config.toml")"

build() { # target-dir, extra cargo args...
    local dir="$1"; shift
    (cd "$here" && cargo build --release --locked --target-dir "$dir" "$@") >"$work/build.log" 2>&1
}
run() { # elf -> output file
    (cd "$work" && timeout 900 $runner "$1") >"$2" 2>&1
}
sizes() { # elf -> "flash static_ram"
    arm-none-eabi-size -A "$1" | awk '
        $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" { t += $2 }
        $1 == ".data" { d += $2 } $1 == ".bss" || $1 == ".uninit" { b += $2 }
        END { print t + d, d + b }'
}
field() { sed -n "s#^$2#\1#p" "$1" | head -n 1; }

echo "building and running (f16, 1 MiB / 192 KiB budget) ..." >&2
build "$here/target"
f16="$here/target/thumbv7em-none-eabihf/release/clayflow-firmware"
run "$f16" "$work/f16.txt"
read -r flash sram < <(sizes "$f16")
stack=$(field "$work/f16.txt" 'stack: peak \([0-9]*\) bytes.*')
insn=$(field "$work/f16.txt" 'instructions: sample \([0-9]*\)')
lpinsn=$(field "$work/f16.txt" 'instructions: log_prob \([0-9]*\)')
parse=$(field "$work/f16.txt" 'instructions: parse \([0-9]*\)')
bpd16=$(field "$work/f16.txt" 'digit: .*, \([0-9.]*\) bits/dim.*')
sum16=$(field "$work/f16.txt" 'checksum: \(0x[0-9a-f]*\).*')

echo "building the f32 variant against the real budget (expected to fail) ..." >&2
if build "$work/t32" --features f32-weights; then
    f32fit="links (unexpected)"
else
    f32fit="no: FLASH $(grep -o "overflowed by [0-9]* bytes" "$work/build.log" | head -n 1 || true)"
fi
echo "building and running the f32 variant with QEMU's 4 MiB ..." >&2
build "$work/t32big" --features f32-weights,qemu-4mib
f32="$work/t32big/thumbv7em-none-eabihf/release/clayflow-firmware"
run "$f32" "$work/f32.txt"
read -r flash32 sram32 < <(sizes "$f32")
insn32=$(field "$work/f32.txt" 'instructions: sample \([0-9]*\)')
bpd32=$(field "$work/f32.txt" 'digit: .*, \([0-9.]*\) bits/dim.*')
sum32=$(field "$work/f32.txt" 'checksum: \(0x[0-9a-f]*\).*')

echo "building and running with -C target-cpu=cortex-m4 ..." >&2
(cd "$here" && RUSTFLAGS="-C link-arg=-Tlink.x -C target-cpu=cortex-m4" cargo build --release \
    --locked --target-dir "$work/tgen") >"$work/build.log" 2>&1
run "$work/tgen/thumbv7em-none-eabihf/release/clayflow-firmware" "$work/gen.txt"
insngen=$(field "$work/gen.txt" 'instructions: sample \([0-9]*\)')
sumgen=$(field "$work/gen.txt" 'checksum: \(0x[0-9a-f]*\).*')

echo "host twin ..." >&2
(cd "$root" && cargo run --release --quiet --example firmware_host) >"$work/host16.txt"
(cd "$root" && cargo run --release --quiet --example firmware_host -- --dtype f32) >"$work/host32.txt"
(cd "$root" && cargo run --release --quiet --example firmware_host -- --compare) >"$work/compare.txt"
same() { if grep -qF "$1" "$2"; then echo "= host"; else echo "DIFFERS from host"; fi; }

verdict() { if (($1 <= $2)); then echo "ok"; else echo "OVER"; fi; }
ram=$((sram + stack))
cat <<TABLE

## clayflow firmware on QEMU mps2-an386 (Cortex-M4F), MNIST preset

| measure | value | budget | |
|---|---:|---:|---|
| flash (.vector_table + .text + .rodata + .data) | $flash B | 1,048,576 B | $(verdict "$flash" 1048576) |
| static RAM (.data + .bss) | $sram B | | |
| peak stack (painted) | $stack B | | |
| RAM incl. stack | $ram B | 196,608 B | $(verdict "$ram" 196608) |
| instructions per sample (default codegen: vmla) | $insn | 150,000,000 | $(verdict "$insn" 150000000) |
| instructions per sample (-C target-cpu=cortex-m4: vmul + vadd) | $insngen | 150,000,000 | $(verdict "$insngen" 150000000) |
| instructions per log_prob (default codegen) | $lpinsn | | |
| instructions to parse + check the blob (CRC-32, finiteness) | $parse | | |

Checksums: default build $sum16 $(same "$sum16" "$work/host16.txt"), cortex-m4 build $sumgen $(same "$sumgen" "$work/host16.txt").

## f16 versus f32 weights

| weights | flash | fits 1 MiB | instructions per sample | sample checksum | bits/dim (held-out image 7000) |
|---|---:|---|---:|---|---:|
| f16 | $flash B | yes | $insn | $sum16 $(same "$sum16" "$work/host16.txt") | $bpd16 |
| f32 | $flash32 B | $f32fit | $insn32 | $sum32 $(same "$sum32" "$work/host32.txt") | $bpd32 |

$(sed -n '/^f16 saves/,$p' "$work/compare.txt")
TABLE
