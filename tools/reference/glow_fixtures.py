#!/usr/bin/env python3
"""Writes the Glow golden fixtures `tests/fixtures/pytorch_glow{,_prior,_f16}.safetensors`.

Called by `make_fixtures.py` (which writes all six fixtures); `python3 glow_fixtures.py`
writes only these three. `tests/pytorch_golden_glow.rs` checks the kernel and the trainer
against them. As for the RealNVP fixtures, everything is float64 (`glow.py`, autograd for
the gradients) from inputs that are exact float32 values.

Models
* glow: the `mnist-glow` preset (kernel/src/arch.rs `MNIST_GLOW`, floor 1/16) in the
  trainer's checkpoint layout (LU factors), weights from a closed-form hash formula
  (`glow_params`, restated in tests/pytorch_golden_glow.rs). Element i of checkpoint-order
  tensor t (trainer/src/config.rs `tensor_specs`: per step the 7 Glow tensors, then the
  coupling's 7) takes r = (splitmix64((t << 32) | i) >> 40) / 2^24 in [0, 1) (make_fixtures.py
  `hash_uniform`), and with q = 2r - 1:
    actnorm.logs   0.2 q                 actnorm.bias   0.2 q
    invconv.perm   the stable argsort of the tensor's r values (a permutation of 0..C)
    invconv.sign   -1 if r < 0.5, else +1
    invconv.lower  0.2 q below the diagonal, 0 elsewhere
    invconv.upper  0.2 q above the diagonal, 0 elsewhere
    invconv.log_s  0.3 q
    coupling.scale 1 (unused by Glow, the trainer's value)
    conv0/conv1 w, b  q / sqrt(fan_in);   conv2 w, b  0.5 q / sqrt(fan_in)
  each computed in float64 and rounded once to float32. (Larger ActNorm or triangle values
  compound over 32 steps: off-diagonals of 0.5 q gave max|z| ~ 4500 and a round trip
  u -> z -> u losing 6e-4 even in float64; these give max|z| ~ 10, ~9 bits/dim.)
* glow_prior: the same preset with Glow's learned prior (`"prior": true`, `Arch::prior`;
  glow.py's docstring has the math) and the same formula. The steps' tensors come first in
  checkpoint order, so they are the glow fixture's weights; the prior's five tensors
  (`prior_specs`: prior.0.{scale [2], weight [4, 2, 3, 3], bias [4]}, top.{logs, bias} [8];
  t = 448 .. 452) take, all non-zero so that each one matters (`prior_param`):
    prior.{l}.scale   0.75 + 0.5 r (the tanh bound, around 1)
    prior.{l}.weight  0.1 q          prior.{l}.bias  0.1 q
    top.logs          0.2 q          top.bias        0.2 q
  rounded once to float32. They raise log p by 95 to 146 nats (8.88 bits/dim against
  9.11); max|z| ~ 9.9.
* glow_f16: the committed trained blob `tools/firmware/model-glow-f16.cfw` (version 3,
  floor 0: written before the floor existed), read through kernel/FORMAT.md: W as stored,
  ln|det W| recomputed from it in float64 (the blob's f32 value agrees to ~1e-7), the
  inverse through the float64 inverse of W. Kernel only (no gradients); its CRC is stored.

Inputs: digits 0, 1, 7000, 7999 of data/mnist8k-train-images-idx3-ubyte.gz (as the MNIST
fixture) with fixed noise from PCG64 (seed 10), the same u in both fixtures. z_in: for
glow_f16 (trained) f32(0.8 N(0, 1)) from PCG64 (seed 11), a temperature-0.8 sample; for
glow and glow_prior (untrained) f32(z of digits 0 and 3, each under its own model,
+ 0.1 N(0, 1)) (seed 12), because an untrained
Glow's inverse of N(0, 0.8^2) saturates 97% of the pixels and is ill-conditioned (PyTorch's
own float32 inverse is 2e-3 off its float64 one); near the data it is not (~1e-5).

Outputs: z (the kernel's latent layout), log_det, log_prob, bpd, loss, sample_u (inverse of
z_in) in float64; for glow and glow_prior also `grad.<name>` of the loss for every
checkpoint tensor (float32; 304,864 values, 1.2 MB, and 94 more with the prior; zero for
the fixed `perm`, `sign` and the coupling's unused `scale`),
`torch_f32_grad_err` per tensor (PyTorch's own float32 gradient error, checkpoint order),
and `param_norm` / `param_proj` (norm and signed projection with make_fixtures.py
`hash_signs(t)`) of every weight tensor, so the Rust test can prove its copy of the
formula. glow_prior's metadata also has `prior` = True.

A rerun reproduces every stored value exactly (checked 2026-12-06, all five fixtures, and
again for glow and glow_f16 when glow_prior was added: every tensor and the metadata
equal); the files' bytes differ in the order of the JSON header, so commit them only on
purpose.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib

import numpy as np
import torch

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_fixtures as mf  # noqa: E402
from glow import MNIST_GLOW_CONFIG, Glow  # noqa: E402

GLOW_BLOB = os.path.join("tools", "firmware", "model-glow-f16.cfw")


def fan_in(shape) -> int:
    return int(np.prod(shape[1:]))


def glow_params(model: Glow) -> dict:
    """The closed-form weights (see the module docstring), float64 values of float32s."""
    sd = model.state_dict()
    out, w_shape = {}, None
    for t, name in enumerate(model.spec_names()):
        shape = tuple(sd[name].shape)
        n = int(np.prod(shape))
        r = mf.hash_uniform(t, n)
        q = 2.0 * r - 1.0
        if name.startswith(("prior.", "top.")):
            v = prior_param(name, r, q)
            out[name] = v.astype(np.float32).astype(np.float64).reshape(shape)
            continue
        kind = name.split(".", 2)[2]
        if name.endswith(".weight"):
            w_shape = shape
        if kind == "actnorm.logs":
            v = 0.2 * q
        elif kind == "actnorm.bias":
            v = 0.2 * q
        elif kind == "invconv.perm":
            v = np.argsort(r, kind="stable").astype(np.float64)
        elif kind == "invconv.sign":
            v = np.where(r < 0.5, -1.0, 1.0)
        elif kind in ("invconv.lower", "invconv.upper"):
            c = shape[0]
            row, col = np.divmod(np.arange(n), c)
            keep = row > col if kind == "invconv.lower" else row < col
            v = np.where(keep, 0.2 * q, 0.0)
        elif kind == "invconv.log_s":
            v = 0.3 * q
        elif kind == "scale":
            v = np.ones(n)
        else:
            gain = 0.5 if kind.startswith("conv2") else 1.0
            v = q * (gain / np.sqrt(fan_in(w_shape)))
        out[name] = v.astype(np.float32).astype(np.float64).reshape(shape)
    return out


def prior_param(name: str, r: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The learned prior's closed-form values (module docstring), before the f32 rounding."""
    kind = name.rsplit(".", 1)[1]
    if name.startswith("top."):
        return 0.2 * q  # top.logs, top.bias
    if kind == "scale":
        return 0.75 + 0.5 * r
    return 0.1 * q  # prior.{l}.weight, prior.{l}.bias


def read_glow_blob(path: str):
    """A version 3 Glow blob (kernel/FORMAT.md) -> (config, {name: float64 array}, crc)."""
    raw = open(path, "rb").read()
    assert raw[:8] == b"CLAYFLOW", path
    version, dtype = struct.unpack_from("<HB", raw, 8)
    crc = struct.unpack_from("<I", raw, len(raw) - 4)[0]
    assert version == 3 and zlib.crc32(raw[:-4]) == crc, f"{path}: version {version} or CRC"
    h, w, c = struct.unpack_from("<HHH", raw, 12)
    levels, flags, squeeze, n = raw[18], raw[19], raw[20], raw[21]
    assert flags == 1 and squeeze == 1
    k = list(raw[22:25])
    h0, h1 = struct.unpack_from("<HH", raw, 26)
    floor = float(np.frombuffer(raw, dtype="<f2", count=1, offset=30)[0])
    (alpha,) = struct.unpack_from("<f", raw, 32)
    names = ["channel-even", "channel-odd", "checker-even", "checker-odd"]
    cfg = dict(channels=c, height=h, width=w, squeeze=True, levels=levels, glow=True,
               masks=[names[m] for m in raw[40 : 40 + n]], kernels=k, hidden=[h0, h1],
               bits=raw[25], logit_alpha=alpha, scale_floor=floor)
    model = Glow(cfg, lu=False)
    sd = model.state_dict()
    size, code = {1: (4, "<f4"), 2: (2, "<f2")}[dtype]
    pos = (40 + n + 3) & ~3
    tensors = {}

    def take(name, shape, nbytes, code):
        nonlocal pos
        cnt = int(np.prod(shape))
        v = np.frombuffer(raw, dtype=code, count=cnt, offset=pos).astype(np.float64)
        pos += (cnt * nbytes + 3) & ~3
        tensors[name] = v.reshape(shape)

    for i in range(n):
        ci = sd[f"step.{i}.invconv.weight"].shape[0]
        take(f"step.{i}.actnorm.logs", (ci,), 4, "<f4")
        take(f"step.{i}.actnorm.bias", (ci,), 4, "<f4")
        take(f"step.{i}.invconv.weight", (ci, ci), 4, "<f4")
        take(f"blob.{i}.w_inv", (ci, ci), 4, "<f4")
        take(f"blob.{i}.logdet", (1,), 4, "<f4")
        for t in mf_coupling_names(i):
            take(t, tuple(sd[t].shape), size, code)
    assert pos == len(raw) - 4, (pos, len(raw))
    return cfg, tensors, crc


def mf_coupling_names(i: int) -> list[str]:
    return [f"coupling.{i}.conv{j}.{p}" for j in range(3) for p in ("weight", "bias")]


def load(model: Glow, tensors: dict) -> None:
    sd = model.state_dict()
    new = {k: torch.from_numpy(np.ascontiguousarray(tensors[k])).to(v.dtype)
           if k in tensors else v for k, v in sd.items()}
    model.load_state_dict(new)


def evaluate(model: Glow, u32: np.ndarray, z_in32: np.ndarray, grads: bool) -> dict:
    u = torch.from_numpy(u32.astype(np.float64)).view(-1, model.channels, model.height,
                                                        model.width)
    with torch.no_grad():
        z, log_det = model.latent_and_logdet(u)
        lp = -0.5 * z.pow(2).sum(1) - 0.5 * model.dim * np.log(2 * np.pi) + log_det
        bpd = model.bits_per_dim(lp)
        sample_u = model.inverse(torch.from_numpy(z_in32.astype(np.float64)))
        back = model.inverse(z)
    print(f"  round trip u -> z -> u: max|err| {(back - u).abs().max().item():.2e}")
    out = dict(z=z.numpy(), log_det=log_det.numpy(), log_prob=lp.numpy(), bpd=bpd.numpy(),
               loss=np.array([bpd.mean().item()]), sample_u=sample_u.flatten(1).numpy())
    if grads:
        names = model.spec_names()

        def grads_of(m, uu):
            m.zero_grad(set_to_none=True)
            m.loss(uu).backward()
            ps = dict(m.named_parameters())
            return {n: (ps[n].grad.double().numpy() if ps[n].grad is not None
                        else np.zeros(tuple(ps[n].shape))) for n in names}

        g64 = grads_of(model, u)
        m32 = Glow(model.config).float()
        m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        g32 = grads_of(m32, u.float())
        out["grads"] = g64
        out["torch_f32_grad_err"] = np.array(
            [np.linalg.norm((g32[n] - g64[n]).reshape(-1)) for n in names])
    return out


def closed_form(name: str, config: dict, px: np.ndarray, u: np.ndarray, common: dict) -> None:
    """A closed-form fixture (`glow`, `glow_prior`): `glow_params` weights in the checkpoint
    (LU) layout, all gradients, latents near the data (see `main`)."""
    model = Glow(config).double()
    params = glow_params(model)
    load(model, params)
    # An untrained Glow's inverse of N(0, 0.8^2) latents is useless as a check: 97% of the
    # pixels saturate the logit and PyTorch's own float32 inverse is 2e-3 off its float64
    # one (32 steps, each expanding up to 16-fold). Latents near the data are well
    # conditioned: z of digits 0 and 3 plus 0.1 N(0, 1) (PCG64 seed 12), rounded to f32.
    with torch.no_grad():
        zd = model.latent(torch.from_numpy(u.astype(np.float64)).view(-1, 1, 28, 28)).numpy()
    noise = np.random.default_rng(12).standard_normal((2, 784))
    z_near = (zd[[0, 3]] + 0.1 * noise).astype(np.float32)
    r = evaluate(model, u, z_near, grads=True)
    mf.report(name, r)
    t = dict(pixels=px, indices=np.array(mf.MNIST_IDX, dtype=np.int64), u=u, z_in=z_near,
             **{k: v for k, v in r.items() if k not in ("grads",)})
    pn, pp = [], []
    for ti, tname in enumerate(model.spec_names()):
        g = r["grads"][tname].reshape(-1)
        t[f"grad.{tname}"] = g.astype(np.float32)
        p = params[tname].reshape(-1)
        pn.append(np.sqrt((p * p).sum()))
        pp.append((p * mf.hash_signs(ti, p.size)).sum())
    t.update(param_norm=np.array(pn), param_proj=np.array(pp))
    meta = dict(common, weights="closed-form hash formula (glow_fixtures.py)",
                scale_floor=config["scale_floor"])
    if config.get("prior"):
        meta["prior"] = True
    mf.save(name, t, meta)


def main(common: dict | None = None) -> None:
    torch.set_num_threads(1)
    common = common or dict(generator="tools/reference/make_fixtures.py",
                            torch=torch.__version__, dtype="float64")
    px = mf.mnist_pixels()
    u = mf.dequantize(px, 10).reshape(len(px), -1)
    z_in = mf.latents((2, 784), 11)

    # --- mnist-glow, closed-form weights, floor 1/16, checkpoint (LU) layout; and the same
    # with the learned prior (the same step weights, closed-form prior tensors).
    closed_form("glow", MNIST_GLOW_CONFIG, px, u, common)
    closed_form("glow_prior", dict(MNIST_GLOW_CONFIG, prior=True), px, u, common)

    # --- the committed trained f16 blob (floor 0): kernel checks only.
    cfg, tensors, crc = read_glow_blob(os.path.join(mf.ROOT, GLOW_BLOB))
    assert cfg == dict(MNIST_GLOW_CONFIG, logit_alpha=cfg["logit_alpha"], scale_floor=0.0), cfg
    m16 = Glow(cfg, lu=False).double()
    load(m16, tensors)
    ld_err = max(abs(np.linalg.slogdet(tensors[f"step.{i}.invconv.weight"])[1]
                     - tensors[f"blob.{i}.logdet"][0]) for i in range(len(cfg["masks"])))
    inv_err = max(np.abs(np.linalg.inv(tensors[f"step.{i}.invconv.weight"])
                         - tensors[f"blob.{i}.w_inv"]).max() for i in range(len(cfg["masks"])))
    print(f"  glow_f16 blob: stored ln|det W| vs float64 max|err| {ld_err:.2e}, "
          f"stored W^-1 max|err| {inv_err:.2e}")
    r16 = evaluate(m16, u, z_in, grads=False)
    mf.report("glow_f16", r16)
    mf.save("glow_f16", dict(u=u, z_in=z_in, **r16),
            dict(common, weights=GLOW_BLOB, blob_crc=f"{crc:#010x}", scale_floor=0.0,
                 inputs="u is that of pytorch_glow.safetensors; z_in f32(0.8 N(0, 1)), "
                        "PCG64 seed 11"))


if __name__ == "__main__":
    main()
