#!/usr/bin/env bash
# The CUDA backend on a real NVIDIA GPU, checked from a self-contained pack.
#
#   bash tools/gpu-check.sh --pack [DIR]   on a machine with Rust (no GPU needed): builds the
#                                          release binary, the throughput example and the GPU
#                                          parity tests, measures the CPU baseline, and packs it
#                                          all with the bundled digits into DIR (default
#                                          target/gpu-pack), under 64 MiB;
#   bash DIR/check.sh                      on the GPU machine: needs only the NVIDIA driver (no
#                                          Rust, no network, no NVRTC: the kernels' PTX ships in
#                                          the binary); under 8 minutes on an H100/H200;
#   bash tools/gpu-check.sh                both, one after the other (a GPU machine with Rust).
#
# The check prints one table and exits non-zero if any row FAILED:
#   - the GPU, its driver, and which kernels it runs (NVRTC's CUBIN or the shipped PTX);
#   - parity with the CPU backend of every op, and for every preset (mnist, color, mnist-glow,
#     color-glow) the loss, every gradient and the inverse of a training step (relative error
#     <= 1e-4); where NVRTC is present, the shipped PTX is checked the same way;
#   - $STEPS steps of mnist-glow trained on the GPU, scored on the GPU and on the CPU (equal to
#     1e-3 bits/dim), and resumed on the CPU;
#   - images/s of every preset at batch 64 and 256, the convolutions' TFLOP/s against the GPU's
#     FP32 peak, and the ratio to the CPU baseline measured when packing (the pack machine's
#     cores) and to this machine's CPU at the two target sizes (mnist-glow 256, color-glow 64);
#   - PyTorch eager on the same GPU (the seed's RealNVP at batch 256), only where torch imports.
# The whole log stays in $LOG_DIR (default: the pack folder), also on failure.
#
# Env: STEPS (mnist-glow training steps, default 300), LOG_DIR, TP_STEPS (timed steps per
#      throughput row, default 20), SKIP_BASELINE=1 (pack without the CPU baseline).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

# --- pack ------------------------------------------------------------------------------------
pack() {
    local dir=$1
    set -e
    cd "$HERE/.."
    local root
    root=$(pwd)
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
    echo "gpu-check: building (release) into $dir"
    cargo build --release -p clayflow-trainer --bin clayflow --example throughput
    local tests
    # `nccl`: the NCCL collective's check (libnccl is loaded at run time, not linked).
    tests=$(cargo test --release -p clayflow-trainer --features nccl --test gpu --no-run 2>&1 \
        | sed -n 's/.*Executable tests\/gpu.rs (\(.*\))/\1/p' | tail -1)
    [ -n "$tests" ] || { echo "gpu-check: could not find the gpu test binary" >&2; exit 1; }
    case $tests in /*) ;; *) tests="$root/$tests" ;; esac
    rm -rf "$dir"
    mkdir -p "$dir/bin" "$dir/data"
    strip -o "$dir/bin/clayflow" "$CARGO_TARGET_DIR/release/clayflow"
    strip -o "$dir/bin/throughput" "$CARGO_TARGET_DIR/release/examples/throughput"
    strip -o "$dir/bin/gpu-parity" "$tests"
    cp data/mnist8k-train-images-idx3-ubyte.gz data/mnist8k-train-labels-idx1-ubyte.gz "$dir/data/"
    cp tools/gpu-check.sh "$dir/check.sh"
    mkdir -p "$dir/reference"
    cp tools/reference/bench_gpu.py tools/reference/flow.py "$dir/reference/"
    {
        echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
        echo "packed $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    } >"$dir/MANIFEST"
    if [ "${SKIP_BASELINE:-0}" != 1 ]; then
        echo "gpu-check: CPU baseline on this machine ($(nproc) cores)"
        local cpu
        cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
        echo "# preset batch images_per_s cores cpu" >"$dir/cpu-baseline.tsv"
        for p in mnist color mnist-glow color-glow; do
            for b in 64 256; do
                local ips
                ips=$("$dir/bin/throughput" "$p" "$b" 2 cpu | awk '$1 == "step" {print $3}')
                printf '%s\t%s\t%s\t%s\t%s\n' "$p" "$b" "$ips" "$(nproc)" "$cpu" >>"$dir/cpu-baseline.tsv"
                echo "  $p batch $b: $ips images/s"
            done
        done
    fi
    local size
    size=$(du -sb "$dir" | cut -f1)
    echo "gpu-check: packed $dir: $((size / 1024 / 1024)) MiB ($size bytes)"
    ls -l "$dir" "$dir/bin"
    ((size < 64 * 1024 * 1024)) || { echo "gpu-check: the pack exceeds 64 MiB" >&2; exit 1; }
    set +e
}

# --- check (runs inside a pack) --------------------------------------------------------------
ROWS=()
FAILED=0
row() { # status check result
    ROWS+=("$(printf '%-5s | %-34s | %s' "$1" "$2" "$3")")
    [ "$1" = FAIL ] && FAILED=1
    log "$1 $2: $3"
}
log() { echo "[gpu-check +$(($(date +%s) - T0))s] $*"; }
table() {
    echo
    echo "=== gpu-check: $(head -1 "$PACK/MANIFEST" 2>/dev/null), $(($(date +%s) - T0)) s ==="
    printf '%-5s | %-34s | %s\n' status check result
    printf '%s\n' "------+------------------------------------+------------------------------------------"
    printf '%s\n' "${ROWS[@]}"
    echo "log: $LOG"
}

check() {
    PACK=$1
    cd "$PACK" || exit 1
    T0=$(date +%s)
    STEPS=${STEPS:-300}
    TP_STEPS=${TP_STEPS:-20}
    LOG_DIR=${LOG_DIR:-$PACK}
    mkdir -p "$LOG_DIR"
    LOG="$LOG_DIR/gpu-check.log"
    WORK=$(mktemp -d /tmp/clayflow-gpu-check.XXXXXX)
    exec > >(tee "$LOG") 2>&1
    trap 'table; rm -rf "$WORK"' EXIT
    local bin=$PACK/bin

    # The GPU and the kernels it will run.
    if ! command -v nvidia-smi >/dev/null; then
        row FAIL "GPU" "nvidia-smi not found: this needs an NVIDIA GPU and its driver"
        exit 1
    fi
    local gpu
    gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
    row ok "GPU (name, driver, memory)" "$gpu"
    local nvrtc=absent
    if ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then nvrtc=present; fi
    for d in ${LD_LIBRARY_PATH:+${LD_LIBRARY_PATH//:/ }}; do ls "$d"/libnvrtc.so* >/dev/null 2>&1 && nvrtc=present; done

    # Parity, op by op and preset by preset (loss, every gradient, inverse).
    local modes=(auto)
    [ $nvrtc = present ] && modes+=(ptx)
    for mode in "${modes[@]}"; do
        log "parity with the CPU (CLAYFLOW_CUDA_KERNELS=$mode)"
        CLAYFLOW_CUDA_KERNELS=$mode "$bin/gpu-parity" --ignored --test-threads 1 --nocapture gpu_ \
            >"$WORK/parity-$mode.log" 2>&1
        local rc=$?
        cat "$WORK/parity-$mode.log"
        local kernels
        kernels=$(grep -o 'cuda:0 [^]]*\]' "$WORK/parity-$mode.log" | head -1)
        [ -n "$kernels" ] || kernels="(device label not printed) NVRTC $nvrtc"
        row "$([ $rc = 0 ] && echo ok || echo FAIL)" "kernels ($mode)" "$kernels"
        while read -r _ preset batch loss grads worst inv; do
            row "$([ $rc = 0 ] && echo ok || echo FAIL)" "parity $preset ($mode)" \
                "$batch ${loss/_rel/} $grads ${worst/_rel/} ${inv/_rel/} (tol 1e-4)"
        done < <(grep '^parity ' "$WORK/parity-$mode.log")
        row "$([ $rc = 0 ] && echo ok || echo FAIL)" "parity tests ($mode)" \
            "$(grep -E '^test result' "$WORK/parity-$mode.log" | tail -1)"
    done

    # NCCL: a communicator of one GPU through the whole path (init, all-reduce, broadcast,
    # destroy) and the collective's conformance checks. Needs libnccl.so.2 (e.g. the
    # nvidia-nccl-cu12 wheel's lib folder on LD_LIBRARY_PATH), which a bare machine lacks.
    log "NCCL communicator of one GPU"
    "$bin/gpu-parity" --ignored --test-threads 1 --nocapture nccl_ >"$WORK/nccl.log" 2>&1
    local nrc=$?
    cat "$WORK/nccl.log"
    if grep -q 'libnccl.so.2 was not found' "$WORK/nccl.log"; then
        row skip "NCCL (one GPU)" "libnccl.so.2 not found on this machine: not checked"
    else
        row "$([ $nrc = 0 ] && echo ok || echo FAIL)" "NCCL (one GPU)" \
            "$(grep -E '^test result' "$WORK/nccl.log" | tail -1)"
    fi

    # Train mnist-glow on the GPU, score it on both devices, resume it on the CPU.
    log "training mnist-glow for $STEPS steps on the GPU"
    local t1 t2
    t1=$(date +%s)
    "$bin/clayflow" train --device cuda --preset mnist-glow --steps "$STEPS" --batch-size 64 \
        --out "$WORK/run" --quiet --checkpoint-secs 1000000 --samples 16 >"$WORK/train.log" 2>&1
    local rc=$?
    t2=$(date +%s)
    cat "$WORK/train.log"
    if [ $rc = 0 ] && grep -q "on cuda:" "$WORK/train.log"; then
        row ok "train mnist-glow on the GPU" "$(grep '^trained' "$WORK/train.log") ($((t2 - t1)) s)"
        local eg ec
        eg=$("$bin/clayflow" eval --device cuda --model "$WORK/run" --last 1000 | awk '{print $1}')
        ec=$("$bin/clayflow" eval --device cpu --model "$WORK/run" --last 1000 | awk '{print $1}')
        if awk -v a="$eg" -v b="$ec" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && d <= 1e-3) }'; then
            row ok "score on GPU and CPU" "$eg and $ec bits/dim (1,000 held-out digits)"
        else
            row FAIL "score on GPU and CPU" "'$eg' vs '$ec' bits/dim (must agree to 1e-3)"
        fi
        "$bin/clayflow" train --device cpu --resume "$WORK/run" --steps $((STEPS + 5)) --quiet \
            --checkpoint-secs 1000000 >"$WORK/resume.log" 2>&1
        rc=$?
        cat "$WORK/resume.log"
        if [ $rc = 0 ] && grep -q "resuming from" "$WORK/resume.log"; then
            row ok "resume the GPU run on the CPU" "$(grep '^trained' "$WORK/resume.log")"
        else
            row FAIL "resume the GPU run on the CPU" "exit $rc (see the log)"
        fi
    else
        row FAIL "train mnist-glow on the GPU" "exit $rc (see the log)"
    fi

    # Throughput of every preset at batch 64 and 256.
    local peak=""
    for p in mnist color mnist-glow color-glow; do
        for b in 64 256; do
            "$bin/throughput" "$p" "$b" "$TP_STEPS" cuda:0 >"$WORK/tp.txt" 2>&1
            rc=$?
            cat "$WORK/tp.txt"
            if [ $rc != 0 ]; then
                row FAIL "images/s $p batch $b" "exit $rc"
                continue
            fi
            local ms ips gf
            read -r ms ips gf < <(awk '$1 == "step" {print $2, $3, $4}' "$WORK/tp.txt")
            [ -n "$peak" ] || peak=$(awk '$1 == "fp32-peak-tflops" {print $2}' "$WORK/tp.txt")
            local base ratio share
            base=$(awk -v p="$p" -v b="$b" '$1 == p && $2 == b {print $3}' "$PACK/cpu-baseline.tsv" 2>/dev/null)
            local cores
            cores=$(awk -v p="$p" -v b="$b" '$1 == p && $2 == b {print $4}' "$PACK/cpu-baseline.tsv" 2>/dev/null)
            ratio=$(awk -v g="$ips" -v c="$base" 'BEGIN { if (c > 0) printf "%.1fx the %s-core pack CPU", g / c, "'"$cores"'"; else printf "no CPU baseline" }')
            share=$(awk -v g="$gf" -v p="$peak" 'BEGIN { if (p > 0) printf "%.1f%% of %.1f", 100 * g / 1000 / p, p; else printf "peak unknown" }')
            row ok "images/s $p batch $b" \
                "$ips img/s, $ms ms/step, conv $(awk -v g="$gf" 'BEGIN { printf "%.2f", g / 1000 }') TFLOP/s ($share), $ratio"
            if { [ "$p" = mnist-glow ] && [ "$b" = 256 ]; } || { [ "$p" = color-glow ] && [ "$b" = 64 ]; }; then
                "$bin/throughput" "$p" "$b" 2 cpu >"$WORK/tpc.txt" 2>&1
                local cips
                cips=$(awk '$1 == "step" {print $3}' "$WORK/tpc.txt")
                row ok "  vs this machine's CPU" \
                    "$cips img/s on $(nproc) cores: GPU $(awk -v g="$ips" -v c="$cips" 'BEGIN { if (c > 0) printf "%.1f", g / c }')x"
            fi
        done
    done

    # PyTorch eager on the same GPU, the seed's RealNVP (mnist preset), only where it imports.
    local py=${PYTHON:-python3}
    if "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        "$bin/throughput" mnist 256 "$TP_STEPS" cuda:0 >"$WORK/tp.txt" 2>&1
        local ours
        ours=$(awk '$1 == "step" {print $2}' "$WORK/tp.txt")
        for impl in default fused; do
            if "$py" "$PACK/reference/bench_gpu.py" --device cuda --preset mnist --batch 256 \
                --warmup 10 --steps 50 --adam "$impl" >"$WORK/torch.txt" 2>&1; then
                local t
                t=$(tail -1 "$WORK/torch.txt" | "$py" -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["step_median_ms"])')
                row ok "PyTorch eager mnist 256 (Adam $impl)" \
                    "$t ms/step against clayflow's $ours: clayflow $(awk -v t="$t" -v r="$ours" 'BEGIN { printf "%.2f", t / r }')x faster"
            else
                row FAIL "PyTorch eager mnist 256 (Adam $impl)" "$(tail -1 "$WORK/torch.txt")"
            fi
        done
    else
        row skip "PyTorch comparison" "$py has no torch with CUDA here"
    fi
    exit $FAILED
}

case "${1:-}" in
--pack)
    pack "$(realpath -m "${2:-$HERE/../target/gpu-pack}")"
    ;;
"")
    if [ -x "$HERE/bin/clayflow" ]; then
        check "$HERE"
    else
        dir="$(realpath -m "$HERE/../target/gpu-pack")"
        pack "$dir" || exit 1
        bash "$dir/check.sh"
    fi
    ;;
*)
    echo "usage: bash tools/gpu-check.sh [--pack [DIR]]   (in a pack: bash check.sh)" >&2
    exit 2
    ;;
esac
