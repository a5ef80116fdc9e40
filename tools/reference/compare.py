#!/usr/bin/env python3
"""Ours vs PyTorch, each workload measured alternately in one run; prints one table.

Driven by tools/compare-pytorch.sh (which builds the Rust side and finds the venv). For
every row and every round it runs the Rust timing program (examples/bench_ours.rs) and
`bench_step.py --workload` as two fresh processes, one after the other, alternating which
goes first (A B, then B A, ...), so slow drifts of the machine hit both sides alike. Each
process does untimed warm-up calls, then timed calls; a side's figure is the median of all
its timed calls over all rounds. The ratio is PyTorch's time over ours: above 1 means
clayflow is faster.

Writes the table (Markdown) and the raw JSON next to each other: --out FILE.md, FILE.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))

# (label, workload, threads, warmup, iters, what ours runs)
ROWS = [
    ("training step, batch 64", "train", 1, 2, 6, "trainer, CPU backend"),
    ("training step, batch 64", "train", 2, 2, 6, "trainer, CPU backend"),
    ("log-likelihood, batch 100", "eval", 1, 2, 10, "trainer Flow::forward"),
    ("log-likelihood, batch 100", "eval", 2, 2, 10, "trainer Flow::forward"),
    ("sampling, batch 1", "sample1", 1, 5, 40, "no_std kernel, f32 weights"),
    ("sampling, batch 64", "sample64", 1, 2, 8, "trainer batched inverse"),
    ("sampling, batch 64", "sample64", 2, 2, 8, "trainer batched inverse"),
    ("sampling, batch 64", "sample64-kernel", 2, 2, 8, "kernel, 1 image per thread"),
]


def run_json(cmd: list[str], env: dict) -> dict:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"no JSON from: {' '.join(cmd)}\n{p.stdout[-2000:]}")
    return json.loads(lines[-1])


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", required=True, help="the built bench_ours binary")
    ap.add_argument("--python", default=sys.executable, help="the venv's python (torch)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "target-native", "compare-pytorch.md"))
    ap.add_argument("--only", default="", help="comma-separated workloads to run (default all)")
    args = ap.parse_args()
    only = {w for w in args.only.split(",") if w}
    rows = [r for r in ROWS if not only or r[1] in only]
    bench_step = os.path.join(HERE, "bench_step.py")
    load0 = os.getloadavg()
    t0 = time.time()
    res = {i: {"ours": [], "torch": [], "ours_rounds": [], "torch_rounds": []}
           for i in range(len(rows))}
    meta = {}
    for rnd in range(args.rounds):
        for i, (label, wl, th, warm, iters, _) in enumerate(rows):
            env = dict(os.environ, RAYON_NUM_THREADS=str(th), OMP_NUM_THREADS=str(th),
                       MATMUL_NUM_THREADS="1")
            ours = [args.ours, "--workload", wl, "--threads", str(th), "--warmup", str(warm),
                    "--iters", str(iters)]
            twl = "sample64" if wl == "sample64-kernel" else wl
            torch_cmd = [args.python, bench_step, "--workload", twl, "--threads", str(th),
                         "--warmup", str(warm), "--iters", str(iters)]
            order = [("ours", ours), ("torch", torch_cmd)]
            if rnd % 2 == 1:
                order.reverse()
            for side, cmd in order:
                j = run_json(cmd, env)
                res[i][side].extend(j["times_s"])
                res[i][side + "_rounds"].append(j["median_s"])
                meta[(i, side)] = j
            print(f"round {rnd + 1}/{args.rounds}: {label}, {th} thread(s) [{wl}]: "
                  f"ours {res[i]['ours_rounds'][-1] * 1e3:.2f} ms, "
                  f"PyTorch {res[i]['torch_rounds'][-1] * 1e3:.2f} ms", file=sys.stderr)
    elapsed = time.time() - t0
    load1 = os.getloadavg()

    torch_ver = meta.get((0, "torch"), {}).get("torch", "?")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"clayflow vs PyTorch {torch_ver}, MNIST preset, {cpu_model()}, "
        f"{os.cpu_count()} CPUs; {now}, git {rev}; RUSTFLAGS={os.environ.get('RUSTFLAGS', '')!r}",
        f"{args.rounds} alternating rounds (A B / B A), medians of all timed calls; "
        f"load average {load0[0]:.2f} before, {load1[0]:.2f} after; {elapsed:.0f} s",
        "",
        "| workload | threads | ours runs | ours ms | PyTorch ms | ours img/s | PyTorch img/s "
        "| speed ratio (PyTorch time / ours) | round medians ours / PyTorch, ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    raw = []
    for i, (label, wl, th, warm, iters, what) in enumerate(rows):
        o = statistics.median(res[i]["ours"])
        t = statistics.median(res[i]["torch"])
        batch = meta[(i, "ours")]["batch"]
        rounds = ", ".join(f"{a * 1e3:.1f}/{b * 1e3:.1f}" for a, b in
                           zip(res[i]["ours_rounds"], res[i]["torch_rounds"]))
        lines.append(
            f"| {label} | {th} | {what} | {o * 1e3:.2f} | {t * 1e3:.2f} | {batch / o:.0f} "
            f"| {batch / t:.0f} | **{t / o:.2f}x** | {rounds} |"
        )
        raw.append(dict(label=label, workload=wl, threads=th, batch=batch, ours_path=what,
                        ours_median_s=o, torch_median_s=t, ratio=t / o,
                        ours_times_s=res[i]["ours"], torch_times_s=res[i]["torch"]))
    lines += ["", "PyTorch side for every sampling row: `RealNVP.sample` (inverse under "
              "inference_mode) at the row's batch and threads. Ratio > 1: clayflow faster."]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(dict(rows=raw, rounds=args.rounds, torch=torch_ver, git=rev, date=now,
                       load_before=load0, load_after=load1), f, indent=1)
    print(f"\nwrote {args.out} (and .json)", file=sys.stderr)


if __name__ == "__main__":
    main()
