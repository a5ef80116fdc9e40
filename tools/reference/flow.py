#!/usr/bin/env python3
"""A PyTorch reference of clayflow's RealNVP model, for side-by-side measurement only.

Never a runtime dependency of clayflow and never used in CI. The math is the one in
shared MATH.md and in the Rust sources (kernel/src/{arch,coupling,preprocess,squeeze}.rs,
trainer/src/model/), restated here:

* dequantize: u = (x + v) / 2^bits, v in [0, 1)  (noise for training; fixed noise or the
  midpoint v = 0.5 for scoring)
* logit: s = a + (1 - 2a) u, y = log s - log(1 - s), log-det per pixel
  log(1 - 2a) - log s - log(1 - s)
* squeeze: F.pixel_unshuffle(y, 2), i.e. (C, H, W) -> (4C, H/2, W/2) with output channel
  4c + 2dy + dx holding input pixel (c, 2i + dy, 2j + dx)
* couplings, each: CNN conv(k0, cin -> h0) ReLU conv(k1, h0 -> h1) ReLU
  conv(k2, h1 -> 2 * changed), padding "same"; output channels [0:changed] are s_raw,
  [changed:] are t; s = scale[j] * tanh(s_raw); y_b = x_b exp(s) + t; log-det += sum(s).
  Channel masks keep channels parity, parity + 2, ... (ChannelEven: parity 0) and change
  channel 2j + 1 - parity for changed index j. Checkerboard masks keep pixels with
  (row + col) % 2 == parity in every channel; the CNN sees all channels with the changed
  pixels zeroed and every channel is changed (only on the changed pixels).
* log p(u) = -0.5 sum z^2 - D/2 ln(2 pi) + logit log-det + coupling log-dets;
  bits/dim = -log p(u) / (D ln 2) + bits; the training loss is the batch mean.
* init: PyTorch's default Conv2d init for conv0 and conv1 (U(+-1/sqrt(fan_in)) for weight
  and bias), conv2 zero (every coupling starts as the identity), scale 1.

Parameter names match clayflow checkpoints (`coupling.{i}.scale`,
`coupling.{i}.conv{j}.weight` / `.bias`, PyTorch layout), so

    model.load_state_dict(safetensors.torch.load_file("RUN/checkpoints/step-N/model.safetensors"))

works directly; `RealNVP.from_checkpoint(path)` also rebuilds the architecture from the
file's metadata.

`python3 flow.py --selftest` checks this module against the committed golden fixtures
(kernel/tests/fixtures/golden_{a,b}.txt, from tools/golden/golden.py) in float64.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

MASKS = ("channel-even", "channel-odd", "checker-even", "checker-odd")

# The MNIST preset (kernel/src/arch.rs `MNIST`): 334,440 parameters.
MNIST_CONFIG = dict(
    channels=1,
    height=28,
    width=28,
    squeeze=True,
    masks=["channel-even", "channel-odd"] * 6,
    kernels=[5, 7, 3],
    hidden=[8, 64],
    bits=8,
    logit_alpha=0.05,
)

# The colour preset (kernel/src/arch.rs `COLOR`): 3x32x32 squeezed to 12x16x16, the same
# 12 alternating channel couplings with widths 24 and 192; 3,004,344 parameters.
COLOR_CONFIG = dict(
    channels=3,
    height=32,
    width=32,
    squeeze=True,
    masks=["channel-even", "channel-odd"] * 6,
    kernels=[5, 7, 3],
    hidden=[24, 192],
    bits=8,
    logit_alpha=0.05,
)

PRESETS = {"mnist": MNIST_CONFIG, "color": COLOR_CONFIG}


def _mask_name(m: str) -> str:
    """Accepts the checkpoint spelling (`channel-even`) and the Rust one (`ChannelEven`)."""
    table = {
        "channeleven": "channel-even",
        "channelodd": "channel-odd",
        "checkereven": "checker-even",
        "checkerodd": "checker-odd",
    }
    key = m.replace("-", "").replace("_", "").lower()
    if key not in table:
        raise ValueError(f"unknown mask {m!r}; expected one of {MASKS}")
    return table[key]


class Coupling(nn.Module):
    """One affine coupling with a three-conv CNN (see the module docstring)."""

    def __init__(
        self,
        mask: str,
        channels: int,
        kernels: Sequence[int] = (5, 7, 3),
        hidden: Sequence[int] = (8, 64),
    ):
        super().__init__()
        mask = _mask_name(mask)
        self.mask = mask
        self.is_channel = mask.startswith("channel")
        self.parity = 0 if mask.endswith("even") else 1
        self.channels = channels
        if self.is_channel:
            kept = (channels + 1 - self.parity) // 2
            self.cin = kept
            self.changed = channels - kept
        else:
            self.cin = channels
            self.changed = channels
        k0, k1, k2 = kernels
        h0, h1 = hidden
        self.scale = nn.Parameter(torch.ones(self.changed))
        # PyTorch's default Conv2d init is U(+-1/sqrt(fan_in)) for weight and bias, the same
        # bound the Rust trainer uses (trainer/src/model/init.rs `init_params`).
        self.conv0 = nn.Conv2d(self.cin, h0, k0, padding=k0 // 2)
        self.conv1 = nn.Conv2d(h0, h1, k1, padding=k1 // 2)
        self.conv2 = nn.Conv2d(h1, 2 * self.changed, k2, padding=k2 // 2)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        # Channel masks: kept / changed channel indices (changed j -> 2j + 1 - parity).
        if self.is_channel:
            kept_idx = list(range(self.parity, channels, 2))
            changed_idx = [2 * j + 1 - self.parity for j in range(self.changed)]
            # Position in cat([x_a, y_b]) of each output channel.
            order = [0] * channels
            for pos, ch in enumerate(kept_idx + changed_idx):
                order[ch] = pos
            self.register_buffer("kept_idx", torch.tensor(kept_idx), persistent=False)
            self.register_buffer("changed_idx", torch.tensor(changed_idx), persistent=False)
            self.register_buffer("order", torch.tensor(order), persistent=False)

    def _keep_plane(self, x: torch.Tensor) -> torch.Tensor:
        """Checkerboard: 1.0 on kept pixels ((row + col) % 2 == parity), else 0.0; (1,1,H,W)."""
        h, w = x.shape[-2:]
        r = torch.arange(h, device=x.device).view(h, 1)
        c = torch.arange(w, device=x.device).view(1, w)
        return ((r + c) % 2 == self.parity).to(x.dtype).view(1, 1, h, w)

    def _cnn(self, cnn_in: torch.Tensor):
        h = F.relu(self.conv0(cnn_in))
        h = F.relu(self.conv1(h))
        st = self.conv2(h)
        s = self.scale.view(1, -1, 1, 1) * torch.tanh(st[:, : self.changed])
        t = st[:, self.changed :]
        return s, t

    def _split(self, x: torch.Tensor):
        if self.channels % 2 == 0:
            # Fast path: strided views instead of index_select.
            xa = x[:, self.parity :: 2]
            xb = x[:, 1 - self.parity :: 2]
        else:
            xa = x.index_select(1, self.kept_idx)
            xb = x.index_select(1, self.changed_idx)
        return xa, xb

    def _merge(self, xa: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if self.channels % 2 == 0:
            pair = (xa, yb) if self.parity == 0 else (yb, xa)
            return torch.stack(pair, dim=2).flatten(1, 2)
        return torch.cat([xa, yb], dim=1).index_select(1, self.order)

    def forward(self, x: torch.Tensor):
        """x (flow layout) -> (y, per-image log-det)."""
        if self.is_channel:
            xa, xb = self._split(x)
            s, t = self._cnn(xa)
            y = self._merge(xa, xb * torch.exp(s) + t)
            return y, s.flatten(1).sum(1)
        keep = self._keep_plane(x)
        change = 1.0 - keep
        s, t = self._cnn(x * keep)
        s = s * change
        y = x * torch.exp(s) + t * change
        return y, s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """y (flow layout) -> x, with the same (s, t) as the forward pass."""
        if self.is_channel:
            ya, yb = self._split(y)
            s, t = self._cnn(ya)
            return self._merge(ya, (yb - t) * torch.exp(-s))
        keep = self._keep_plane(y)
        change = 1.0 - keep
        s, t = self._cnn(y * keep)
        return keep * y + change * ((y - t) * torch.exp(-s))


class RealNVP(nn.Module):
    """clayflow's RealNVP: logit, optional 2x2 squeeze, a stack of affine couplings."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = dict(MNIST_CONFIG if config is None else config)
        self.config = cfg
        self.channels = int(cfg["channels"])
        self.height = int(cfg["height"])
        self.width = int(cfg["width"])
        self.squeeze = bool(cfg["squeeze"])
        self.bits = int(cfg["bits"])
        # The Rust side stores alpha as f32; use that exact value.
        self.alpha = float(torch.tensor(float(cfg["logit_alpha"]), dtype=torch.float32))
        self.dim = self.channels * self.height * self.width
        c = self.channels * 4 if self.squeeze else self.channels
        self.flow_shape = (
            (c, self.height // 2, self.width // 2)
            if self.squeeze
            else (c, self.height, self.width)
        )
        self.coupling = nn.ModuleList(
            Coupling(m, c, cfg["kernels"], cfg["hidden"]) for m in cfg["masks"]
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu") -> "RealNVP":
        """Loads `model.safetensors` (or a checkpoint folder, or a run folder via LATEST)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = resolve_checkpoint(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        cfg = json.loads(meta["config"]) if "config" in meta else MNIST_CONFIG
        model = cls(cfg)
        model.load_state_dict(load_file(path, device=device))
        return model.to(device)

    # ------------------------------------------------------------------ the flow
    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """Per-image log p(u) in nats; u is (B, C, H, W) in [0, 1]."""
        a = self.alpha
        s = a + (1.0 - 2.0 * a) * u
        ls, l1s = torch.log(s), torch.log(1.0 - s)
        y = ls - l1s
        log_det = (math.log(1.0 - 2.0 * a) - ls - l1s).flatten(1).sum(1)
        x = F.pixel_unshuffle(y, 2) if self.squeeze else y
        for c in self.coupling:
            x, ld = c(x)
            log_det = log_det + ld
        return (
            -0.5 * x.flatten(1).pow(2).sum(1)
            - 0.5 * self.dim * math.log(2.0 * math.pi)
            + log_det
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.log_prob(u)

    def latent(self, u: torch.Tensor) -> torch.Tensor:
        """z = f(u) in the flow layout (no log-det)."""
        a = self.alpha
        s = a + (1.0 - 2.0 * a) * u
        x = torch.log(s) - torch.log(1.0 - s)
        x = F.pixel_unshuffle(x, 2) if self.squeeze else x
        for c in self.coupling:
            x, _ = c(x)
        return x

    def bits_per_dim(self, log_prob: torch.Tensor) -> torch.Tensor:
        return -log_prob / (self.dim * math.log(2.0)) + self.bits

    def loss(self, u: torch.Tensor) -> torch.Tensor:
        """The training loss: mean bits/dim over the batch."""
        return self.bits_per_dim(self.log_prob(u)).mean()

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z (B, flow shape) -> dequantized images u (B, C, H, W)."""
        x = z
        for c in reversed(self.coupling):
            x = c.inverse(x)
        if self.squeeze:
            x = F.pixel_shuffle(x, 2)
        a = self.alpha
        return (torch.sigmoid(x) - a) / (1.0 - 2.0 * a)

    def quantize(self, u: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits
        return torch.floor(u * levels).nan_to_num(0.0).clamp(0, levels - 1).to(torch.uint8)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.8, generator=None) -> torch.Tensor:
        """n images (uint8 pixels, (n, C, H, W)) from z ~ N(0, T^2 I)."""
        p = next(self.parameters())
        z = torch.randn(n, *self.flow_shape, generator=generator, dtype=p.dtype, device=p.device)
        return self.quantize(self.inverse(z * temperature))


def resolve_checkpoint(path: str) -> str:
    """A run folder (its checkpoints/LATEST, else the newest step-*), a checkpoint folder,
    or a model.safetensors file -> the model.safetensors path."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return os.path.join(path, "model.safetensors")
    ck = os.path.join(path, "checkpoints")
    if os.path.isdir(ck):
        latest = os.path.join(ck, "LATEST")
        if os.path.isfile(latest):
            name = open(latest).read().strip()
            p = os.path.join(ck, name, "model.safetensors")
            if os.path.isfile(p):
                return p
        steps = sorted(
            d for d in os.listdir(ck) if d.startswith("step-") and d[5:].isdigit()
        )
        for d in reversed(steps):
            p = os.path.join(ck, d, "model.safetensors")
            if os.path.isfile(p):
                return p
    raise FileNotFoundError(f"no model.safetensors found under {path}")


# ---------------------------------------------------------------------- self-test
def _read_fixture(path: str) -> dict:
    out = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        key, *vals = line.split()
        out[key] = vals
    return out


def _load_flat(model: RealNVP, flat: torch.Tensor) -> None:
    """Fills parameters from a flat vector in blob order (per coupling: scale, w0, b0, w1,
    b1, w2, b2), which is also the state_dict order."""
    sd = model.state_dict()
    off = 0
    new = {}
    for name, t in sd.items():
        n = t.numel()
        new[name] = flat[off : off + n].view_as(t).to(t.dtype)
        off += n
    assert off == flat.numel(), (off, flat.numel())
    model.load_state_dict(new)


def selftest(fixture_dir: str | None = None) -> bool:
    """Checks log p, z and the inverse against the golden fixtures in float64."""
    here = os.path.dirname(os.path.abspath(__file__))
    fixture_dir = fixture_dir or os.path.join(here, "..", "..", "kernel", "tests", "fixtures")
    archs = {
        "a": dict(channels=1, height=4, width=6, squeeze=True,
                  masks=["ChannelEven", "ChannelOdd", "ChannelEven"],
                  kernels=[3, 1, 3], hidden=[4, 5], bits=8, logit_alpha=0.05),
        "b": dict(channels=2, height=4, width=4, squeeze=False,
                  masks=["CheckerEven", "CheckerOdd"],
                  kernels=[3, 3, 1], hidden=[3, 4], bits=5, logit_alpha=0.1),
    }
    ok = True
    for name, cfg in archs.items():
        fx = _read_fixture(os.path.join(fixture_dir, f"golden_{name}.txt"))
        model = RealNVP(cfg).double()
        _load_flat(model, torch.tensor([float(v) for v in fx["params"]], dtype=torch.float64))
        shape = (1, cfg["channels"], cfg["height"], cfg["width"])
        u = torch.tensor([float(v) for v in fx["u"]], dtype=torch.float64).view(shape)
        with torch.no_grad():
            lp = model.log_prob(u).item()
            z = model.latent(u).flatten()
            zin = torch.tensor([float(v) for v in fx["z_in"]], dtype=torch.float64)
            inv = model.inverse(zin.view(1, *model.flow_shape)).flatten()
        want_lp = float(fx["log_p_f32"][0])
        want_z = torch.tensor([float(v) for v in fx["z_f32"]], dtype=torch.float64)
        want_inv = torch.tensor([float(v) for v in fx["inverse_u_f32"]], dtype=torch.float64)
        e_lp = abs(lp - want_lp)
        e_z = (z - want_z).abs().max().item()
        e_inv = (inv - want_inv).abs().max().item()
        good = e_lp < 1e-6 * max(1.0, abs(want_lp)) and e_z < 1e-6 and e_inv < 1e-6
        ok &= good
        print(
            f"golden {name}: log p {lp:.10f} (fixture {want_lp:.10f}), "
            f"max|dz| {e_z:.2e}, max|du_inverse| {e_inv:.2e}: {'ok' if good else 'MISMATCH'}"
        )
    for name, want in (("mnist", 334_440), ("color", 3_004_344)):
        n = sum(p.numel() for p in RealNVP(PRESETS[name]).parameters())
        good = n == want
        ok &= good
        print(f"{name} preset: {n} parameters (expected {want}): {'ok' if good else 'MISMATCH'}")
    return ok


if __name__ == "__main__":
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--selftest", action="store_true",
                    help="check against kernel/tests/fixtures/golden_{a,b}.txt")
    args = ap.parse_args()
    if args.selftest:
        sys.exit(0 if selftest() else 1)
    m = RealNVP()
    print(m)
    print(sum(p.numel() for p in m.parameters()), "parameters")
