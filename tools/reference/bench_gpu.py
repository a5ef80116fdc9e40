#!/usr/bin/env python3
"""Times one training step of a clayflow preset in PyTorch eager mode, on a GPU (or the CPU).

The same work as the Rust `throughput` example (trainer/examples/throughput.rs) does per step,
on the same model (flow.py, the clayflow math and init): forward to the mean bits/dim on a
fixed batch of dequantized images, backward, gradient-norm clipping at 100, Adam (lr 1e-3,
betas 0.9/0.999, eps 1e-8). The device is synchronised before and after each timed step (and
the step reads `loss.item()`, as a training loop does). Prints a table line and, last, one
JSON line.

Used by tools/gpu-check.sh: `bench_gpu.py --device cuda --preset mnist --batch 256`.
`--device cpu` is a smoke run of the script itself on a machine without a GPU (numbers
meaningless there). Not part of clayflow, its tests or CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.dont_write_bytecode = True  # leave no __pycache__ in the work tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flow import COLOR_CONFIG, MNIST_CONFIG, RealNVP  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--preset", choices=["mnist", "color"], default="mnist")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps")
    ap.add_argument("--steps", type=int, default=50, help="timed steps")
    ap.add_argument("--adam", choices=["default", "foreach", "fused"], default="default",
                    help="torch.optim.Adam implementation (default: PyTorch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: PyTorch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu for a smoke run")
    cfg = MNIST_CONFIG if args.preset == "mnist" else COLOR_CONFIG
    torch.manual_seed(args.seed)
    model = RealNVP(cfg).to(dev)
    params = sum(p.numel() for p in model.parameters())
    # Every last conv is zero at init, which leaves most gradients zero; that is how training
    # starts, but give them values so no kernel can take a shortcut.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".conv2." in name:
                p.uniform_(-0.02, 0.02)
    adam_kw = {"foreach": True} if args.adam == "foreach" else (
        {"fused": True} if args.adam == "fused" else {})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                           **adam_kw)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    u = ((torch.randint(0, 256, (args.batch, cfg["channels"], cfg["height"], cfg["width"]),
                        generator=gen).float() + 0.5) / 256.0).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    losses = []

    def step():
        loss = model.loss(u)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
        losses.append(loss.item())

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"pytorch {torch.__version__} eager, {args.preset} preset ({params} params), "
          f"batch {args.batch}, {name}: median step {med * 1e3:.2f} ms "
          f"({args.batch / med:.0f} images/s) over {args.steps} steps after {args.warmup} "
          f"warm-up; last loss {losses[-1]:.4f} bits/dim")
    print(json.dumps(dict(
        tool="clayflow tools/reference/bench_gpu.py", torch=torch.__version__,
        device=str(dev), device_name=name, preset=args.preset, params=params,
        batch=args.batch, warmup=args.warmup, steps=args.steps, adam=args.adam,
        step_median_ms=med * 1e3, step_min_ms=min(times) * 1e3,
        images_per_s=args.batch / med, last_loss_bpd=losses[-1],
    ), sort_keys=True))


if __name__ == "__main__":
    main()
