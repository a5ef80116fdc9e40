#!/usr/bin/env python3
"""Times clayflow's MNIST model in PyTorch on the CPU, to set beside the Rust trainer.

For each thread count T (default 1 and 2, via torch.set_num_threads(T)):

* train: one training step at batch 64 on real MNIST digits: uniform dequantization noise,
  forward, backward, gradient-norm clipping (100), Adam (lr 1e-3 with linear warm-up over
  100 steps, betas 0.9/0.999, eps 1e-8): the same work as one step of `clayflow train`.
  A few warm-up steps, then the median of N timed steps.
* eval: forward (log p) at batch 100 under torch.inference_mode(); images/s.
* sample: z ~ N(0, 0.8^2 I), inverse pass, quantize, at batch 1 and batch 64.

Prints a table and, last, one JSON line with every number.

`--check RUN_DIR` instead loads the run's latest checkpoint and prints the validation
bits/dim on the last 1000 images, with clayflow's own fixed evaluation noise (the PCG32
streams of trainer/src/train.rs `eval_noise`, reproduced here) so the number is directly
comparable with `clayflow eval --model RUN_DIR --latest`; `--midpoint` uses v = 0.5 instead (the
kernel's `log_prob`).

Not part of clayflow, its tests or CI. Set-up: tools/reference/setup.sh.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.dont_write_bytecode = True  # leave no __pycache__ in the work tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flow import RealNVP, resolve_checkpoint  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.normpath(
    os.path.join(HERE, "..", "..", "data", "mnist8k-train-images-idx3-ubyte.gz")
)
EVAL_NOISE_SEED = 0x5EED_E7A1  # trainer/src/train.rs EVAL_NOISE_SEED


# ---------------------------------------------------------------------- data
def load_idx_images(path: str) -> np.ndarray:
    """An (optionally gzipped) IDX3 u8 image file -> uint8 array (N, 1, H, W)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic != 0x00000803:
        raise ValueError(f"{path}: not an IDX3 u8 image file (magic 0x{magic:08x})")
    n, h, w = (int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    px = np.frombuffer(raw, dtype=np.uint8, offset=16)
    if px.size != n * h * w:
        raise ValueError(f"{path}: expected {n * h * w} pixels, found {px.size}")
    return px.reshape(n, 1, h, w)


# ---------------------------------------------------------------------- clayflow's PCG32
_MUL = np.uint64(6364136223846793005)


def _pcg_streams(seed: int, streams: np.ndarray):
    """kernel/src/base.rs Pcg32::with_stream(seed, stream), one per entry of `streams`."""
    inc = (streams.astype(np.uint64) << np.uint64(1)) | np.uint64(1)
    state = np.zeros_like(inc)
    state = state * _MUL + inc
    state = state + np.uint64(seed)
    state = state * _MUL + inc
    return state, inc


def _pcg_next(state: np.ndarray, inc: np.ndarray):
    old = state
    state = old * _MUL + inc
    xorshifted = (((old >> np.uint64(18)) ^ old) >> np.uint64(27)).astype(np.uint32)
    rot = (old >> np.uint64(59)).astype(np.uint32)
    out = (xorshifted >> rot) | (xorshifted << ((np.uint32(32) - rot) & np.uint32(31)))
    return state, out


def _pcg_selftest() -> None:
    # kernel/src/base.rs test vector: Pcg32::with_stream(42, 54).
    st, inc = _pcg_streams(42, np.array([54], dtype=np.uint64))
    got = []
    for _ in range(6):
        st, r = _pcg_next(st, inc)
        got.append(int(r[0]))
    want = [0xA15C02B7, 0x7B47F409, 0xBA1D3330, 0x83D2F293, 0xBFA4784B, 0xCBED606E]
    assert got == want, f"PCG32 reproduction is wrong: {got} != {want}"


def clayflow_eval_u(pixels: np.ndarray, bits: int = 8) -> np.ndarray:
    """clayflow's fixed evaluation dequantization of images `pixels` (N, C, H, W) where
    image k is index k of the scored set: stream k of Pcg32(EVAL_NOISE_SEED), one draw per
    pixel in C,H,W order, v = (r >> 8) / 2^24, u = (x + v) / 2^bits, all in f32."""
    n = pixels.shape[0]
    d = int(np.prod(pixels.shape[1:]))
    st, inc = _pcg_streams(EVAL_NOISE_SEED, np.arange(n, dtype=np.uint64))
    v = np.empty((n, d), dtype=np.float32)
    with np.errstate(over="ignore"):
        for j in range(d):
            st, r = _pcg_next(st, inc)
            v[:, j] = (r >> np.uint32(8)).astype(np.float32) / np.float32(16_777_216.0)
    x = pixels.reshape(n, d).astype(np.float32)
    u = (x + v) / np.float32(2**bits)
    return u.reshape(pixels.shape)


# ---------------------------------------------------------------------- timing helpers
def _median_time(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _stats(times: list[float]) -> dict:
    return dict(
        median_s=statistics.median(times),
        min_s=min(times),
        mean_s=statistics.fmean(times),
        n=len(times),
    )


def bench(args, pixels: np.ndarray) -> dict:
    n_val = min(args.last, len(pixels) // 2)
    train_px = torch.from_numpy(pixels[: len(pixels) - n_val].astype(np.float32))
    val_px = torch.from_numpy(pixels[len(pixels) - n_val :].astype(np.float32))
    levels = 256.0
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        torch.manual_seed(args.seed)
        model = RealNVP()
        adam_kw = {}
        if args.adam == "foreach":
            adam_kw["foreach"] = True
        elif args.adam == "fused":
            adam_kw["fused"] = True
        opt = torch.optim.Adam(
            model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **adam_kw
        )
        gen = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(len(train_px), generator=gen)
        state = dict(step=0)
        phases = []  # (data, forward, backward, optimiser) seconds per step
        bs = args.batch

        def train_step():
            t0 = time.perf_counter()
            k = state["step"]
            start = (k * bs) % (len(order) - bs + 1)
            x = train_px[order[start : start + bs]]
            u = (x + torch.rand(x.shape, generator=gen)) / levels
            t1 = time.perf_counter()
            loss = model.loss(u)
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
            for g in opt.param_groups:
                g["lr"] = 1e-3 * min(1.0, (k + 1) / 100.0)
            opt.step()
            state["loss"] = loss.item()
            t4 = time.perf_counter()
            state["step"] = k + 1
            phases.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))

        t_train = _median_time(train_step, args.warmup, args.steps)
        final_loss = state["loss"]
        timed = phases[-args.steps :]
        phase_ms = {
            name: statistics.median(p[i] for p in timed) * 1e3
            for i, name in enumerate(("data", "forward", "backward", "optimiser"))
        }

        model.eval()
        ev_u = (val_px[: args.eval_batch] + 0.5) / levels

        def eval_fwd():
            with torch.inference_mode():
                model.log_prob(ev_u)

        t_eval = _median_time(eval_fwd, max(1, args.warmup // 2), args.eval_iters)

        t_sample = {}
        for sb in (1, 64):

            def draw(sb=sb):
                with torch.inference_mode():
                    model.sample(sb, temperature=0.8, generator=gen)

            t_sample[sb] = _median_time(draw, max(1, args.warmup // 2), args.sample_iters)

        tr = _stats(t_train)
        ev = _stats(t_eval)
        s1, s64 = _stats(t_sample[1]), _stats(t_sample[64])
        results.append(
            dict(
                threads=threads,
                train_step=dict(tr, batch=bs, images_per_s=bs / tr["median_s"],
                                phase_median_ms=phase_ms,
                                loss_after_bpd=final_loss, steps_taken=state["step"]),
                eval=dict(ev, batch=args.eval_batch,
                          images_per_s=args.eval_batch / ev["median_s"]),
                sample_b1=dict(s1, images_per_s=1 / s1["median_s"]),
                sample_b64=dict(s64, images_per_s=64 / s64["median_s"]),
            )
        )
    return dict(
        tool="clayflow tools/reference/bench_step.py",
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        interop_threads=torch.get_num_interop_threads(),
        mkldnn=torch.backends.mkldnn.is_available(),
        adam=args.adam,
        params=sum(p.numel() for p in RealNVP().parameters()),
        warmup=args.warmup,
        steps=args.steps,
        eval_iters=args.eval_iters,
        sample_iters=args.sample_iters,
        results=results,
    )


def print_table(rep: dict) -> None:
    print(
        f"clayflow MNIST preset ({rep['params']} params) in PyTorch {rep['torch']}, "
        f"Python {rep['python']}, {rep['cpu_count']} CPUs, Adam impl {rep['adam']}; "
        f"medians of {rep['steps']} train / {rep['eval_iters']} eval / "
        f"{rep['sample_iters']} sample iterations after {rep['warmup']} warm-up"
    )
    hdr = (f"{'threads':>7} | {'train ms/step':>13} {'img/s':>7} | "
           f"{'eval ms/100':>11} {'img/s':>7} | {'sample b1 ms':>12} | "
           f"{'sample b64 ms':>13} {'img/s':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rep["results"]:
        tr, ev, s1, s64 = r["train_step"], r["eval"], r["sample_b1"], r["sample_b64"]
        print(
            f"{r['threads']:>7} | {tr['median_s'] * 1e3:>13.1f} {tr['images_per_s']:>7.0f} | "
            f"{ev['median_s'] * 1e3:>11.1f} {ev['images_per_s']:>7.0f} | "
            f"{s1['median_s'] * 1e3:>12.2f} | "
            f"{s64['median_s'] * 1e3:>13.1f} {s64['images_per_s']:>7.0f}"
        )
    print("train step phases, median ms (data = noise + batch gather; optimiser = clip + Adam):")
    for r in rep["results"]:
        ph = r["train_step"]["phase_median_ms"]
        print(f"  threads {r['threads']}: " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()))


# ---------------------------------------------------------------------- --workload
def one_workload(args, pixels: np.ndarray) -> dict:
    """One workload at one thread count, timed once (the PyTorch side of
    tools/compare-pytorch.sh; the Rust side is examples/bench_ours.rs with the same flags).
    Same work as the matching column of `bench`: `train` (batch --batch, fresh noise, Adam),
    `eval` (log p of the last --eval-batch digits, midpoint noise), `sample1` / `sample64`
    (z ~ N(0, 0.8^2), inverse, quantise)."""
    if len(args.threads) != 1:
        raise SystemExit("--workload takes a single --threads value")
    threads = args.threads[0]
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    model = RealNVP()
    gen = torch.Generator().manual_seed(args.seed)
    levels = 256.0
    iters = args.iters
    if args.workload == "train":
        n_val = min(args.last, len(pixels) // 2)
        train_px = torch.from_numpy(pixels[: len(pixels) - n_val].astype(np.float32))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
        order = torch.randperm(len(train_px), generator=gen)
        bs = args.batch
        state = dict(step=0)

        def fn():
            k = state["step"]
            start = (k * bs) % (len(order) - bs + 1)
            x = train_px[order[start : start + bs]]
            u = (x + torch.rand(x.shape, generator=gen)) / levels
            loss = model.loss(u)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
            for g in opt.param_groups:
                g["lr"] = 1e-3 * min(1.0, (k + 1) / 100.0)
            opt.step()
            loss.item()
            state["step"] = k + 1

        batch, path = bs, "torch.optim.Adam step"
    elif args.workload == "eval":
        model.eval()
        px = torch.from_numpy(pixels[len(pixels) - args.eval_batch :].astype(np.float32))
        ev_u = (px + 0.5) / levels

        def fn():
            with torch.inference_mode():
                model.log_prob(ev_u)

        batch, path = args.eval_batch, "log_prob under inference_mode"
    elif args.workload in ("sample1", "sample64"):
        model.eval()
        batch = 1 if args.workload == "sample1" else 64

        def fn():
            with torch.inference_mode():
                model.sample(batch, temperature=0.8, generator=gen)

        path = "inverse under inference_mode"
    else:
        raise SystemExit(f"unknown --workload {args.workload!r}")
    times = _median_time(fn, args.warmup, iters)
    return dict(side="pytorch", workload=args.workload, threads=threads, batch=batch,
                path=path, median_s=statistics.median(times), times_s=times,
                torch=torch.__version__)


# ---------------------------------------------------------------------- --check
def check(args, pixels: np.ndarray) -> dict:
    _pcg_selftest()
    path = resolve_checkpoint(args.check)
    torch.set_num_threads(args.threads[-1])
    model = RealNVP.from_checkpoint(path).eval()
    if (model.channels, model.height, model.width) != tuple(pixels.shape[1:]):
        raise SystemExit(f"{path}: model expects {(model.channels, model.height, model.width)}"
                         f" images, the data are {tuple(pixels.shape[1:])}")
    n = min(args.last, len(pixels)) if args.last > 0 else len(pixels)
    px = pixels[len(pixels) - n :]
    if args.midpoint:
        u = (px.astype(np.float32) + np.float32(0.5)) / np.float32(2**model.bits)
        noise = "midpoint v = 0.5"
    else:
        u = clayflow_eval_u(px, model.bits)
        noise = (f"clayflow's fixed evaluation noise (Pcg32 seed 0x{EVAL_NOISE_SEED:x}, "
                 f"stream = index in the scored set)")
    out = {}
    for name, dtype in (("f32", torch.float32), ("f64", torch.float64)):
        m = model.to(dtype)
        tot = 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n, 100):
                ub = torch.from_numpy(u[s : s + 100]).to(dtype)
                tot += m.bits_per_dim(m.log_prob(ub)).double().sum().item()
        out[name] = tot / n
        out[name + "_secs"] = time.perf_counter() - t0
    run = args.check
    print(f"checkpoint: {path}")
    print(f"data: {args.data}, last {n} images; noise: {noise}")
    print(f"validation bits/dim: {out['f32']:.6f} (float32), {out['f64']:.6f} (float64)")
    if not args.midpoint:
        print(f"compare with: clayflow eval --model {run} --last {n} --latest   (prints 4 decimals)")
    return dict(checkpoint=path, images=n, noise="midpoint" if args.midpoint else "clayflow-eval",
                bpd_f32=out["f32"], bpd_f64=out["f64"], torch=torch.__version__)


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="IDX3 images (.gz or not)")
    ap.add_argument("--threads", default="1,2",
                    help="comma-separated torch.set_num_threads values (default 1,2)")
    ap.add_argument("--batch", type=int, default=64, help="training batch (default 64)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed warm-up iterations")
    ap.add_argument("--steps", type=int, default=50, help="timed training steps")
    ap.add_argument("--eval-batch", type=int, default=100)
    ap.add_argument("--eval-iters", type=int, default=20, help="timed eval batches")
    ap.add_argument("--sample-iters", type=int, default=20, help="timed sampling calls")
    ap.add_argument("--adam", choices=["default", "foreach", "fused"], default="default",
                    help="torch.optim.Adam implementation (default: PyTorch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--last", type=int, default=1000,
                    help="held-out images (the last ones): scored by --check, excluded "
                         "from the training batches (default 1000)")
    ap.add_argument("--check", metavar="RUN_DIR",
                    help="score the latest checkpoint of RUN_DIR (or a checkpoint folder "
                         "or model.safetensors) instead of timing")
    ap.add_argument("--midpoint", action="store_true",
                    help="with --check: dequantize at v = 0.5 instead of clayflow's noise")
    ap.add_argument("--workload", choices=["train", "eval", "sample1", "sample64"],
                    help="time only this workload at one thread count, --warmup untimed "
                         "then --iters timed calls, and print one JSON line (used by "
                         "tools/compare-pytorch.sh)")
    ap.add_argument("--iters", type=int, default=10, help="timed calls with --workload")
    args = ap.parse_args()
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    pixels = load_idx_images(args.data)
    if args.workload:
        print(json.dumps(one_workload(args, pixels)))
        return
    if args.check:
        rep = check(args, pixels)
    else:
        rep = bench(args, pixels)
        print_table(rep)
    print(json.dumps(rep, sort_keys=True))


if __name__ == "__main__":
    main()
