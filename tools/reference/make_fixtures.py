#!/usr/bin/env python3
"""Writes the PyTorch golden fixtures `tests/fixtures/pytorch_{mnist,mnist_f16,color}.safetensors`,
then (through `glow_fixtures.py`, whose docstring describes them) the Glow fixtures
`tests/fixtures/pytorch_glow{,_prior,_f16}.safetensors`.

`tests/pytorch_golden.rs` checks the kernel and the trainer against them. Everything here is
computed in float64 by `flow.py` (PyTorch autograd for the gradients) from inputs that are
exactly representable in float32, so the Rust side (f32 arithmetic) sees bit-identical
inputs and only its own rounding separates it from the reference.

Models
* mnist: the trained MNIST model committed at `tools/firmware/model-f32.cfw` (read through
  the blob format of kernel/FORMAT.md; its CRC is recorded so a re-exported blob is caught).
* mnist_f16: the same model's committed f16 blob `tools/firmware/model-f16.cfw` (weights
  widened exactly); only log p, z and the inverse (the kernel's f16 path), no gradients.
* color: the colour preset (kernel/src/arch.rs `COLOR`, 3,004,344 parameters) with weights
  from a closed-form hash formula (`color_params`, restated in tests/pytorch_golden.rs), so no
  12 MB weight file is needed. Element i of blob-order tensor t takes
  `r = (splitmix64((t << 32) | i) >> 40) / 2^24` in [0, 1) and
    scale:             0.5 + 0.5 r
    conv0/conv1 w, b:  (2r - 1) / sqrt(fan_in)          (PyTorch's default init bound)
    conv2 w, b:        0.5 (2r - 1) / sqrt(fan_in)      (non-zero: couplings are not the identity)
  each computed in float64 and rounded once to float32.

Inputs (real data from data/)
* mnist: 4 digits of data/mnist8k-train-images-idx3-ubyte.gz (indices in `indices`),
  dequantized with fixed noise v from numpy's PCG64 (seed 6), u = f32((x + v) / 256),
  stored as `u` (float32) together with `pixels`.
* color: 2 crops of 32x32 from data/photos/{astronaut,coffee}.png (positions in
  `crops`, rows of [file index, top, left]; files sorted by name: 0 astronaut, 1 coffee),
  decoded by a small PNG reader here, same noise scheme (seed 7).
* z_in: latents for the inverse, f32(0.8 * N(0, 1)) from PCG64 (seed 8 / 9).

Outputs (float64 unless said): z (flow layout), log_det (logit + couplings), log_prob,
bpd, loss (mean bpd), sample_u (inverse of z_in: dequantized values in image layout),
and gradients of the loss w.r.t. the parameters, stored as float32 (the Rust side
computes in f32; f32 storage adds 6e-8 relative, far below the tolerances):
* mnist: every parameter, `grad.<name>` (334,440 values, 1.3 MB).
* color: a documented subset (all 3,004,344 would be 12 MB): `grad.<name>` in full for
  every scale, bias and conv0 weight; `grad_sub.<name>` = every 61st element (index
  0, 61, 122, ...) of each conv1 and conv2 weight; and, for every one of the 84 tensors,
  `grad_norm` (Euclidean norm) and `grad_proj` (dot product with the sign vector
  s_i = +1 if splitmix64(((1000 + t) << 32) | i) is even, else -1), which see every element.
  `param_proj` / `param_norm` are the same two numbers of the weights themselves, so the
  Rust test can prove its copy of the formula gives the same weights.
* `torch_f32_grad_err` (both): ||g_f32 - g_f64|| per tensor, where g_f32 is PyTorch's own
  float32 gradient: the scale of error any f32 implementation makes on this loss, which
  the Rust test's gradient tolerance is built on.

Regenerate only when the math changes on purpose (never to make a failing test pass):

    /tmp/clayflow-torch-venv/bin/python tools/reference/make_fixtures.py   # ~20 s on a CPU

A rerun reproduces every stored value exactly (checked once, with 2 threads). The files'
bytes can still differ, in the order of the JSON header, so commit only on purpose.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import zlib

import numpy as np
import torch

sys.dont_write_bytecode = True  # leave no __pycache__ in the work tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from flow import COLOR_CONFIG, MNIST_CONFIG, RealNVP  # noqa: E402

ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures")
MNIST_IDX = [0, 1, 7000, 7999]
COLOR_CROPS = [[0, 96, 208], [1, 150, 330]]  # [file index, top, left]; 0 astronaut, 1 coffee
PHOTOS = ["astronaut.png", "coffee.png"]
SUB_STRIDE = 61


# ---------------------------------------------------------------------- blob reader
def read_blob(path: str):
    """A clayflow weight blob (kernel/FORMAT.md) -> (header dict, flat float64 params, crc)."""
    raw = open(path, "rb").read()
    if raw[:8] != b"CLAYFLOW":
        raise SystemExit(f"{path}: not a clayflow blob")
    version, dtype = struct.unpack_from("<HB", raw, 8)
    h, w, c = struct.unpack_from("<HHH", raw, 12)
    squeeze, n = raw[20], raw[21]
    k = list(raw[22:25])
    bits = raw[25]
    h0, h1 = struct.unpack_from("<HH", raw, 26)
    (alpha,) = struct.unpack_from("<f", raw, 32)
    (count,) = struct.unpack_from("<I", raw, 36)
    masks = list(raw[40 : 40 + n])
    crc = struct.unpack_from("<I", raw, len(raw) - 4)[0]
    if version != 1 or zlib.crc32(raw[:-4]) != crc:
        raise SystemExit(f"{path}: bad version or CRC")
    start = (40 + n + 3) & ~3
    if dtype == 1:
        flat = np.frombuffer(raw, dtype="<f4", count=count, offset=start)
    elif dtype == 2:
        flat = np.frombuffer(raw, dtype="<f2", count=count, offset=start)
        # The MNIST preset's tensors all have even lengths, so an f16 blob has no padding.
        assert len(raw) == start + 2 * count + 4, "f16 blob with tensor padding: not handled"
    else:
        raise SystemExit(f"{path}: unknown dtype {dtype}")
    names = ["channel-even", "channel-odd", "checker-even", "checker-odd"]
    cfg = dict(channels=c, height=h, width=w, squeeze=bool(squeeze),
               masks=[names[m] for m in masks], kernels=k, hidden=[h0, h1], bits=bits,
               logit_alpha=alpha)
    return cfg, flat.astype(np.float64), crc


def load_flat(model: RealNVP, flat: np.ndarray) -> None:
    """Blob order is the state_dict order (per coupling: scale, w0, b0, w1, b1, w2, b2)."""
    sd = model.state_dict()
    off, new = 0, {}
    for name, t in sd.items():
        n = t.numel()
        new[name] = torch.from_numpy(flat[off : off + n].copy()).view_as(t).to(t.dtype)
        off += n
    assert off == flat.size, (off, flat.size)
    model.load_state_dict(new)


# ---------------------------------------------------------------------- closed-form weights
M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function of x + golden gamma (uint64 arrays, wrapping)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_uniform(t: int, n: int) -> np.ndarray:
    idx = np.arange(n, dtype=np.uint64) | (np.uint64(t) << np.uint64(32))
    return (splitmix64(idx) >> np.uint64(40)).astype(np.float64) / 16_777_216.0


def hash_signs(t: int, n: int) -> np.ndarray:
    idx = np.arange(n, dtype=np.uint64) | (np.uint64(1000 + t) << np.uint64(32))
    return np.where(splitmix64(idx) & np.uint64(1) == 0, 1.0, -1.0)


def color_params(model: RealNVP) -> np.ndarray:
    """The closed-form colour weights, flat in blob order, float64 values of float32s."""
    out = []
    for t, (name, p) in enumerate(model.state_dict().items()):
        r = hash_uniform(t, p.numel())
        if name.endswith(".scale"):
            v = 0.5 + 0.5 * r
        else:
            conv = int(name.split(".")[2][-1])  # coupling.{i}.conv{j}.{weight,bias}
            w = model.get_submodule(".".join(name.split(".")[:3])).weight
            fan_in = w.shape[1] * w.shape[2] * w.shape[3]
            gain = 0.5 if conv == 2 else 1.0
            v = (2.0 * r - 1.0) * (gain / math.sqrt(fan_in))
        out.append(v.astype(np.float32).astype(np.float64))
    return np.concatenate(out)


# ---------------------------------------------------------------------- data
def mnist_pixels() -> np.ndarray:
    path = os.path.join(ROOT, "data", "mnist8k-train-images-idx3-ubyte.gz")
    raw = gzip.open(path, "rb").read()
    assert int.from_bytes(raw[:4], "big") == 0x803
    n, h, w = (int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    px = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, h, w)
    return px[MNIST_IDX].copy()


def read_png_rgb(path: str) -> np.ndarray:
    """An 8-bit RGB, non-interlaced PNG -> uint8 (H, W, 3). Enough for data/photos."""
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, idat, hdr = 8, b"", None
    while pos < len(raw):
        (ln,) = struct.unpack_from(">I", raw, pos)
        kind = raw[pos + 4 : pos + 8]
        body = raw[pos + 8 : pos + 8 + ln]
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + ln
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and ctype == 2 and interlace == 0, f"{path}: unsupported PNG {hdr}"
    data = zlib.decompress(idat)
    bpp, stride = 3, 3 * w
    img = np.zeros((h, stride), dtype=np.int64)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(h):
        f = data[y * (stride + 1)]
        line = np.frombuffer(data, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1)
        line = line.astype(np.int64)
        cur = np.zeros(stride, dtype=np.int64)
        if f == 0:
            cur = line
        elif f == 1:
            for x in range(stride):
                cur[x] = (line[x] + (cur[x - bpp] if x >= bpp else 0)) & 255
        elif f == 2:
            cur = (line + prev) & 255
        elif f == 3:
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                cur[x] = (line[x] + ((a + prev[x]) >> 1)) & 255
        elif f == 4:
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev[x]
                c = prev[x - bpp] if x >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
                cur[x] = (line[x] + pred) & 255
        else:
            raise SystemExit(f"{path}: bad PNG filter {f}")
        img[y] = cur
        prev = cur
    return img.reshape(h, w, 3).astype(np.uint8)


def color_pixels() -> np.ndarray:
    imgs = [read_png_rgb(os.path.join(ROOT, "data", "photos", f)) for f in PHOTOS]
    out = []
    for fi, top, left in COLOR_CROPS:
        crop = imgs[fi][top : top + 32, left : left + 32]  # (H, W, 3)
        out.append(crop.transpose(2, 0, 1))  # CHW, as the trainer stores images
    return np.stack(out).copy()


def dequantize(pixels: np.ndarray, seed: int) -> np.ndarray:
    """u = (x + v) / 256 in float32 with v ~ U[0, 1) (float32) from PCG64(seed)."""
    v = np.random.default_rng(seed).random(pixels.shape).astype(np.float32)
    return ((pixels.astype(np.float32) + v) / np.float32(256.0)).astype(np.float32)


def latents(shape, seed: int) -> np.ndarray:
    return (0.8 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------------- evaluation
def evaluate(model: RealNVP, u32: np.ndarray, z_in32: np.ndarray, grads: bool):
    """The reference numbers in float64 (inputs are exact float32 values)."""
    u = torch.from_numpy(u32.astype(np.float64))
    with torch.no_grad():
        z = model.latent(u)
        lp = model.log_prob(u)
        bpd = model.bits_per_dim(lp)
        sq = z.flatten(1).pow(2).sum(1)
        # log p = -0.5 |z|^2 - D/2 ln 2 pi + log_det
        log_det = lp + 0.5 * sq + 0.5 * model.dim * math.log(2 * math.pi)
        zi = torch.from_numpy(z_in32.astype(np.float64)).view(-1, *model.flow_shape)
        sample_u = model.inverse(zi)
    out = dict(
        z=z.flatten(1).numpy(),
        log_det=log_det.numpy(),
        log_prob=lp.numpy(),
        bpd=bpd.numpy(),
        loss=np.array([bpd.mean().item()]),
        sample_u=sample_u.flatten(1).numpy(),
    )
    if grads:
        model.zero_grad(set_to_none=True)
        model.loss(u).backward()
        out["grads"] = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}
        # PyTorch's own float32 error on the same gradients: ||g_f32 - g_f64|| per tensor. A
        # trained model's loss is ill-conditioned (relative errors ~2e-3 in f32 for the
        # committed MNIST model, whatever the implementation), so the Rust test measures its
        # gradient error against this, not against an a-priori epsilon.
        m32 = RealNVP(model.config).float()
        m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        m32.loss(u.float()).backward()
        out["torch_f32_grad_err"] = np.array([
            np.linalg.norm(p.grad.double().numpy().reshape(-1) - out["grads"][n].reshape(-1))
            for n, p in m32.named_parameters()
        ])
    return out


def save(name: str, tensors: dict, meta: dict) -> None:
    from safetensors.numpy import save_file

    path = os.path.join(OUT, f"pytorch_{name}.safetensors")
    clean = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(clean, path, metadata={k: str(v) for k, v in meta.items()})
    print(f"wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path)} bytes, "
          f"{len(clean)} tensors)")


def report(name: str, r: dict) -> None:
    print(f"{name}: log p {np.array2string(r['log_prob'], precision=4)}, "
          f"bpd {np.array2string(r['bpd'], precision=4)}, loss {r['loss'][0]:.6f}, "
          f"max|z| {np.abs(r['z']).max():.3f}, sample_u range "
          f"[{r['sample_u'].min():.4f}, {r['sample_u'].max():.4f}]")


def main() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(OUT, exist_ok=True)
    common = dict(generator="tools/reference/make_fixtures.py", torch=torch.__version__,
                  dtype="float64")

    # --- MNIST, trained weights (f32 blob), full gradients.
    blob = os.path.join(ROOT, "tools", "firmware", "model-f32.cfw")
    cfg, flat, crc = read_blob(blob)
    assert cfg == dict(MNIST_CONFIG, logit_alpha=cfg["logit_alpha"]), cfg
    model = RealNVP(cfg).double()
    load_flat(model, flat)
    px = mnist_pixels()
    u = dequantize(px, 6)
    z_in = latents((2, model.dim), 8)
    r = evaluate(model, u, z_in, grads=True)
    report("mnist", r)
    t = dict(pixels=px, indices=np.array(MNIST_IDX, dtype=np.int64), u=u.reshape(len(px), -1),
             z_in=z_in, **{k: v for k, v in r.items() if k not in ("grads", "torch_f32_grad_err")})
    t["torch_f32_grad_err"] = r["torch_f32_grad_err"]
    for n, g in r["grads"].items():
        t[f"grad.{n}"] = g.astype(np.float32).reshape(-1)
    save("mnist", t, dict(common, weights="tools/firmware/model-f32.cfw", blob_crc=f"{crc:#010x}"))

    # --- MNIST, the committed f16 blob: forward and inverse only.
    blob16 = os.path.join(ROOT, "tools", "firmware", "model-f16.cfw")
    cfg16, flat16, crc16 = read_blob(blob16)
    model16 = RealNVP(cfg16).double()
    load_flat(model16, flat16)
    r16 = evaluate(model16, u, z_in, grads=False)
    report("mnist_f16", r16)
    save("mnist_f16", dict(u=u.reshape(len(px), -1), z_in=z_in, **r16),
         dict(common, weights="tools/firmware/model-f16.cfw", blob_crc=f"{crc16:#010x}",
              inputs="u and z_in are those of pytorch_mnist.safetensors"))

    # --- colour preset, closed-form weights, gradient subset.
    cmodel = RealNVP(COLOR_CONFIG).double()
    cflat = color_params(cmodel)
    load_flat(cmodel, cflat)
    cpx = color_pixels()
    cu = dequantize(cpx, 7)
    cz_in = latents((1, cmodel.dim), 9)
    cr = evaluate(cmodel, cu, cz_in, grads=True)
    report("color", cr)
    t = dict(pixels=cpx, crops=np.array(COLOR_CROPS, dtype=np.int64),
             u=cu.reshape(len(cpx), -1), z_in=cz_in,
             **{k: v for k, v in cr.items() if k not in ("grads", "torch_f32_grad_err")})
    norms, projs, pnorms, pprojs = [], [], [], []
    off = 0
    for ti, (n, g) in enumerate(cr["grads"].items()):
        g = g.reshape(-1)
        s = hash_signs(ti, g.size)
        p = cflat[off : off + g.size]
        off += g.size
        norms.append(np.sqrt((g * g).sum()))
        projs.append((g * s).sum())
        pnorms.append(np.sqrt((p * p).sum()))
        pprojs.append((p * s).sum())
        if ".conv1.weight" in n or ".conv2.weight" in n:
            t[f"grad_sub.{n}"] = g[::SUB_STRIDE].astype(np.float32)
        else:
            t[f"grad.{n}"] = g.astype(np.float32)
    t.update(grad_norm=np.array(norms), grad_proj=np.array(projs),
             param_norm=np.array(pnorms), param_proj=np.array(pprojs),
             torch_f32_grad_err=cr["torch_f32_grad_err"])
    save("color", t, dict(common, weights="closed-form hash formula (make_fixtures.py)",
                          sub_stride=SUB_STRIDE))

    # --- mnist-glow: closed-form weights (floor 1/16) and the trained f16 blob (floor 0).
    import glow_fixtures  # here, not at the top: it imports this module's helpers

    glow_fixtures.main(common)


if __name__ == "__main__":
    main()
