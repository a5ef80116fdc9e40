//! The buffer-length checks of each [`Backend`](super::Backend) op, shared by every
//! implementation so the CPU and CUDA backends reject exactly the same calls with the same
//! errors before touching any memory.
//!
//! One function per op (or per group of ops with the same operands); each names the op and
//! the operand in its [`BackendError::Size`](super::BackendError::Size).

use clayflow_kernel::Mask;

use super::{BackendError, Buffer, ConvShape, CouplingScale, LuFactors, Result, Shape4};

/// `y = conv(x, w) + b`: every operand against the conv shape.
pub(crate) fn conv_forward(
    s: &ConvShape,
    x: &Buffer,
    w: &Buffer,
    b: &Buffer,
    y: &Buffer,
) -> Result<()> {
    let op = "conv_forward";
    expect_len(op, "x", x, s.input_len())?;
    expect_len(op, "w", w, s.weight_len())?;
    expect_len(op, "b", b, s.cout)?;
    expect_len(op, "y", y, s.output_len())
}

/// `dx = conv_transpose(dy, w)`.
pub(crate) fn conv_backward_data(
    s: &ConvShape,
    dy: &Buffer,
    w: &Buffer,
    dx: &Buffer,
) -> Result<()> {
    let op = "conv_backward_data";
    expect_len(op, "dy", dy, s.output_len())?;
    expect_len(op, "w", w, s.weight_len())?;
    expect_len(op, "dx", dx, s.input_len())
}

/// `dw, db` from `x` and `dy`.
pub(crate) fn conv_backward_weight(
    s: &ConvShape,
    x: &Buffer,
    dy: &Buffer,
    dw: &Buffer,
    db: &Buffer,
) -> Result<()> {
    let op = "conv_backward_weight";
    expect_len(op, "x", x, s.input_len())?;
    expect_len(op, "dy", dy, s.output_len())?;
    expect_len(op, "dw", dw, s.weight_len())?;
    expect_len(op, "db", db, s.cout)
}

/// The logit's state and per-image log-dets.
pub(crate) fn logit_forward(shape: Shape4, x: &Buffer, log_det: &Buffer) -> Result<()> {
    let op = "logit_forward";
    expect_len(op, "x", x, shape.len())?;
    expect_len(op, "log_det", log_det, shape.batch)
}

/// Squeeze in either direction: both sides hold the same number of values.
pub(crate) fn squeeze(shape: Shape4, x: &Buffer, y: &Buffer) -> Result<()> {
    let op = "squeeze";
    expect_len(op, "x", x, shape.len())?;
    expect_len(op, "y", y, shape.len())
}

/// Values per batch in a coupling's CNN input (the kept half) for `mask`.
pub(crate) fn cnn_in_len(shape: Shape4, mask: Mask) -> usize {
    shape.batch * mask.split_channels(shape.channels).1 * shape.plane()
}

/// Values per batch in a coupling's `(s_raw, t)` for `mask`.
pub(crate) fn st_len(shape: Shape4, mask: Mask) -> usize {
    shape.batch * 2 * mask.split_channels(shape.channels).0 * shape.plane()
}

/// The kept half gathered into the CNN input.
pub(crate) fn mask_gather(shape: Shape4, mask: Mask, x: &Buffer, cnn_in: &Buffer) -> Result<()> {
    let op = "mask_gather";
    expect_len(op, "x", x, shape.len())?;
    expect_len(op, "cnn_in", cnn_in, cnn_in_len(shape, mask))
}

/// The CNN input's gradient scattered back.
pub(crate) fn mask_scatter_add(
    shape: Shape4,
    mask: Mask,
    d_cnn_in: &Buffer,
    dx: &Buffer,
) -> Result<()> {
    let op = "mask_scatter_add";
    expect_len(op, "d_cnn_in", d_cnn_in, cnn_in_len(shape, mask))?;
    expect_len(op, "dx", dx, shape.len())
}

/// The affine coupling's operands, forward (`log_det` given) or inverse (`None`). `op` names
/// the op and `state` the transformed tensor in the error.
pub(crate) fn coupling(
    op: &'static str,
    shape: Shape4,
    mask: Mask,
    (state, x): (&'static str, &Buffer),
    st: &Buffer,
    scale: CouplingScale<'_>,
    log_det: Option<&Buffer>,
) -> Result<()> {
    expect_len(op, state, x, shape.len())?;
    expect_len(op, "st", st, st_len(shape, mask))?;
    if let CouplingScale::Tanh(scale) = scale {
        expect_len(op, "scale", scale, mask.split_channels(shape.channels).0)?;
    }
    match log_det {
        Some(ld) => expect_len(op, "log_det", ld, shape.batch),
        None => Ok(()),
    }
}

/// The coupling's backward: the forward's operands plus their gradients (`d_scale` only for
/// the tanh scale, which has one).
#[allow(clippy::too_many_arguments)]
pub(crate) fn coupling_backward(
    shape: Shape4,
    mask: Mask,
    scale: CouplingScale<'_>,
    x: &Buffer,
    st: &Buffer,
    dy: &Buffer,
    d_st: &Buffer,
    d_scale: &Buffer,
) -> Result<()> {
    let op = "coupling_backward";
    coupling(op, shape, mask, ("x", x), st, scale, None)?;
    expect_len(op, "dy", dy, shape.len())?;
    expect_len(op, "d_st", d_st, st_len(shape, mask))?;
    match scale {
        CouplingScale::Tanh(s) => expect_len(op, "d_scale", d_scale, s.len()),
        CouplingScale::Sigmoid { .. } => Ok(()),
    }
}

/// Adam's gradient and moments against the parameter.
pub(crate) fn adam(param: &Buffer, grad: &Buffer, m: &Buffer, v: &Buffer) -> Result<()> {
    let (op, n) = ("adam", param.len());
    expect_len(op, "grad", grad, n)?;
    expect_len(op, "m", m, n)?;
    expect_len(op, "v", v, n)
}

/// Checks that the slices of [`Optimiser::adam_all`](super::Optimiser::adam_all) have one
/// length.
pub(crate) fn check_adam_all(
    params: &[Buffer],
    grads: &[Buffer],
    m: &[Buffer],
    v: &[Buffer],
    trainable: &[bool],
) -> Result<()> {
    same_count(
        "adam_all",
        params.len(),
        &[
            ("grads", grads.len()),
            ("m", m.len()),
            ("v", v.len()),
            ("trainable", trainable.len()),
        ],
    )
}

/// Checks that each slice of a multi-tensor op named in `lens` has `n` entries.
fn same_count(op: &'static str, n: usize, lens: &[(&'static str, usize)]) -> Result<()> {
    for &(what, len) in lens {
        if len != n {
            return Err(BackendError::Size {
                op,
                what,
                expected: n,
                got: len,
            });
        }
    }
    Ok(())
}

/// Checks that the slices of [`Optimiser::ema_all`](super::Optimiser::ema_all) have one
/// length, and each average its tensor's.
pub(crate) fn check_ema_all(params: &[Buffer], avg: &[Buffer], trainable: &[bool]) -> Result<()> {
    same_count(
        "ema_all",
        params.len(),
        &[("avg", avg.len()), ("trainable", trainable.len())],
    )?;
    for (p, a) in params.iter().zip(avg) {
        expect_len("ema_all", "avg", a, p.len())?;
    }
    Ok(())
}

/// Checks the buffers of an ActNorm op: per-channel `logs` and `bias`, a `shape` tensor `x`.
pub(crate) fn check_actnorm(
    op: &'static str,
    shape: Shape4,
    logs: &Buffer,
    bias: &Buffer,
    x: &Buffer,
) -> Result<()> {
    expect_len(op, "logs", logs, shape.channels)?;
    expect_len(op, "bias", bias, shape.channels)?;
    expect_len(op, "x", x, shape.len())
}

/// Checks the five LU factors of a `c`-channel 1x1 convolution.
pub(crate) fn check_lu(op: &'static str, c: usize, lu: &LuFactors<'_>) -> Result<()> {
    expect_len(op, "perm", lu.perm, c)?;
    expect_len(op, "sign", lu.sign, c)?;
    expect_len(op, "lower", lu.lower, c * c)?;
    expect_len(op, "upper", lu.upper, c * c)?;
    expect_len(op, "log_s", lu.log_s, c)
}

/// ActNorm forward: the operands of [`check_actnorm`] and one log-det per image.
pub(crate) fn actnorm_forward(
    shape: Shape4,
    logs: &Buffer,
    bias: &Buffer,
    x: &Buffer,
    log_det: &Buffer,
) -> Result<()> {
    let op = "actnorm_forward";
    check_actnorm(op, shape, logs, bias, x)?;
    expect_len(op, "log_det", log_det, shape.batch)
}

/// ActNorm backward: the forward's operands, `dy` like `x`, one `d_logs` per channel.
pub(crate) fn actnorm_backward(
    shape: Shape4,
    logs: &Buffer,
    x: &Buffer,
    dy: &Buffer,
    d_logs: &Buffer,
    d_bias: &Buffer,
) -> Result<()> {
    let op = "actnorm_backward";
    check_actnorm(op, shape, logs, d_bias, x)?;
    expect_len(op, "dy", dy, shape.len())?;
    expect_len(op, "d_logs", d_logs, shape.channels)
}

/// The LU factors of a `c x c` 1x1 convolution and the `c x c` matrix `out` made of them
/// (`W` for `invconv_weight`, `W^-1` for `invconv_inverse`).
pub(crate) fn invconv(
    op: &'static str,
    c: usize,
    lu: &LuFactors<'_>,
    name: &'static str,
    out: &Buffer,
) -> Result<()> {
    check_lu(op, c, lu)?;
    expect_len(op, name, out, c * c)
}

/// The 1x1 convolution's backward: `dW` and the factors' gradients.
pub(crate) fn invconv_backward(
    c: usize,
    lu: &LuFactors<'_>,
    d_w: &Buffer,
    d_lower: &Buffer,
    d_upper: &Buffer,
    d_log_s: &Buffer,
) -> Result<()> {
    let op = "invconv_backward";
    check_lu(op, c, lu)?;
    expect_len(op, "d_w", d_w, c * c)?;
    expect_len(op, "d_lower", d_lower, c * c)?;
    expect_len(op, "d_upper", d_upper, c * c)?;
    expect_len(op, "d_log_s", d_log_s, c)
}

/// `acc[i] += |z_i|^2` as `(hi, lo)` pairs: `z` of `shape`, two floats per image.
pub(crate) fn per_image_sum_squares(shape: Shape4, z: &Buffer, acc: &Buffer) -> Result<()> {
    let op = "per_image_sum_squares";
    expect_len(op, "z", z, shape.len())?;
    expect_len(op, "acc", acc, 2 * shape.batch)
}

/// Checks a buffer's length for an op.
pub(crate) fn expect_len(
    op: &'static str,
    what: &'static str,
    buf: &Buffer,
    expected: usize,
) -> Result<()> {
    if buf.len() == expected {
        Ok(())
    } else {
        Err(BackendError::Size {
            op,
            what,
            expected,
            got: buf.len(),
        })
    }
}
