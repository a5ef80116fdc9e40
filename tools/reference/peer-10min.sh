#!/usr/bin/env bash
# The like-for-like peer comparison of issue 19: clayflow's default run against normflows'
# Glow (tools/reference/normflows_glow.py), back to back on this machine, same data (the
# first 7,000 bundled digits train, the last 1,000 are scored), same thread count:
#   1. clayflow: `clayflow train --minutes M` (the mnist-glow preset, its defaults), then
#      `clayflow eval --latest` (the final model, as normflows is scored) on the held-out
#      digits; the best-validation checkpoint's score (eval's default) is printed below;
#   2. normflows --like-clayflow --lr 1e-3 (logit 0.05, Adam, warm-up 100, cosine, clip 100);
#   3. normflows --like-clayflow (the same at clayflow's lr 2e-3);
#   4. normflows as shipped (no logit, Adamax, constant lr 1e-3: the 2026-12-03 numbers).
# Then one markdown table (run, settings, steps, images/s, held-out bits/dim), written to
# OUT/table.md and printed, and each run's sample grid copied to OUT/samples-RUN.png.
# About 4 x M minutes plus the build (40+ minutes at the default M = 10): run it on a quiet
# machine, nothing else running.
#
# Usage: bash tools/reference/peer-10min.sh [OUT]      (OUT: a new folder; default
#        runs/peer-10min-YYYYmmdd-HHMM)
# Env:   VENV (default /tmp/clayflow-torch-venv, with torch and normflows), MINUTES (10),
#        THREADS (2), BATCH (default: clayflow's default batch; normflows gets the same),
#        PEER_RUNS (which normflows runs, default "nf-like-lr1e-3 nf-like-lr2e-3
#        nf-as-shipped"), CLAYFLOW_ARGS (extra `clayflow train` flags, e.g. "--ranks 1").
set -euo pipefail
OUT="${1:-}"
case "$OUT" in
    "" | /*) ;;
    *) OUT="$PWD/$OUT" ;;  # relative to where it was started, before the cd below
esac
cd "$(dirname "$0")/../.."

MINUTES="${MINUTES:-10}"
THREADS="${THREADS:-2}"
BATCH="${BATCH:-}"
PEER_RUNS="${PEER_RUNS:-nf-like-lr1e-3 nf-like-lr2e-3 nf-as-shipped}"
export CLAYFLOW_ARGS="${CLAYFLOW_ARGS:-}"
VENV="${VENV:-/tmp/clayflow-torch-venv}"
PY="$VENV/bin/python"
OUT="${OUT:-runs/peer-10min-$(date -u +%Y%m%d-%H%M)}"
NF=tools/reference/normflows_glow.py

if [ -e "$OUT" ]; then
    echo "error: $OUT exists; give a new folder" >&2
    exit 2
fi
if ! "$PY" -c 'import torch, normflows' 2>/dev/null; then
    echo "error: $PY cannot import torch and normflows (bash tools/reference/setup.sh, then $VENV/bin/pip install normflows)" >&2
    exit 2
fi
mkdir -p "$OUT"

note() { echo "== $(date -u +%H:%M:%S) $*  [load: $(cut -d' ' -f1-3 /proc/loadavg)]" | tee -a "$OUT/log.txt"; }

# Checks first, so that a broken setup fails in seconds, not after 40 minutes.
note "normflows_glow.py --selftest"
"$PY" "$NF" --selftest | tee -a "$OUT/log.txt"
note "building clayflow (release)"
cargo build --release -p clayflow-trainer --bin clayflow
CLAYFLOW=(cargo run -q --release -p clayflow-trainer --bin clayflow -- --threads "$THREADS" --device cpu)

# 1. clayflow's default.
note "clayflow train --minutes $MINUTES ($THREADS threads)"
# shellcheck disable=SC2086
"${CLAYFLOW[@]}" train --minutes "$MINUTES" --quiet --out "$OUT/clayflow" ${BATCH:+--batch-size "$BATCH"} \
    $CLAYFLOW_ARGS 2>&1 | tee "$OUT/clayflow.log"
# normflows trains on clayflow's global batch (its own default is 64): the header's
# "batch B x N ranks = G (...)", else "batch B,".
BATCH=$(sed -nE 's/.*, batch [0-9]+ x [0-9]+ ranks = ([0-9]+) .*/\1/p; s/.*, batch ([0-9]+), on .*/\1/p' \
    "$OUT/clayflow.log" | head -1)
summary=$(grep -m1 '^trained ' "$OUT/clayflow.log")
cf_steps=$(sed -E 's/^trained ([0-9]+) steps.*/\1/' <<<"$summary")
cf_ips=$(sed -E 's/.*\(([0-9.]+) images\/s\).*/\1/' <<<"$summary")
note "clayflow eval --latest (the final model) and the best-validation checkpoint"
"${CLAYFLOW[@]}" eval --model "$OUT/clayflow" --latest 2>&1 | tee "$OUT/clayflow-eval-latest.log"
"${CLAYFLOW[@]}" eval --model "$OUT/clayflow" 2>&1 | tee "$OUT/clayflow-eval-best.log"
cf_bpd=$(grep -m1 -E '^[^ ]+ bits/dim on ' "$OUT/clayflow-eval-latest.log" | cut -d' ' -f1)
cf_best=$(grep -m1 -E '^[^ ]+ bits/dim on ' "$OUT/clayflow-eval-best.log" | cut -d' ' -f1)
cp "$OUT/clayflow/samples.png" "$OUT/samples-clayflow.png"

# 2-4. normflows.
nf_run() {
    local name=$1
    shift
    note "normflows $name: $*"
    "$PY" "$NF" --minutes "$MINUTES" --threads "$THREADS" --batch "$BATCH" --out "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log"
}
for run in $PEER_RUNS; do
    case $run in
        nf-like-lr1e-3) nf_run "$run" --like-clayflow --lr 1e-3 ;;
        nf-like-lr2e-3) nf_run "$run" --like-clayflow --lr 2e-3 ;;
        nf-like-lr3e-3) nf_run "$run" --like-clayflow --lr 3e-3 ;;
        nf-as-shipped) nf_run "$run" ;;
        *) echo "error: unknown PEER_RUNS entry $run" >&2; exit 2 ;;
    esac
done
note "done"

# The table, and the normflows grids as PNG (PGM -> 8-bit grey PNG with the standard library).
"$PY" - "$OUT" "$MINUTES" "$THREADS" "$cf_steps" "$cf_ips" "$cf_bpd" "$cf_best" "$BATCH" $PEER_RUNS <<'PYEOF' | tee "$OUT/table.md"
import json, os, struct, sys, zlib

out, minutes, threads, cf_steps, cf_ips, cf_bpd, cf_best, batch = sys.argv[1:9]
peer_runs = sys.argv[9:]

def pgm_to_png(src, dst):
    with open(src, "rb") as f:
        data = f.read()
    head = data.split(b"\n", 3)  # P5, "W H", 255, pixels
    w, h = map(int, head[1].split())
    pix = head[3]
    raw = b"".join(b"\x00" + pix[r * w:(r + 1) * w] for r in range(h))
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    with open(dst, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))

def lr_text(lr):
    return f"lr {lr:.0e}".replace("e-0", "e-")

# clayflow's settings as the run saved them (train.json), to show what actually ran.
with open(os.path.join(out, "clayflow", "train.json")) as f:
    c = json.load(f)
cf = [f"logit {c['model']['logit_alpha']:g}" if c["model"]["logit_alpha"] > 0 else "no logit",
      f"Adam (betas {c['beta1']:g}/{c['beta2']:g}, eps {c['eps']:.0e})".replace("e-0", "e-"), lr_text(c["lr"])]
if c["warmup_steps"]:
    cf.append(f"warm-up {c['warmup_steps']}")
cf.append("cosine to 5%" if c.get("cosine_decay") else "constant lr")
cf += [f"clip {c['clip_norm']:g}", "loss in bpd", f"batch {batch}"]
extra = os.environ.get("CLAYFLOW_ARGS", "").strip()
rows = [(f"clayflow `mnist-glow` (`clayflow train {extra}`)" if extra
         else "clayflow `mnist-glow` (default `clayflow train`)", ", ".join(cf),
         cf_steps, cf_ips, cf_bpd, "samples-clayflow.png")]
names = {"nf-like-lr3e-3": "normflows Glow, like-for-like, lr 3e-3",
         "nf-like-lr1e-3": "normflows Glow, like-for-like, lr 1e-3",
         "nf-like-lr2e-3": "normflows Glow, like-for-like, lr 2e-3",
         "nf-as-shipped": "normflows Glow, as shipped"}
for run in peer_runs:
    label = names[run]
    with open(os.path.join(out, run, "result.json")) as f:
        r = json.load(f)
    s = r["settings"]
    if s["optimizer"] == "adamax":
        opt = f"Adamax (weight decay {r['weight_decay']:g})"
    else:
        b1, b2 = r["adam"]["betas"]
        opt = f"Adam (betas {b1:g}/{b2:g}, eps {r['adam']['eps']:.0e})".replace("e-0", "e-")
    parts = [f"logit {s['logit']:g}" if s["logit"] > 0 else "no logit", opt, lr_text(s["lr"])]
    if s["warmup"]:
        parts.append(f"warm-up {s['warmup']}")
    parts.append("cosine to 5%" if s["schedule"] == "cosine" else "constant lr")
    parts.append(f"clip {s['clip']:g}" if s["clip"] > 0 else "no clip")
    parts += [f"loss in {s['loss']}", f"batch {r['batch']}"]
    png = f"samples-{run}.png"
    pgm_to_png(os.path.join(out, run, "samples.pgm"), os.path.join(out, png))
    rows.append((f"{label} ({r['normflows']}, torch {r['torch']})", ", ".join(parts),
                 str(r["steps"]), f"{r['images_per_sec']:.0f}", f"{r['val_bpd']:.4f}", png))

print(f"Held-out bits/dim (last 1,000 bundled digits) after {minutes} minutes, {threads} threads, batch {batch}, back to back:")
print()
print("| run | settings | steps | images/s | bits/dim | samples |")
print("|---|---|---:|---:|---:|---|")
for row in rows:
    print("| " + " | ".join(row) + " |")
print()
print(f"clayflow is scored with `eval --latest` (its final model, as normflows' final model is);"
      f" its best-validation checkpoint (eval's default) scores {cf_best}. Each side uses one fixed"
      f" uniform dequantization draw per image (clayflow's PCG32 stream, normflows_glow.py's numpy seed 0).")
PYEOF
echo "table: $OUT/table.md; logs and runs: $OUT"
