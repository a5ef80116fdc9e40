#!/usr/bin/env python3
"""The peer baseline for issue 8: normflows' Glow on clayflow's bundled MNIST split.

Trains normflows' multi-scale Glow (L levels x K GlowBlocks: ActNorm, LU 1x1 conv, affine
coupling with a 3x3 -> 1x1 -> 3x3 net, sigmoid scale; a learned diagonal Gaussian per
level), as in normflows' own Glow example, for a wall-clock budget on the CPU, and scores
the same 1,000 held-out digits clayflow holds out (the last 1,000 of
data/mnist8k-train-images-idx3-ubyte.gz; training uses the first 7,000).

Bits/dim are for 8-bit pixels: x in [0, 1] is (pixel + uniform noise) / 256, so
bpd = -log p(x) / (D ln 2) + 8. Validation uses one fixed noise draw per image (seed 0),
as clayflow's eval does.

Not part of clayflow: never a runtime dependency. Needs torch and normflows:
    /work/torch-venv/bin/pip install normflows     (or: bash tools/reference/setup.sh, then pip)
Usage:
    python tools/reference/normflows_glow.py --minutes 10 --threads 2 --out runs/normflows-glow
It prints one line per evaluation and a final JSON line; writes samples.pgm (an 8x8 grid).
"""

import argparse
import gzip
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch

try:
    import normflows as nf
except ImportError:  # pragma: no cover - a message, not a traceback
    sys.exit("error: normflows is not installed; run: pip install normflows")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MNIST = os.path.join(ROOT, "data", "mnist8k-train-images-idx3-ubyte.gz")


def load_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, n, h, w = struct.unpack(">IIII", raw[:16])
    if magic != 2051 or len(raw) != 16 + n * h * w:
        sys.exit(f"error: {path} is not an IDX image file")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, h, w)


def build(levels, steps, hidden, shape):
    """normflows' Glow example, unconditional (GlowBase) instead of class-conditional."""
    c, h, w = shape
    q0, merges, flows = [], [], []
    for i in range(levels):
        block = [
            nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, split_mode="channel", scale=True)
            for _ in range(steps)
        ]
        block.append(nf.flows.Squeeze())
        flows.append(block)
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        else:
            latent = (c * 2 ** (levels + 1), h // 2**levels, w // 2**levels)
        q0.append(nf.distributions.GlowBase(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def bpd(model, x):
    d = x[0].numel()
    return (-model.log_prob(x, None) / (d * math.log(2)) + 8.0).mean().item()


def evaluate(model, val, noise, batch=250):
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(val), batch):
            x = (val[i : i + batch] + noise[i : i + batch]) / 256.0
            total += bpd(model, x) * len(x)
    model.train()
    return total / len(val)


def write_grid(path, imgs):
    n, _, h, w = imgs.shape
    side = int(math.ceil(math.sqrt(n)))
    grid = np.zeros((side * h, side * w), dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, side)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = imgs[k, 0]
    with open(path, "wb") as f:
        f.write(b"P5\n%d %d\n255\n" % (grid.shape[1], grid.shape[0]))
        f.write(grid.tobytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="GlowBlocks per level (K)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=float, default=60.0, help="seconds between evaluations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for samples.pgm and result.json")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    imgs = torch.from_numpy(load_idx(MNIST).astype(np.float32))
    train, val = imgs[:-1000], imgs[-1000:]
    noise = torch.from_numpy(np.random.default_rng(0).random(val.shape, dtype=np.float32))

    model = build(a.levels, a.steps, a.hidden, tuple(train.shape[1:]))
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adamax(model.parameters(), lr=a.lr, weight_decay=1e-5)
    print(f"normflows {nf.__version__} Glow L={a.levels} K={a.steps} hidden={a.hidden}: "
          f"{params} parameters; torch {torch.__version__}, {a.threads} threads", flush=True)

    # ActNorm's data-dependent init runs on the first forward pass.
    gen = torch.Generator().manual_seed(a.seed)
    budget = a.minutes * 60.0
    start = time.perf_counter()
    next_eval = a.eval_every
    step, epoch, curve = 0, 0, []
    done = False
    while not done:
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train) - a.batch + 1, a.batch):
            x = (train[perm[i : i + a.batch]] + torch.rand(a.batch, *train.shape[1:], generator=gen)) / 256.0
            loss = model.forward_kld(x)
            opt.zero_grad()
            if torch.isfinite(loss):
                loss.backward()
                opt.step()
            step += 1
            t = time.perf_counter() - start
            if t >= next_eval or t >= budget:
                v = evaluate(model, val, noise)
                curve.append({"step": step, "seconds": round(t, 1), "val_bpd": v})
                print(f"step {step:6d}  {t:7.1f} s  train loss {loss.item():.4f}  val {v:.4f} bits/dim",
                      flush=True)
                next_eval += a.eval_every
            if t >= budget:
                done = True
                break
        epoch += 1

    final = curve[-1]["val_bpd"]
    result = {"tool": "normflows_glow.py", "params": params, "steps": step, "epochs": epoch,
              "minutes": a.minutes, "threads": a.threads, "val_bpd": final, "curve": curve,
              "torch": torch.__version__, "normflows": nf.__version__}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        model.eval()
        with torch.no_grad():
            s, _ = model.sample(64, temperature=0.8)
        pix = np.clip(np.floor(np.nan_to_num(s.numpy()) * 256.0), 0, 255).astype(np.uint8)
        write_grid(os.path.join(a.out, "samples.pgm"), pix)
        with open(os.path.join(a.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
