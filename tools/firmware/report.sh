#!/usr/bin/env bash
# Prints the firmware's measurement table for both models it embeds -- the trained
# mnist-glow (the default build) and the seed's MNIST RealNVP (--no-default-features) --:
# flash, RAM, peak stack, instructions per sample and per log_prob against the budgets, the
# convolution breakdown, the three anomaly scores, and (seed model) f16 versus f32 weights.
# Needs qemu-system-arm and arm-none-eabi-size (ci.sh installs them). Takes a few minutes:
# it builds six firmware variants and runs five in QEMU.
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
elf() { echo "$1/thumbv7em-none-eabihf/release/clayflow-firmware"; }
verdict() { if (($1 <= $2)); then echo "ok"; else echo "OVER"; fi; }
same() { if grep -qF "$1" "$2"; then echo "= host"; else echo "DIFFERS from host"; fi; }

echo "host twin ..." >&2
(cd "$root" && cargo build --release --quiet --example firmware_host)
host="$root/target/release/examples/firmware_host"
"$host" --model glow >"$work/host-glow.txt"
"$host" --model seed >"$work/host-seed.txt"
"$host" --model seed --dtype f32 >"$work/host-seed32.txt"
"$host" --compare >"$work/compare.txt"

model_table() { # name, title, cargo args...
    local name="$1" title="$2"; shift 2
    echo "building and running $name (1 MiB / 192 KiB budget) ..." >&2
    build "$work/t-$name" "$@"
    run "$(elf "$work/t-$name")" "$work/$name.txt"
    echo "building and running $name with -C target-cpu=cortex-m4 ..." >&2
    (cd "$here" && RUSTFLAGS="-C link-arg=-Tlink.x -C target-cpu=cortex-m4" cargo build \
        --release --locked --target-dir "$work/g-$name" "$@") >"$work/build.log" 2>&1
    run "$(elf "$work/g-$name")" "$work/$name-gen.txt"
    local flash sram stack insn lp parse sum insngen sumgen ram
    read -r flash sram < <(sizes "$(elf "$work/t-$name")")
    stack=$(field "$work/$name.txt" 'stack: peak \([0-9]*\) bytes.*')
    insn=$(field "$work/$name.txt" 'instructions: sample \([0-9]*\)')
    lp=$(field "$work/$name.txt" 'instructions: log_prob \([0-9]*\)')
    parse=$(field "$work/$name.txt" 'instructions: parse \([0-9]*\)')
    sum=$(field "$work/$name.txt" 'checksum: \(0x[0-9a-f]*\).*')
    insngen=$(field "$work/$name-gen.txt" 'instructions: sample \([0-9]*\)')
    sumgen=$(field "$work/$name-gen.txt" 'checksum: \(0x[0-9a-f]*\).*')
    ram=$((sram + stack))
    cat <<TABLE

## $title

| measure | value | budget | |
|---|---:|---:|---|
| flash (.vector_table + .text + .rodata + .data) | $flash B | 1,048,576 B | $(verdict "$flash" 1048576) |
| static RAM (.data + .bss) | $sram B | | |
| peak stack (painted) | $stack B | | |
| RAM incl. stack | $ram B | 196,608 B | $(verdict "$ram" 196608) |
| instructions per sample (default codegen: vmla) | $insn | 150,000,000 | $(verdict "$insn" 150000000) |
| instructions per log_prob (default codegen) | $lp | 150,000,000 | $(verdict "$lp" 150000000) |
| instructions per sample (-C target-cpu=cortex-m4: vmul + vadd) | $insngen | | |
| instructions to parse + check the blob (CRC-32, finiteness) | $parse | | |

Checksums: default build $sum $(same "$sum" "$work/host-$name.txt"), cortex-m4 build $sumgen $(same "$sumgen" "$work/host-$name.txt").

Convolutions of one coupling per level (\`instructions: step ...\`):

$(sed -n 's/^instructions: step \(.*\)$/* step \1/p' "$work/$name.txt")

Scores (bits/dim; the digit must be lowest):

$(sed -n 's/^score: *\([a-z]*\) *\([0-9.]*\) bits\/dim.*$/* \1: \2/p' "$work/$name.txt")
TABLE
}

model_table glow "mnist-glow (trained, f16), the default firmware"
model_table seed "mnist, the seed's RealNVP (f16), --no-default-features" --no-default-features

echo "building the seed's f32 variant against the real budget (expected to fail) ..." >&2
if build "$work/t32" --no-default-features --features f32-weights; then
    f32fit="links (unexpected)"
else
    f32fit="no: FLASH $(grep -o "overflowed by [0-9]* bytes" "$work/build.log" | head -n 1 || true)"
fi
echo "building and running the f32 variant with QEMU's 4 MiB ..." >&2
build "$work/t32big" --no-default-features --features f32-weights,qemu-4mib
run "$(elf "$work/t32big")" "$work/f32.txt"
read -r flash32 _ < <(sizes "$(elf "$work/t32big")")
read -r flash16 _ < <(sizes "$(elf "$work/t-seed")")
insn16=$(field "$work/seed.txt" 'instructions: sample \([0-9]*\)')
insn32=$(field "$work/f32.txt" 'instructions: sample \([0-9]*\)')
sum16=$(field "$work/seed.txt" 'checksum: \(0x[0-9a-f]*\).*')
sum32=$(field "$work/f32.txt" 'checksum: \(0x[0-9a-f]*\).*')
bpd16=$(field "$work/seed.txt" 'digit: .*, \([0-9.]*\) bits/dim.*')
bpd32=$(field "$work/f32.txt" 'digit: .*, \([0-9.]*\) bits/dim.*')
cat <<TABLE

## f16 versus f32 weights (the seed's model)

| weights | flash | fits 1 MiB | instructions per sample | sample checksum | bits/dim (held-out image 7000) |
|---|---:|---|---:|---|---:|
| f16 | $flash16 B | yes | $insn16 | $sum16 $(same "$sum16" "$work/host-seed.txt") | $bpd16 |
| f32 | $flash32 B | $f32fit | $insn32 | $sum32 $(same "$sum32" "$work/host-seed32.txt") | $bpd32 |

$(sed -n '/^f16 saves/,$p' "$work/compare.txt")
TABLE
