#!/usr/bin/env python3
"""A PyTorch reference of clayflow's multi-scale Glow (`mnist-glow`), for golden fixtures.

Never a runtime dependency of clayflow and never used in CI. Sibling of `flow.py` (the
RealNVP reference, whose `Coupling` this module reuses for masks, CNN and split/merge). The
math is kernel/FORMAT.md sections 2-6 and kernel/src/{flow,coupling,squeeze}.rs,
trainer/src/{model,invconv}.rs, restated:

* logit and the first squeeze as in `flow.py` (`F.pixel_unshuffle(x, 2)`).
* levels l = 0 .. L-1, n / L steps each. Level l > 0 starts with a squeeze of the state
  (pixel_unshuffle again); level l < L-1 ends with a split: the odd channels 1, 3, ... leave
  as level l's latent, the even channels 0, 2, ... continue. The inverse merges (channel 2k
  <- continuing k, 2k+1 <- latent k).
* each step i, on its level's state (C channels, plane = h * w pixels):
  - ActNorm: y[c] = x[c] exp(logs[c]) + bias[c], log-det += plane * sum(logs);
  - 1x1 conv y[o, p] = sum_i W[o][i] x[i, p], log-det += plane * ln|det W|. In the
    checkpoint (trainer) layout W = P L (U + diag(sign exp(log_s))): L = I + strict lower
    of `lower`, U = strict upper of `upper`, row r of W is row perm[r] of L U', and
    ln|det W| = sum(log_s). From a blob: W as stored, ln|det W| from W in float64.
  - an affine coupling with a channel mask (`flow.Coupling`), but the scale is Glow's
    floored sigmoid: x = s_raw + 2, exp(s) = f + (1 - f) sigmoid(x) with floor f
    (`Arch::scale_floor`, 1/16 in the Glow presets, 0 in blobs written before
    2026-12-06), computed as a = (1 - f) sigmoid(-x), s = log1p(-a) (f = 0:
    s = log sigmoid(x)), y_b = x_b exp(s) + t, log-det += sum(s). The coupling's `scale`
    tensor exists in checkpoints but is never read.
* with `config["prior"]` (Glow's learned prior, `Arch::prior`; default False), at the end of
  each level l < L-1, after its steps and before the split, the split prior: an affine
  coupling keeping the even channels 0, 2, ... (h = C/2 of them) and changing the odd ones
  (changed j is channel 2j + 1), whose (s_raw, t) come from ONE 3x3 convolution of the
  kept channels (padding 1, bias, no activation; h -> C channels, [0:h] s_raw, [h:] t):
  s = scale[j] tanh(s_raw), y_odd = x_odd exp(s) + t, log-det += sum(s); and after the last
  level's steps the top prior, an ActNorm on its state (y = x exp(logs) + bias, log-det +=
  plane * sum(logs)). The inverse undoes the top prior first, and each split prior after
  its level's merge (trainer/src/model/prior.rs).
* z = [latent_0 | ... | latent_{L-2} | last level's state], each block flattened in its
  level's (c, h, w) order (trainer/src/model/mod.rs `latent_blocks`).
* log p(u) = -0.5 |z|^2 - D/2 ln(2 pi) + log-det; bits/dim = -log p / (D ln 2) + bits.

Parameter names are the checkpoint's (trainer/src/config.rs `tensor_specs`):
`step.{i}.actnorm.{logs,bias}`, `step.{i}.invconv.{perm,sign,lower,upper,log_s}`,
`coupling.{i}.scale`, `coupling.{i}.conv{j}.{weight,bias}`; with the prior, after every
step's, `prior.{l}.{scale,weight,bias}` for l < L-1 and `top.{logs,bias}`
(`prior_specs`). `perm` and `sign` (fixed) and the coupling's `scale` (unused) get zero
gradients; the prior's `scale` is trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from flow import Coupling

# kernel/src/arch.rs `MNIST_GLOW`: 1x28x28, squeeze, 2 levels x 16 steps, kernels 3,1,3,
# hidden 64,64, floor GLOW_SCALE_FLOOR = 1/16.
MNIST_GLOW_CONFIG = dict(
    channels=1,
    height=28,
    width=28,
    squeeze=True,
    levels=2,
    glow=True,
    masks=["channel-even", "channel-odd"] * 16,
    kernels=[3, 1, 3],
    hidden=[64, 64],
    bits=8,
    logit_alpha=0.05,
    scale_floor=0.0625,
)

GLOW_TENSORS = ["actnorm.logs", "actnorm.bias", "invconv.perm", "invconv.sign",
                "invconv.lower", "invconv.upper", "invconv.log_s"]
COUPLING_TENSORS = ["scale", "conv0.weight", "conv0.bias", "conv1.weight", "conv1.bias",
                    "conv2.weight", "conv2.bias"]
PRIOR_TENSORS = ["scale", "weight", "bias"]
TOP_TENSORS = ["logs", "bias"]


class GlowCoupling(Coupling):
    """`flow.Coupling` with Glow's floored sigmoid scale instead of `scale * tanh`."""

    def __init__(self, mask, channels, kernels, hidden, floor: float):
        super().__init__(mask, channels, kernels, hidden)
        self.floor = float(floor)

    def _cnn(self, cnn_in: torch.Tensor):
        h = F.relu(self.conv0(cnn_in))
        h = F.relu(self.conv1(h))
        st = self.conv2(h)
        x = st[:, : self.changed] + 2.0
        if self.floor > 0.0:
            s = torch.log1p(-(1.0 - self.floor) * torch.sigmoid(-x))
        else:
            s = F.logsigmoid(x)
        return s, st[:, self.changed :]


class ActNorm(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.logs = nn.Parameter(torch.zeros(c))
        self.bias = nn.Parameter(torch.zeros(c))


class SplitPrior(nn.Module):
    """The learned prior's coupling before a split (module docstring): the even channels
    stay, the odd ones change, (s_raw, t) from one 3x3 convolution of the even ones."""

    def __init__(self, c: int):
        super().__init__()
        self.h = c // 2
        self.scale = nn.Parameter(torch.ones(self.h))
        self.weight = nn.Parameter(torch.zeros(c, self.h, 3, 3))
        self.bias = nn.Parameter(torch.zeros(c))

    def _st(self, kept: torch.Tensor):
        st = F.conv2d(kept, self.weight, self.bias, padding=1)
        s = self.scale.view(1, -1, 1, 1) * torch.tanh(st[:, : self.h])
        return s, st[:, self.h :]

    def forward(self, x: torch.Tensor):
        kept, changed = x[:, 0::2], x[:, 1::2]
        s, t = self._st(kept)
        y = torch.stack([kept, changed * torch.exp(s) + t], dim=2).flatten(1, 2)
        return y, s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        kept, changed = y[:, 0::2], y[:, 1::2]
        s, t = self._st(kept)
        return torch.stack([kept, (changed - t) * torch.exp(-s)], dim=2).flatten(1, 2)


class InvConv(nn.Module):
    """The 1x1 convolution: LU factors (checkpoint) or, with `lu=False`, W itself (blob)."""

    def __init__(self, c: int, lu: bool = True):
        super().__init__()
        self.c, self.lu = c, lu
        if lu:
            self.perm = nn.Parameter(torch.arange(c, dtype=torch.float32), requires_grad=False)
            self.sign = nn.Parameter(torch.ones(c), requires_grad=False)
            self.lower = nn.Parameter(torch.zeros(c, c))
            self.upper = nn.Parameter(torch.zeros(c, c))
            self.log_s = nn.Parameter(torch.zeros(c))
        else:
            self.register_buffer("weight", torch.eye(c))

    def weight_and_logdet(self):
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        eye = torch.eye(self.c, dtype=self.lower.dtype)
        low = torch.tril(self.lower, -1) + eye
        up = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_s))
        m = low @ up
        w = m[self.perm.detach().round().long()]
        return w, self.log_s.sum()


class Glow(nn.Module):
    """clayflow's multi-scale Glow (see the module docstring)."""

    def __init__(self, config: dict | None = None, lu: bool = True):
        super().__init__()
        cfg = dict(MNIST_GLOW_CONFIG if config is None else config)
        self.config = cfg
        self.channels, self.height, self.width = cfg["channels"], cfg["height"], cfg["width"]
        assert cfg["squeeze"] and cfg["glow"]
        self.levels = int(cfg["levels"])
        self.bits = int(cfg["bits"])
        # The Rust side stores alpha as f32; use that exact value.
        self.alpha = float(torch.tensor(float(cfg["logit_alpha"]), dtype=torch.float32))
        self.floor = float(cfg["scale_floor"])
        self.dim = self.channels * self.height * self.width
        n = len(cfg["masks"])
        self.per_level = n // self.levels
        c, h, w = 4 * self.channels, self.height // 2, self.width // 2
        self.level_shapes = []
        for l in range(self.levels):
            if l > 0:
                c, h, w = 2 * c, h // 2, w // 2
            self.level_shapes.append((c, h, w))
        shapes = [self.level_shapes[i // self.per_level] for i in range(n)]
        self.step = nn.ModuleList(
            nn.ModuleDict(dict(actnorm=ActNorm(s[0]), invconv=InvConv(s[0], lu)))
            for s in shapes
        )
        self.coupling = nn.ModuleList(
            GlowCoupling(m, s[0], cfg["kernels"], cfg["hidden"], self.floor)
            for m, s in zip(cfg["masks"], shapes)
        )
        for cp in self.coupling:
            nn.init.ones_(cp.scale)
        # Glow's learned prior: registered only with the option, so a model without it has
        # exactly the parameters (and state_dict) it had before.
        self.has_prior = bool(cfg.get("prior", False))
        if self.has_prior:
            self.prior = nn.ModuleList(SplitPrior(s[0]) for s in self.level_shapes[:-1])
            self.top = ActNorm(self.level_shapes[-1][0])

    def spec_names(self) -> list[str]:
        """Checkpoint tensor names in trainer order (`tensor_specs`)."""
        out = []
        for i in range(len(self.coupling)):
            out += [f"step.{i}.{t}" for t in GLOW_TENSORS]
            out += [f"coupling.{i}.{t}" for t in COUPLING_TENSORS]
        if self.has_prior:  # `prior_specs`: after every step's tensors
            for l in range(self.levels - 1):
                out += [f"prior.{l}.{t}" for t in PRIOR_TENSORS]
            out += [f"top.{t}" for t in TOP_TENSORS]
        return out

    # ------------------------------------------------------------------ the flow
    def _logit(self, u):
        a = self.alpha
        s = a + (1.0 - 2.0 * a) * u
        ls, l1s = torch.log(s), torch.log(1.0 - s)
        return ls - l1s, (math.log(1.0 - 2.0 * a) - ls - l1s).flatten(1).sum(1)

    def _step(self, i, x):
        st = self.step[i]
        plane = x.shape[2] * x.shape[3]
        an = st["actnorm"]
        x = x * torch.exp(an.logs).view(1, -1, 1, 1) + an.bias.view(1, -1, 1, 1)
        ld = plane * an.logs.sum()
        w, wld = st["invconv"].weight_and_logdet()
        x = torch.einsum("oi,bihw->bohw", w, x)
        ld = ld + plane * wld
        x, cld = self.coupling[i](x)
        return x, ld + cld

    def latent_and_logdet(self, u: torch.Tensor):
        """u (B, C, H, W) -> (z (B, D) in the kernel's layout, log-det (B,))."""
        x, log_det = self._logit(u)
        x = F.pixel_unshuffle(x, 2)
        latents = []
        for l in range(self.levels):
            if l > 0:
                x = F.pixel_unshuffle(x, 2)
            for i in range(l * self.per_level, (l + 1) * self.per_level):
                x, ld = self._step(i, x)
                log_det = log_det + ld
            if self.has_prior and l + 1 < self.levels:
                x, ld = self.prior[l](x)
                log_det = log_det + ld
            if self.has_prior and l + 1 == self.levels:
                top = self.top
                x = x * torch.exp(top.logs).view(1, -1, 1, 1) + top.bias.view(1, -1, 1, 1)
                log_det = log_det + x.shape[2] * x.shape[3] * top.logs.sum()
            if l + 1 < self.levels:
                latents.append(x[:, 1::2].flatten(1))
                x = x[:, 0::2]
        return torch.cat(latents + [x.flatten(1)], dim=1), log_det

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        z, log_det = self.latent_and_logdet(u)
        return -0.5 * z.pow(2).sum(1) - 0.5 * self.dim * math.log(2.0 * math.pi) + log_det

    def latent(self, u: torch.Tensor) -> torch.Tensor:
        return self.latent_and_logdet(u)[0]

    def bits_per_dim(self, log_prob: torch.Tensor) -> torch.Tensor:
        return -log_prob / (self.dim * math.log(2.0)) + self.bits

    def loss(self, u: torch.Tensor) -> torch.Tensor:
        return self.bits_per_dim(self.log_prob(u)).mean()

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z (B, D), kernel layout -> dequantized images u (B, C, H, W)."""
        b = z.shape[0]
        blocks, at = [], 0
        for l, (c, h, w) in enumerate(self.level_shapes):
            n = (c // 2 if l + 1 < self.levels else c) * h * w
            blocks.append(z[:, at : at + n])
            at += n
        assert at == z.shape[1]
        x = None
        for l in reversed(range(self.levels)):
            c, h, w = self.level_shapes[l]
            if l + 1 == self.levels:
                x = blocks[l].reshape(b, c, h, w)
                if self.has_prior:
                    top = self.top
                    x = (x - top.bias.view(1, -1, 1, 1)) * torch.exp(-top.logs).view(1, -1, 1, 1)
            else:
                lat = blocks[l].reshape(b, c // 2, h, w)
                x = torch.stack([x, lat], dim=2).flatten(1, 2)  # 2k <- kept, 2k+1 <- latent
                if self.has_prior:
                    x = self.prior[l].inverse(x)
            for i in reversed(range(l * self.per_level, (l + 1) * self.per_level)):
                x = self.coupling[i].inverse(x)
                st = self.step[i]
                w_, _ = st["invconv"].weight_and_logdet()
                x = torch.einsum("oi,bihw->bohw", torch.linalg.inv(w_), x)
                an = st["actnorm"]
                x = (x - an.bias.view(1, -1, 1, 1)) * torch.exp(-an.logs).view(1, -1, 1, 1)
            x = F.pixel_shuffle(x, 2)
        a = self.alpha
        return (torch.sigmoid(x) - a) / (1.0 - 2.0 * a)


if __name__ == "__main__":
    m = Glow()
    n = sum(p.numel() for p in m.parameters())
    print(m.spec_names()[:14])
    print(n, "checkpoint values")
