#!/usr/bin/env python3
"""The peer baseline for issues 8 and 19: normflows' Glow on clayflow's bundled MNIST split.

Trains normflows' multi-scale Glow (L levels x K GlowBlocks: ActNorm, LU 1x1 conv, affine
coupling with a 3x3 -> 1x1 -> 3x3 net, sigmoid scale; a learned diagonal Gaussian per
level), as in normflows' own Glow example, for a wall-clock budget on the CPU, and scores
the same 1,000 held-out digits clayflow holds out (the last 1,000 of
data/mnist8k-train-images-idx3-ubyte.gz; training uses the first 7,000).

Bits/dim are for 8-bit pixels: x in [0, 1] is u = (pixel + uniform noise) / 256, so
bpd = -log p(u) / (D ln 2) + 8. Validation uses one fixed noise draw per image (numpy seed
0; clayflow's eval uses its own fixed draw, a different one). With --logit the flow models
y = logit(a + (1 - 2a) u) and p(u) includes the logit's log-det, so the score stays in the
same [0, 1] dequantized space as without it and as clayflow's (shared MATH.md).

Two ways to run it:
  * As shipped (no training options given; the 2026-12-03 numbers): no logit, Adamax
    (lr 1e-3, weight decay 1e-5) at a constant rate, no clipping, loss in nats.
  * --like-clayflow: clayflow's defaults for `clayflow train` (trainer/src/train.rs,
    `Run::lr` and `Run::update`): logit with alpha 0.05, Adam (betas 0.9/0.999, eps 1e-8,
    no weight decay) at peak lr 2e-3, linear warm-up over 100 steps (step s has
    lr * min(1, (s + 1) / 100)), times a cosine decay to 5% of the peak by the end of the
    run, measured as the wall-clock fraction f of --minutes:
    0.05 + 0.95 * 0.5 * (1 + cos(pi f)); gradient-norm clipping at 100 (all gradients
    scaled by 100 / norm when the global norm is above 100; a step whose norm is not finite
    is skipped), on the gradient of the loss clayflow uses, the batch's mean bits/dim.
    Any option given with it overrides that one setting, e.g. --like-clayflow --lr 1e-3.

Options (each default is the as-shipped value unless --like-clayflow):
  --logit ALPHA        logit pre-transform (normflows' nf.transforms.Logit, which computes
                       exactly clayflow's y = logit(a + (1 - 2a) u) and log-det; 0 = none)
  --optimizer adam|adamax   adamax keeps weight decay 1e-5; adam has none
  --lr LR              peak learning rate (1e-3)
  --warmup STEPS       linear warm-up steps (0)
  --schedule constant|cosine
  --clip NORM          gradient-norm clipping threshold (0 = none)
  --loss nats|bpd      what is minimised: normflows' forward_kld (mean nats) or clayflow's
                       mean bits/dim; only the units differ, which matters for --clip
The final JSON line (and result.json) records every setting, the steps, images/s and the
validation curve. --selftest checks the logit log-det and the schedule numerically.

Not part of clayflow: never a runtime dependency. Needs torch and normflows:
    /tmp/clayflow-torch-venv/bin/pip install normflows   (or: bash tools/reference/setup.sh, then pip)
Usage:
    python tools/reference/normflows_glow.py --minutes 10 --threads 2 --out runs/normflows-glow
    python tools/reference/normflows_glow.py --like-clayflow --minutes 10 --threads 2 --out runs/nf-like
    python tools/reference/normflows_glow.py --selftest
It prints one line per evaluation and a final JSON line; writes samples.pgm (an 8x8 grid,
temperature 0.8). tools/reference/peer-10min.sh runs the whole like-for-like comparison.
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

# The training settings: as shipped (issue 8's run) and clayflow's defaults for a Glow
# preset (trainer/src/main.rs, trainer/src/train.rs `TrainConfig::new`).
AS_SHIPPED = {"logit": 0.0, "optimizer": "adamax", "lr": 1e-3, "warmup": 0,
              "schedule": "constant", "clip": 0.0, "loss": "nats"}
LIKE_CLAYFLOW = {"logit": 0.05, "optimizer": "adam", "lr": 2e-3, "warmup": 100,
                 "schedule": "cosine", "clip": 100.0, "loss": "bpd"}
ADAMAX_WEIGHT_DECAY = 1e-5


def load_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, n, h, w = struct.unpack(">IIII", raw[:16])
    if magic != 2051 or len(raw) != 16 + n * h * w:
        sys.exit(f"error: {path} is not an IDX image file")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, h, w)


def build(levels, steps, hidden, shape, logit=0.0):
    """normflows' Glow example, unconditional (GlowBase) instead of class-conditional.

    With logit > 0 the data first goes through nf.transforms.Logit(logit) (MultiscaleFlow's
    `transform`: its inverse maps u to y on the way to the latent and adds the log-det)."""
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
    transform = nf.transforms.Logit(alpha=logit) if logit > 0 else None
    return nf.MultiscaleFlow(q0, flows, merges, transform=transform, class_cond=False)


def bpd_per_image(model, x):
    """Bits/dim of each u in x: -log p(u) / (D ln 2) + 8 (p(u) includes any logit's log-det)."""
    d = x[0].numel()
    return -model.log_prob(x, None) / (d * math.log(2)) + 8.0


def bpd(model, x):
    return bpd_per_image(model, x).mean().item()


def evaluate(model, val, noise, batch=250):
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(val), batch):
            x = (val[i : i + batch] + noise[i : i + batch]) / 256.0
            total += bpd(model, x) * len(x)
    model.train()
    return total / len(val)


def lr_at(s, step, elapsed, budget):
    """clayflow's `Run::lr` for the update after `step` earlier steps, `elapsed` seconds in:
    peak * linear warm-up * (cosine to 5% of the peak by the wall-clock fraction)."""
    warm = 1.0 if s["warmup"] == 0 else min(1.0, (step + 1) / s["warmup"])
    if s["schedule"] == "cosine":
        f = min(1.0, elapsed / max(budget, 1e-9))
        decay = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * f))
    else:
        decay = 1.0
    return s["lr"] * warm * decay


def clip_gradients(params, max_norm):
    """clayflow's clipping: the global norm of all gradients; scaled by max_norm / norm when
    above it. Returns the norm (before scaling)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
    norm = norm.item()
    if math.isfinite(norm) and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / norm)
    return norm


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


def selftest():
    """Numerical checks: the logit's log-det inside the model against a hand computation
    (shared MATH.md, in float64), the logit round trip, and the learning-rate schedule."""
    torch.manual_seed(0)
    alpha, d = 0.05, 784
    imgs = torch.from_numpy(load_idx(MNIST)[[0, 1, 7000, 7999]].astype(np.float64))
    v = torch.from_numpy(np.random.default_rng(1).random(imgs.shape))
    u = (imgs + v) / 256.0
    model = build(2, 2, 8, (1, 28, 28), logit=alpha).double()
    # Hand computation: s = a + (1 - 2a) u, y = ln s - ln(1 - s), per-pixel log|dy/du| =
    # ln(1 - 2a) - ln s - ln(1 - s).
    un = u.numpy()
    s = alpha + (1 - 2 * alpha) * un
    y = torch.from_numpy(np.log(s) - np.log1p(-s))
    hand = (np.log(1 - 2 * alpha) - np.log(s) - np.log1p(-s)).reshape(len(un), -1).sum(axis=1)
    with torch.no_grad():
        transform, model.transform = model.transform, None
        model(y)  # ActNorm's data-dependent init, from y, so both calls below share weights
        model.eval()
        lp_flow = model.log_prob(y, None)  # the flow alone, on y
        model.transform = transform
        lp_full = model.log_prob(u, None)  # logit + flow, on u
        y2, ld = transform.inverse(u)
        u2, ld_back = transform.forward(y2)
    got = (lp_full - lp_flow).numpy()
    err_ld = np.abs(got - hand).max()
    err_y = (y2 - y).abs().max().item()
    err_u = (u2 - u).abs().max().item()
    err_back = (ld + ld_back).abs().max().item()
    print(f"logit log-det: model log p(u) - log p(y) = {got.round(4).tolist()} nats")
    print(f"               hand sum of log|dy/du|    = {hand.round(4).tolist()} nats; max |diff| {err_ld:.2e}")
    print(f"               in bits/dim: {(hand / (d * math.log(2))).round(4).tolist()}")
    print(f"logit map: max |y - hand y| {err_y:.2e}; round trip max |u' - u| {err_u:.2e}; "
          f"forward + inverse log-det {err_back:.2e}")
    # The schedule against clayflow's formula at a few points (peak 2e-3, 100 warm-up steps).
    s = dict(LIKE_CLAYFLOW)
    checks = [((0, 0.0, 600.0), 2e-3 / 100), ((49, 0.0, 600.0), 2e-3 * 0.5),
              ((99, 0.0, 600.0), 2e-3), ((500, 300.0, 600.0), 2e-3 * 0.525),
              ((900, 600.0, 600.0), 2e-3 * 0.05), ((900, 700.0, 600.0), 2e-3 * 0.05),
              ((10, 150.0, 600.0), 2e-3 * 0.11 * (0.05 + 0.475 * (1 + math.cos(math.pi / 4))))]
    err_lr = max(abs(lr_at(s, *a) - want) for a, want in checks)
    print(f"schedule: max |lr - expected| {err_lr:.2e} over {len(checks)} points")
    ok = err_ld < 1e-8 and err_y < 1e-10 and err_u < 1e-10 and err_back < 1e-8 and err_lr < 1e-15
    print("selftest: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="GlowBlocks per level (K)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--like-clayflow", action="store_true",
                    help="clayflow's defaults: --logit 0.05 --optimizer adam --lr 2e-3 --warmup 100 "
                         "--schedule cosine --clip 100 --loss bpd (options given override)")
    ap.add_argument("--logit", type=float, default=None, metavar="ALPHA",
                    help="logit pre-transform with this alpha (0: none; as shipped 0)")
    ap.add_argument("--optimizer", choices=["adam", "adamax"], default=None,
                    help="adamax (as shipped, weight decay 1e-5) or adam (no weight decay)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (as shipped 1e-3)")
    ap.add_argument("--warmup", type=int, default=None, metavar="STEPS",
                    help="linear warm-up steps (as shipped 0)")
    ap.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                    help="after warm-up: constant (as shipped) or cosine to 5%% of the peak by "
                         "the wall-clock fraction of --minutes")
    ap.add_argument("--clip", type=float, default=None, metavar="NORM",
                    help="gradient-norm clipping threshold (0: none; as shipped 0)")
    ap.add_argument("--loss", choices=["nats", "bpd"], default=None,
                    help="minimise mean nats (normflows' forward_kld, as shipped) or mean bits/dim (clayflow)")
    ap.add_argument("--eval-every", type=float, default=60.0, help="seconds between evaluations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for samples.pgm and result.json")
    ap.add_argument("--selftest", action="store_true",
                    help="check the logit log-det and the schedule numerically, then exit")
    a = ap.parse_args()
    if a.selftest:
        torch.set_num_threads(1)
        return selftest()

    base = LIKE_CLAYFLOW if a.like_clayflow else AS_SHIPPED
    s = {k: (getattr(a, k) if getattr(a, k) is not None else v) for k, v in base.items()}
    if not (s["logit"] == 0 or 0 < s["logit"] < 0.5):
        sys.exit("error: --logit must be 0 (none) or in (0, 0.5)")
    if s["lr"] <= 0 or s["warmup"] < 0 or s["clip"] < 0 or a.minutes <= 0:
        sys.exit("error: --lr and --minutes must be positive, --warmup and --clip not negative")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    imgs = torch.from_numpy(load_idx(MNIST).astype(np.float32))
    train, val = imgs[:-1000], imgs[-1000:]
    noise = torch.from_numpy(np.random.default_rng(0).random(val.shape, dtype=np.float32))

    model = build(a.levels, a.steps, a.hidden, tuple(train.shape[1:]), logit=s["logit"])
    params = sum(p.numel() for p in model.parameters())
    plist = list(model.parameters())
    if s["optimizer"] == "adamax":
        opt = torch.optim.Adamax(plist, lr=s["lr"], weight_decay=ADAMAX_WEIGHT_DECAY)
    else:
        opt = torch.optim.Adam(plist, lr=s["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    dims = train[0].numel()
    described = " ".join(f"{k} {v}" for k, v in s.items())
    print(f"normflows {nf.__version__} Glow L={a.levels} K={a.steps} hidden={a.hidden}: "
          f"{params} parameters; torch {torch.__version__}, {a.threads} threads; {described}"
          + (" (like clayflow)" if a.like_clayflow else ""), flush=True)

    # ActNorm's data-dependent init runs on the first forward pass.
    gen = torch.Generator().manual_seed(a.seed)
    budget = a.minutes * 60.0
    start = time.perf_counter()
    next_eval = a.eval_every
    step, epoch, curve, skipped = 0, 0, [], 0
    lr = s["lr"]
    done = False
    while not done:
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train) - a.batch + 1, a.batch):
            if s["warmup"] > 0 or s["schedule"] != "constant":
                lr = lr_at(s, step, time.perf_counter() - start, budget)
                for g in opt.param_groups:
                    g["lr"] = lr
            x = (train[perm[i : i + a.batch]] + torch.rand(a.batch, *train.shape[1:], generator=gen)) / 256.0
            if s["loss"] == "bpd":
                loss = bpd_per_image(model, x).mean()
            else:
                loss = model.forward_kld(x)
            opt.zero_grad()
            if torch.isfinite(loss):
                loss.backward()
                if s["clip"] > 0 and not math.isfinite(clip_gradients(plist, s["clip"])):
                    skipped += 1  # clayflow skips a step whose gradient norm is not finite
                else:
                    opt.step()
            else:
                skipped += 1
            step += 1
            t = time.perf_counter() - start
            if t >= next_eval or t >= budget:
                v = evaluate(model, val, noise)
                curve.append({"step": step, "seconds": round(t, 1), "val_bpd": v})
                train_bpd = loss.item() if s["loss"] == "bpd" else loss.item() / (dims * math.log(2)) + 8.0
                print(f"step {step:6d}  {t:7.1f} s  train loss {loss.item():.4f} ({train_bpd:.4f} bits/dim)  "
                      f"lr {lr:.3g}  val {v:.4f} bits/dim", flush=True)
                next_eval += a.eval_every
            if t >= budget:
                done = True
                break
        epoch += 1

    seconds = time.perf_counter() - start
    final = curve[-1]["val_bpd"]
    result = {"tool": "normflows_glow.py", "params": params, "steps": step, "epochs": epoch,
              "minutes": a.minutes, "threads": a.threads, "val_bpd": final,
              "seconds": round(seconds, 1), "images_per_sec": round(step * a.batch / seconds, 1),
              "like_clayflow": a.like_clayflow, "settings": dict(s),
              "adam": {"betas": [0.9, 0.999], "eps": 1e-8} if s["optimizer"] == "adam" else None,
              "weight_decay": ADAMAX_WEIGHT_DECAY if s["optimizer"] == "adamax" else 0.0,
              "batch": a.batch, "levels": a.levels, "K": a.steps, "hidden": a.hidden,
              "seed": a.seed, "eval_every": a.eval_every, "skipped_steps": skipped,
              "curve": curve, "torch": torch.__version__, "normflows": nf.__version__}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        model.eval()
        with torch.no_grad():
            smp, _ = model.sample(64, temperature=0.8)
        pix = np.clip(np.floor(np.nan_to_num(smp.numpy()) * 256.0), 0, 255).astype(np.uint8)
        write_grid(os.path.join(a.out, "samples.pgm"), pix)
        with open(os.path.join(a.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
