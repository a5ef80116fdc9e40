#!/usr/bin/env bash
# The CUDA backend on a real NVIDIA GPU. Run from anywhere on a machine with an NVIDIA GPU,
# its driver, Rust, and (for the comparison) Python with PyTorch:
#
#     bash tools/gpu-check.sh
#
# 1. builds the release binary, the throughput example and the GPU tests;
# 2. CUDA-vs-CPU parity on the GPU (cargo test --release --test gpu -- --ignored gpu_): every
#    backend op on random problems (both coupling scale functions), and the loss and every
#    gradient of a training step of all four presets (mnist, color, mnist-glow, color-glow),
#    relative error <= 1e-4;
# 3. trains the default preset (mnist-glow) for $STEPS steps on the GPU (--device cuda), scores
#    the run on the GPU and on the CPU, and resumes it on the CPU (checkpoints are
#    device-agnostic);
# 4. times a training step at batch 256 (MNIST) against PyTorch eager on the same GPU, the
#    colour preset on the GPU against the CPU, and mnist-glow (batch 256) and color-glow
#    (batch 64) on the GPU against the CPU; prints the ratios.
# Budget: under 8 minutes on an H200 (16 cores). Exit status non-zero on any failure.
#
# Env: PYTHON (default: python3, must import torch for step 4; SKIP_TORCH=1 skips it),
#      STEPS (MNIST training steps, default 300), CARGO_TARGET_DIR (default target),
#      NVRTC_LIB (a libnvrtc.so.* to use; default: found automatically, see below),
#      CARGO_FLAGS (e.g. --offline on a machine without crates.io).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-300}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
CARGO_FLAGS=${CARGO_FLAGS:-}
T0=$(date +%s)
WORK=$(mktemp -d /tmp/clayflow-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
log() { echo "[gpu-check +$(($(date +%s) - T0))s] $*"; }
die() { echo "gpu-check: FAILED: $*" >&2; exit 1; }
declare -a SUMMARY=()
note() { SUMMARY+=("$*"); log "$*"; }

# --- 0. the GPU ------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU and driver"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader \
    || die "nvidia-smi failed"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)

# --- NVRTC -----------------------------------------------------------------------------------
# cudarc loads libnvrtc by name (libnvrtc.so, libnvrtc.so.12, ...). Use NVRTC_LIB, else a
# system one, else the one inside the Python environment's nvidia-* wheels (PyTorch ships
# one, e.g. nvidia/cu13/lib/libnvrtc.so.13). It is linked as $WORK/lib/libnvrtc.so, and its
# own folder (which holds libnvrtc-builtins) goes on LD_LIBRARY_PATH.
find_nvrtc() {
    if [ -n "${NVRTC_LIB:-}" ]; then echo "$NVRTC_LIB"; return; fi
    local c
    c=$(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so/ && !/builtins/ {print $NF; exit}')
    if [ -n "$c" ]; then echo "$c"; return; fi
    for c in "${CUDA_HOME:-/usr/local/cuda}"/lib64/libnvrtc.so* /usr/local/cuda*/lib64/libnvrtc.so*; do
        [ -e "$c" ] && { echo "$c"; return; }
    done
    if "$PYTHON" -c 1 2>/dev/null; then
        "$PYTHON" - <<'EOF'
import glob, os, site, sys
dirs = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
hits = sorted(h for d in dirs for h in glob.glob(os.path.join(d, "nvidia", "**", "libnvrtc.so*"), recursive=True)
              if "builtins" not in os.path.basename(h) and "alt" not in os.path.basename(h))
print(hits[-1] if hits else "")
EOF
    fi
}
NVRTC=$(find_nvrtc)
[ -n "$NVRTC" ] && [ -e "$NVRTC" ] || die "no libnvrtc found: pip install nvidia-cuda-nvrtc-cu12 (or set NVRTC_LIB=/path/to/libnvrtc.so.N)"
mkdir -p "$WORK/lib"
ln -sf "$(readlink -f "$NVRTC")" "$WORK/lib/libnvrtc.so"
export LD_LIBRARY_PATH="$WORK/lib:$(dirname "$(readlink -f "$NVRTC")")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
note "GPU: $GPU_NAME; NVRTC: $NVRTC"

# --- 1. build --------------------------------------------------------------------------------
log "building (release)"
# shellcheck disable=SC2086
cargo build --release $CARGO_FLAGS -p clayflow-trainer --bin clayflow --example throughput
# shellcheck disable=SC2086
cargo test --release $CARGO_FLAGS -p clayflow-trainer --test gpu --no-run
BIN="$CARGO_TARGET_DIR/release/clayflow"
TP="$CARGO_TARGET_DIR/release/examples/throughput"
log "built"

# --- 2. parity on the GPU --------------------------------------------------------------------
log "CUDA vs CPU parity (ops, and loss + every gradient of a training step)"
# shellcheck disable=SC2086
cargo test --release $CARGO_FLAGS -p clayflow-trainer --test gpu -- --ignored gpu_ \
    --test-threads 1 --nocapture 2>&1 | tee "$WORK/parity.log"
grep -q "test result: ok" "$WORK/parity.log" || die "parity tests failed (see above)"
while read -r l; do note "parity: $l"; done < <(grep -E "worst relative error|loss GPU" "$WORK/parity.log")
note "parity: $(grep -E '^test result' "$WORK/parity.log" | tail -1)"

# --- 3. train mnist-glow on the GPU, score on both, resume on the CPU -------------------------
log "training the mnist-glow preset for $STEPS steps on the GPU"
"$BIN" train --device cuda --preset mnist-glow --steps "$STEPS" --batch-size 64 --out "$WORK/run" --quiet \
    --checkpoint-secs 1000000 --samples 16 2>&1 | tee "$WORK/train.log"
grep -q "on cuda:" "$WORK/train.log" || die "training did not run on the GPU"
note "train: $(grep '^trained' "$WORK/train.log")"
EG=$("$BIN" eval --device cuda --model "$WORK/run" --last 1000 | awk '{print $1}')
EC=$("$BIN" eval --device cpu --model "$WORK/run" --last 1000 | awk '{print $1}')
note "eval of the GPU-trained run: $EG bits/dim on the GPU, $EC on the CPU"
awk -v a="$EG" -v b="$EC" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 1e-3) }' \
    || die "GPU and CPU score the same checkpoint differently: $EG vs $EC"
"$BIN" train --device cpu --resume "$WORK/run" --steps $((STEPS + 5)) --quiet \
    --checkpoint-secs 1000000 2>&1 | tee "$WORK/resume.log"
grep -q "resuming from" "$WORK/resume.log" || die "the CPU did not resume the GPU run"
note "resume on the CPU: $(grep '^trained' "$WORK/resume.log")"

# --- 4. timing -------------------------------------------------------------------------------
step_ms() { awk '$1 == "step" {print $2}'; }
log "timing: MNIST preset, batch 256, on the GPU"
"$TP" mnist 256 50 cuda | tee "$WORK/tp_mnist.txt"
RUST_MNIST=$(step_ms <"$WORK/tp_mnist.txt")
note "clayflow GPU MNIST batch 256: $RUST_MNIST ms/step"
if [ "${SKIP_TORCH:-0}" != 1 ]; then
    if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        for impl in default fused; do
            "$PYTHON" tools/reference/bench_gpu.py --device cuda --preset mnist --batch 256 \
                --warmup 10 --steps 50 --adam "$impl" | tee "$WORK/torch_$impl.txt"
            T=$(tail -1 "$WORK/torch_$impl.txt" | "$PYTHON" -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["step_median_ms"])')
            R=$(awk -v t="$T" -v r="$RUST_MNIST" 'BEGIN { printf "%.2f", t / r }')
            note "PyTorch eager (Adam $impl) MNIST batch 256: $T ms/step; clayflow is ${R}x faster (target >= 1.5x)"
        done
    else
        note "PyTorch comparison skipped: $PYTHON has no torch with CUDA"
    fi
fi
log "timing: colour preset, batch 64, GPU vs CPU"
"$TP" color 64 20 cuda | tee "$WORK/tp_color_gpu.txt"
"$TP" color 64 3 cpu | tee "$WORK/tp_color_cpu.txt"
CG=$(step_ms <"$WORK/tp_color_gpu.txt")
CC=$(step_ms <"$WORK/tp_color_cpu.txt")
note "colour batch 64: GPU $CG ms/step, CPU ($(nproc) cores) $CC ms/step: GPU is $(awk -v g="$CG" -v c="$CC" 'BEGIN { printf "%.1f", c / g }')x faster (target >= 10x)"
for pb in mnist-glow:256 color-glow:64; do
    p=${pb%%:*} b=${pb##*:}
    log "timing: $p preset, batch $b, GPU vs CPU"
    "$TP" "$p" "$b" 20 cuda | tee "$WORK/tp_${p}_gpu.txt"
    "$TP" "$p" "$b" 3 cpu | tee "$WORK/tp_${p}_cpu.txt"
    G=$(step_ms <"$WORK/tp_${p}_gpu.txt")
    C=$(step_ms <"$WORK/tp_${p}_cpu.txt")
    note "$p batch $b: GPU $G ms/step, CPU ($(nproc) cores) $C ms/step: GPU is $(awk -v g="$G" -v c="$C" 'BEGIN { printf "%.1f", c / g }')x faster"
done

echo
echo "=== gpu-check summary ($(($(date +%s) - T0)) s) ==="
printf '%s\n' "${SUMMARY[@]}"
