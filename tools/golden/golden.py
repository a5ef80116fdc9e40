#!/usr/bin/env python3
"""Golden values for clayflow's kernel, from an independent float64 numpy implementation.

Implements the flow as written in MATH.md (logit, 2x2 squeeze in PyTorch's pixel_unshuffle
convention, affine couplings with channel or checkerboard masks, standard-normal base) for
two tiny fixed models whose parameters are a closed-form formula, and writes
kernel/tests/fixtures/golden_{a,b}.txt for kernel/tests/golden.rs.

Run from anywhere:  python3 tools/golden/golden.py   (needs numpy only)
"""

import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "kernel", "tests", "fixtures"))

# ---------------------------------------------------------------------------------------
# The fixed models. Mask names as in the kernel's `Mask`; kernels/hidden as in `Arch`.
# ---------------------------------------------------------------------------------------
ARCHS = {
    "a": dict(channels=1, height=4, width=6, squeeze=True,
              masks=["ChannelEven", "ChannelOdd", "ChannelEven"],
              kernels=[3, 1, 3], hidden=[4, 5], bits=8, alpha=0.05),
    "b": dict(channels=2, height=4, width=4, squeeze=False,
              masks=["CheckerEven", "CheckerOdd"],
              kernels=[3, 3, 1], hidden=[3, 4], bits=5, alpha=0.1),
}

# Parameter formula, over the global index i of the flat parameter vector (blob order: per
# coupling scale, w0, b0, w1, b1, w2, b2). Evaluated in float64 and rounded to float32 (the
# values the Rust test passes to write_blob); the f16 variant rounds those to float16.
W_AMP, W_FREQ, W_PHASE = 0.3, 0.7, 0.1          # conv weights and biases
S_BASE, S_STEP, S_MOD = 0.8, 0.05, 5            # scales
# Inputs: pixel[i] = (P_MUL*i + P_ADD) % 2^bits (image layout), dequantized at v = 0.5;
# latent for the inverse: z[i] = sin(Z_FREQ*i) (flow layout).
P_MUL, P_ADD, V_MID, Z_FREQ = 37, 11, 0.5, 1.3


def flow_shape(a):
    if a["squeeze"]:
        return 4 * a["channels"], a["height"] // 2, a["width"] // 2
    return a["channels"], a["height"], a["width"]


def is_channel(mask):
    return mask.startswith("Channel")


def parity(mask):
    return 0 if mask.endswith("Even") else 1


def cnn_in_changed(a, mask):
    c = flow_shape(a)[0]
    if is_channel(mask):
        kept = (c + 1 - parity(mask)) // 2
        return kept, c - kept
    return c, c


def tensor_shapes(a, mask):
    """Shapes of the seven tensors of one coupling, in blob order."""
    cin, ch = cnn_in_changed(a, mask)
    (k0, k1, k2), (h0, h1) = a["kernels"], a["hidden"]
    return [(ch,), (h0, cin, k0, k0), (h0,), (h1, h0, k1, k1), (h1,),
            (2 * ch, h1, k2, k2), (2 * ch,)]


def make_params(a):
    """The flat float32 parameter vector (as float64 values) and its per-coupling split."""
    flat, layers, i = [], [], 0
    for mask in a["masks"]:
        tensors = []
        for t, shape in enumerate(tensor_shapes(a, mask)):
            n = int(np.prod(shape))
            idx = np.arange(i, i + n, dtype=np.float64)
            if t == 0:
                v = S_BASE + S_STEP * (np.arange(i, i + n) % S_MOD)
            else:
                v = W_AMP * np.sin(W_FREQ * idx + W_PHASE)
            v = v.astype(np.float32).astype(np.float64)
            flat.append(v)
            tensors.append(v.reshape(shape))
            i += n
        layers.append(tensors)
    return np.concatenate(flat), layers


def to_f16(layers):
    return [[t.astype(np.float16).astype(np.float64) for t in tensors] for tensors in layers]


# ---------------------------------------------------------------------------------------
# The math (MATH.md), float64 throughout.
# ---------------------------------------------------------------------------------------
def logit_fwd(u, alpha):
    s = alpha + (1.0 - 2.0 * alpha) * u
    y = np.log(s) - np.log1p(-s)
    log_det = np.sum(math.log(1.0 - 2.0 * alpha) - np.log(s) - np.log1p(-s))
    return y, log_det


def logit_inv(y, alpha):
    s = 1.0 / (1.0 + np.exp(-y))
    return (s - alpha) / (1.0 - 2.0 * alpha)


def squeeze(x):
    """(C, H, W) -> (4C, H/2, W/2); channel 4c + 2dy + dx holds x[c, 2i+dy, 2j+dx]."""
    c, h, w = x.shape
    return x.reshape(c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3).reshape(4 * c, h // 2, w // 2)


def unsqueeze(x):
    c4, h2, w2 = x.shape
    return x.reshape(c4 // 4, 2, 2, h2, w2).transpose(0, 3, 1, 4, 2).reshape(c4 // 4, 2 * h2, 2 * w2)


def conv(x, w, b):
    """Cross-correlation, stride 1, zero 'same' padding: out[o] = b[o] + sum w[o,i,ky,kx] x[i, y+ky-p, x+kx-p]."""
    cin, h, wd = x.shape
    cout, _, k, _ = w.shape
    p = k // 2
    xp = np.zeros((cin, h + 2 * p, wd + 2 * p))
    xp[:, p:p + h, p:p + wd] = x
    out = np.empty((cout, h, wd))
    for o in range(cout):
        acc = np.full((h, wd), b[o])
        for i in range(cin):
            for ky in range(k):
                for kx in range(k):
                    acc = acc + w[o, i, ky, kx] * xp[i, ky:ky + h, kx:kx + wd]
        out[o] = acc
    return out


def coupling_st(a, mask, tensors, x):
    """(s, t, changed-element mask) for the coupling, from the kept half of x."""
    scale, w0, b0, w1, b1, w2, b2 = tensors
    c, h, w = x.shape
    _, ch = cnn_in_changed(a, mask)
    if is_channel(mask):
        cnn_in = x[parity(mask)::2]
        change = np.zeros(x.shape, dtype=bool)
        change[1 - parity(mask)::2] = True
    else:
        rows, cols = np.indices((h, w))
        keep_pix = (rows + cols) % 2 == parity(mask)
        cnn_in = np.where(keep_pix, x, 0.0)
        change = np.broadcast_to(~keep_pix, x.shape)
    hid = np.maximum(conv(cnn_in, w0, b0), 0.0)
    hid = np.maximum(conv(hid, w1, b1), 0.0)
    out = conv(hid, w2, b2)
    s_raw, t = out[:ch], out[ch:]
    s = scale[:, None, None] * np.tanh(s_raw)
    # Scatter the `ch` (s, t) planes onto the channels they act on.
    s_full, t_full = np.zeros(x.shape), np.zeros(x.shape)
    if is_channel(mask):
        s_full[1 - parity(mask)::2], t_full[1 - parity(mask)::2] = s, t
    else:
        s_full[:], t_full[:] = s, t
    s_full = np.where(change, s_full, 0.0)
    t_full = np.where(change, t_full, 0.0)
    return s_full, t_full, change, s_raw


def forward(a, layers, u):
    """u (image layout) -> z (flow layout), total log-det, logit log-det, per-coupling log-dets."""
    y, ld_logit = logit_fwd(u, a["alpha"])
    x = squeeze(y) if a["squeeze"] else y
    lds, sraws = [], []
    for mask, tensors in zip(a["masks"], layers):
        s, t, change, s_raw = coupling_st(a, mask, tensors, x)
        x = np.where(change, x * np.exp(s) + t, x)
        lds.append(np.sum(s))
        sraws.append(s_raw)
    return x, ld_logit + sum(lds), ld_logit, lds, sraws


def inverse(a, layers, z):
    x = z.copy()
    for mask, tensors in reversed(list(zip(a["masks"], layers))):
        s, t, change, _ = coupling_st(a, mask, tensors, x)
        x = np.where(change, (x - t) * np.exp(-s), x)
    y = unsqueeze(x) if a["squeeze"] else x
    return logit_inv(y, a["alpha"])


def log_normal(z):
    return -0.5 * np.sum(z * z) - z.size / 2.0 * math.log(2.0 * math.pi)


def quantize(u, bits):
    levels = 2 ** bits
    return np.clip(np.floor(u * levels), 0, levels - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------
def fmt(values):
    return " ".join(f"{float(v):.17g}" for v in np.ravel(values))


def fmt_int(values):
    return " ".join(str(int(v)) for v in np.ravel(values))


def compute(name, a):
    a = dict(a)
    a["alpha"] = float(np.float32(a["alpha"]))  # the kernel's Arch stores alpha as f32
    c, h, w = a["channels"], a["height"], a["width"]
    d = c * h * w
    bits = a["bits"]
    idx = np.arange(d)
    pixels = (P_MUL * idx + P_ADD) % (2 ** bits)
    u = ((pixels + V_MID) / 2 ** bits).reshape(c, h, w)
    z_in = np.sin(Z_FREQ * idx).astype(np.float32).astype(np.float64).reshape(flow_shape(a))
    flat, layers32 = make_params(a)
    lines = [
        f"# clayflow kernel golden values, model {name.upper()}: generated by tools/golden/golden.py",
        "# (float64 numpy, independent of the kernel). Do not edit; regenerate.",
        f"# arch: channels={c} height={h} width={w} squeeze={a['squeeze']} "
        f"couplings={len(a['masks'])} masks={','.join(a['masks'])}",
        f"#       kernels={a['kernels']} hidden={a['hidden']} bits={bits} "
        f"logit_alpha={a['alpha']!r} (f32 value) params={flat.size}",
        f"# params (flat blob order, global index i; f64 formula rounded to f32):",
        f"#   scale: {S_BASE} + {S_STEP} * (i % {S_MOD});  conv weights and biases: "
        f"{W_AMP} * sin({W_FREQ} * i + {W_PHASE})",
        f"#   *_f16 keys: the same with every f32 parameter rounded to f16 (nearest even)",
        f"# input: pixel[i] = ({P_MUL} * i + {P_ADD}) % 2^bits (image layout C,H,W), "
        f"u = (pixel + {V_MID}) / 2^bits",
        f"# inverse input: z[i] = f32(sin({Z_FREQ} * i)) (flow layout)",
        "# keys: z = forward(u) (flow layout); log_det = total (logit + couplings);",
        "#   coupling_log_det = sum(s) of each coupling; log_p = log p(u) in nats;",
        "#   inverse_u = inverse(z_in) (image layout); inverse_pixels = clamp(floor(u*2^bits))",
        f"param_count {flat.size}",
        f"params {fmt(flat)}",
        f"pixels {fmt_int(pixels)}",
        f"u {fmt(u)}",
        f"z_in {fmt(z_in)}",
    ]
    summary = {}
    for tag, layers in (("f32", layers32), ("f16", to_f16(layers32))):
        z, ld, ld_logit, lds, sraws = forward(a, layers, u)
        log_p = log_normal(z) + ld
        bpd = -log_p / (d * math.log(2.0)) + bits
        u_inv = inverse(a, layers, z_in)
        pix_inv = quantize(u_inv, bits)
        # Self-checks of the reference: the round trip is exact to f64 rounding.
        back = inverse(a, layers, z)
        assert np.max(np.abs(back - u)) < 1e-12, "reference round trip failed"
        lines += [
            f"z_{tag} {fmt(z)}",
            f"log_det_{tag} {fmt([ld])}",
            f"log_det_logit_{tag} {fmt([ld_logit])}",
            f"coupling_log_det_{tag} {fmt(lds)}",
            f"log_p_{tag} {fmt([log_p])}",
            f"bits_per_dim_{tag} {fmt([bpd])}",
            f"inverse_u_{tag} {fmt(u_inv)}",
            f"inverse_pixels_{tag} {fmt_int(pix_inv)}",
        ]
        summary[tag] = dict(
            log_p=log_p, bpd=bpd, log_det=ld, lds=lds, zmax=np.max(np.abs(z)),
            smax=max(np.max(np.abs(sr)) for sr in sraws),
            sabs=[float(np.max(np.abs(scale_tanh))) for scale_tanh in
                  (t[0][:, None, None] * np.tanh(sr) for t, sr in zip(layers, sraws))],
            umin=np.min(u_inv), umax=np.max(u_inv),
            frac=np.min(np.abs(u_inv * 2 ** bits - np.round(u_inv * 2 ** bits))),
        )
    path = os.path.join(OUT_DIR, f"golden_{name}.txt")
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"model {name.upper()}: D={d} params={flat.size} -> {os.path.relpath(path)}")
    for tag, s in summary.items():
        print(f"  {tag}: log p = {s['log_p']:.10g}  bits/dim = {s['bpd']:.10g}  "
              f"log-det = {s['log_det']:.10g}  couplings = {[round(float(v), 4) for v in s['lds']]}")
        print(f"       max|z| = {s['zmax']:.4g}  max|s_raw| = {s['smax']:.4g}  "
              f"max|s| per coupling = {[round(v, 3) for v in s['sabs']]}  "
              f"inverse u in [{s['umin']:.4g}, {s['umax']:.4g}], "
              f"min dist of u*2^bits to an integer = {s['frac']:.3g}")


def main():
    for name, a in ARCHS.items():
        compute(name, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
