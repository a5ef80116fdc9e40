//! Compute backends. The model and the training loop call the [`Backend`] trait on opaque
//! [`Buffer`]s and never name an implementation: [`cpu::CpuBackend`], or
//! [`cuda::CudaBackend`] on a GPU (or on the host simulator in tests); [`select`] picks one
//! for `--device`.
//!
//! Tensors are flat f32 buffers in NCHW order. The ops are the flow's: batched convolution
//! (forward, backward-data, backward-weight), ReLU's backward, squeeze, the mask gather and
//! scatter around each coupling's CNN, the fused affine coupling forward / inverse /
//! backward (one op for both scale functions, [`CouplingScale`]), Glow's ActNorm and
//! LU-parametrised 1x1 convolution, logit, reductions and a fused Adam step.

pub mod actnorm;
mod check;
pub mod cpu;
pub mod cuda;
pub mod select;
mod types;

pub use types::{
    hi_lo, to_hi_lo, AdamStep, BackendError, Buffer, ConvShape, CouplingScale, LuFactors, Result,
    Shape4, Storage,
};

/// The backend traits in one import (`use clayflow_trainer::backend::prelude::*;`): an op
/// called on a concrete backend (`CpuBackend`, `CudaBackend<D>`) needs its op-group trait in
/// scope (calls through `dyn Backend` or a `B: Backend` bound do not).
pub mod prelude {
    pub use super::{Backend, Convolution, FlowLayers, Memory, Optimiser};
}

use clayflow_kernel::Mask;
use std::fmt::Debug;

/// Buffers on a device: allocation, transfers between the host and the device, and
/// whole-buffer arithmetic (copy, fill, `axpy`, sums of squares).
pub trait Memory {
    /// A zero-filled buffer of `len` elements.
    fn zeros(&self, len: usize) -> Result<Buffer>;
    /// A new buffer holding a copy of `data` (allocates: for set-up, not inside a step).
    fn upload(&self, data: &[f32]) -> Result<Buffer>;
    /// Copies `data` into `dst` (same length) without allocating: the per-step upload.
    fn upload_into(&self, data: &[f32], dst: &mut Buffer) -> Result<()>;
    /// The buffer's contents on the host.
    fn download(&self, buf: &Buffer) -> Result<Vec<f32>>;
    /// Several buffers' contents on the host in one transfer (a device gathers them first).
    fn download_all(&self, bufs: &[&Buffer]) -> Result<Vec<Vec<f32>>>;
    /// `dst = src` (same length).
    fn copy(&self, src: &Buffer, dst: &mut Buffer) -> Result<()>;
    /// Every element of `buf` set to `value`.
    fn fill(&self, buf: &mut Buffer, value: f32) -> Result<()>;
    /// `y += a * x` elementwise.
    fn axpy(&self, a: f32, x: &Buffer, y: &mut Buffer) -> Result<()>;
    /// `sum(x^2)`, accumulated in f64.
    fn sum_squares(&self, x: &Buffer) -> Result<f64>;
    /// `sum(x^2)` over several buffers (the squared gradient norm): the per-buffer
    /// [`Memory::sum_squares`] added in order, with one transfer.
    fn sum_squares_all(&self, xs: &[Buffer]) -> Result<f64>;
}

/// The couplings' CNN: batched stride-1 "same" convolution (see [`ConvShape`]) forward,
/// backward-data and backward-weight, and ReLU's backward.
pub trait Convolution {
    /// `y = conv(x, w) + b`, then ReLU if `relu` (see [`ConvShape`]).
    fn conv_forward(
        &self,
        s: &ConvShape,
        x: &Buffer,
        w: &Buffer,
        b: &Buffer,
        relu: bool,
        y: &mut Buffer,
    ) -> Result<()>;
    /// `dx = conv_transpose(dy, w)`.
    fn conv_backward_data(
        &self,
        s: &ConvShape,
        dy: &Buffer,
        w: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()>;
    /// [`Self::conv_forward`] in a coupling network or the learned prior. A backend may
    /// run these at lower precision when it was set up to (the CPU's
    /// [`cpu::CpuBackend::with_bf16_networks`]): forward and inverse run the same network
    /// on the same input, so exact invertibility does not depend on it. The LU 1x1
    /// convolutions, which carry the log-det, call [`Self::conv_forward`].
    fn net_conv_forward(
        &self,
        s: &ConvShape,
        x: &Buffer,
        w: &Buffer,
        b: &Buffer,
        relu: bool,
        y: &mut Buffer,
    ) -> Result<()> {
        self.conv_forward(s, x, w, b, relu, y)
    }
    /// [`Self::conv_backward_data`] in a coupling network or the learned prior (see
    /// [`Self::net_conv_forward`]).
    fn net_conv_backward_data(
        &self,
        s: &ConvShape,
        dy: &Buffer,
        w: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        self.conv_backward_data(s, dy, w, dx)
    }
    /// [`Self::conv_backward_weight`] in a coupling network or the learned prior (see
    /// [`Self::net_conv_forward`]).
    fn net_conv_backward_weight(
        &self,
        s: &ConvShape,
        x: &Buffer,
        dy: &Buffer,
        dw: &mut Buffer,
        db: &mut Buffer,
    ) -> Result<()> {
        self.conv_backward_weight(s, x, dy, dw, db)
    }
    /// `dw = sum_batch dy * x`, `db = sum dy` (overwritten).
    fn conv_backward_weight(
        &self,
        s: &ConvShape,
        x: &Buffer,
        dy: &Buffer,
        dw: &mut Buffer,
        db: &mut Buffer,
    ) -> Result<()>;
    /// `dy *= (y > 0)` where `y` is a ReLU's output.
    fn relu_backward(&self, y: &Buffer, dy: &mut Buffer) -> Result<()>;
}

/// The flow's own layers: logit, squeeze, the mask gather and scatter around each
/// coupling's CNN, the affine coupling, ActNorm, the LU-parametrised 1x1 convolution, and
/// the per-image log-det and prior sums.
pub trait FlowLayers {
    /// In place `u -> logit(a + (1 - 2a) u)`; writes each image's log-det to `log_det`
    /// (length `batch`).
    fn logit_forward(
        &self,
        shape: Shape4,
        alpha: f32,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()>;
    /// In place inverse of [`FlowLayers::logit_forward`].
    fn logit_inverse(&self, alpha: f32, x: &mut Buffer) -> Result<()>;
    /// Squeeze `x` (shape `shape`) into `y` (`4C x H/2 x W/2`), or the inverse when `inverse`
    /// (then `shape` is still the *unsqueezed* shape).
    fn squeeze(&self, shape: Shape4, inverse: bool, x: &Buffer, y: &mut Buffer) -> Result<()>;

    /// The CNN input of a coupling: the kept channels (channel mask) or `x` with changed
    /// pixels zeroed (checkerboard). `shape` is the flow state's shape.
    fn mask_gather(&self, shape: Shape4, mask: Mask, x: &Buffer, cnn_in: &mut Buffer)
        -> Result<()>;
    /// `dx[kept] += d_cnn_in`: the CNN input's gradient sent back to the kept half.
    fn mask_scatter_add(
        &self,
        shape: Shape4,
        mask: Mask,
        d_cnn_in: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()>;
    /// The affine coupling in place on the changed half: `x_b = x_b exp(s) + t` with
    /// `s = f(s_raw)` (see [`CouplingScale`]), `(s_raw, t) = st`; `log_det[i] += sum(s)` per
    /// image.
    fn coupling_forward(
        &self,
        shape: Shape4,
        mask: Mask,
        scale: CouplingScale<'_>,
        st: &Buffer,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()>;
    /// The inverse, `y_b = (y_b - t) exp(-s)`, in place.
    fn coupling_inverse(
        &self,
        shape: Shape4,
        mask: Mask,
        scale: CouplingScale<'_>,
        st: &Buffer,
        y: &mut Buffer,
    ) -> Result<()>;
    /// Backward of [`FlowLayers::coupling_forward`] given the coupling's *input* `x`: turns
    /// `dy` (gradient w.r.t. the output) into the gradient w.r.t. the input through the
    /// affine path (`dx_b = dy_b exp(s)`, `dx_a = dy_a`), writes `d_st` (gradient w.r.t.
    /// `(s_raw, t)`) and, for [`CouplingScale::Tanh`], *adds* to `d_scale` (one value per
    /// changed channel; untouched for `Sigmoid`). `g_log_det` is the loss's gradient w.r.t.
    /// each image's log-det.
    #[allow(clippy::too_many_arguments)]
    fn coupling_backward(
        &self,
        shape: Shape4,
        mask: Mask,
        scale: CouplingScale<'_>,
        x: &Buffer,
        st: &Buffer,
        g_log_det: f32,
        dy: &mut Buffer,
        d_st: &mut Buffer,
        d_scale: &mut Buffer,
    ) -> Result<()>;

    /// ActNorm in place (see [`actnorm`]): `x = x exp(logs[c]) + bias[c]`, and
    /// `log_det[i] += plane * sum(logs)`.
    fn actnorm_forward(
        &self,
        shape: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()>;
    /// The inverse of [`FlowLayers::actnorm_forward`] in place: `y = (y - bias[c]) exp(-logs[c])`.
    fn actnorm_inverse(
        &self,
        shape: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        y: &mut Buffer,
    ) -> Result<()>;
    /// Backward of [`FlowLayers::actnorm_forward`] given its *input* `x`: `dy` becomes the
    /// input's gradient; *adds* to `d_logs` and `d_bias`. `g_log_det` is the loss's gradient
    /// w.r.t. each image's log-det.
    #[allow(clippy::too_many_arguments)]
    fn actnorm_backward(
        &self,
        shape: Shape4,
        x: &Buffer,
        logs: &Buffer,
        g_log_det: f32,
        dy: &mut Buffer,
        d_logs: &mut Buffer,
        d_bias: &mut Buffer,
    ) -> Result<()>;
    /// ActNorm's data-dependent initialisation from the batch `x`: per channel, over the batch
    /// and the pixels, the mean and standard deviation (f64), then
    /// `logs = -ln(std + 1e-6)`, `bias = -mean / (std + 1e-6)` (overwritten), so this batch
    /// leaves the layer with zero mean and unit variance per channel.
    fn actnorm_init(
        &self,
        shape: Shape4,
        x: &Buffer,
        logs: &mut Buffer,
        bias: &mut Buffer,
    ) -> Result<()>;

    /// `W` (`c x c`, row-major `out x in`) of an LU-parametrised 1x1 convolution, computed in
    /// f64 from the factors and rounded to f32 (see [`crate::invconv::weight`]).
    fn invconv_weight(&self, c: usize, lu: LuFactors<'_>, w: &mut Buffer) -> Result<()>;
    /// `W^-1` from the same factors, in f64, rounded to f32.
    fn invconv_inverse(&self, c: usize, lu: LuFactors<'_>, w_inv: &mut Buffer) -> Result<()>;
    /// The chain rule from `dL/dW` (`d_w`, `c x c`) back to the learned factors (see
    /// [`crate::invconv::backward`]), in f64, *overwriting* `d_lower`, `d_upper` (zero outside
    /// their strict triangles) and `d_log_s`; the log-det term `count * sum(log_s)` enters
    /// with gradient `g_log_det` per unit of `count` (`count` = images x pixels).
    #[allow(clippy::too_many_arguments)]
    fn invconv_backward(
        &self,
        c: usize,
        lu: LuFactors<'_>,
        d_w: &Buffer,
        g_log_det: f32,
        count: usize,
        d_lower: &mut Buffer,
        d_upper: &mut Buffer,
        d_log_s: &mut Buffer,
    ) -> Result<()>;
    /// `log_det[i] += (plane * sum(v))` for every image `i` (the sum in f64, in order): the
    /// log-det of a 1x1 convolution, `plane * log|det W| = plane * sum(log_s)`.
    fn add_log_det(&self, plane: usize, v: &Buffer, log_det: &mut Buffer) -> Result<()>;

    /// Adds each image's `sum(z^2)` (f64) to `acc` (length `2 * batch`), which holds image
    /// `i`'s running f64 total as the float pair `(hi, lo)` at `2i, 2i + 1`
    /// (value `hi as f64 + lo as f64`; see [`hi_lo`]).
    fn per_image_sum_squares(&self, shape: Shape4, z: &Buffer, acc: &mut Buffer) -> Result<()>;
}

/// The fused Adam update.
pub trait Optimiser {
    /// One Adam step on `param` with gradient `grad` and moments `m`, `v`.
    fn adam(
        &self,
        hp: &AdamStep,
        param: &mut Buffer,
        grad: &Buffer,
        m: &mut Buffer,
        v: &mut Buffer,
    ) -> Result<()>;
    /// [`Optimiser::adam`] on every tensor `i` with `trainable[i]` (all slices of one length);
    /// a device does them all in one launch.
    fn adam_all(
        &self,
        hp: &AdamStep,
        params: &mut [Buffer],
        grads: &[Buffer],
        m: &mut [Buffer],
        v: &mut [Buffer],
        trainable: &[bool],
    ) -> Result<()>;
    /// The weight average's update on every tensor `i` with `trainable[i]` (all slices of one
    /// length): `avg[i] += weight * (params[i] - avg[i])`; a device does them all in one
    /// launch.
    fn ema_all(
        &self,
        weight: f32,
        params: &[Buffer],
        avg: &mut [Buffer],
        trainable: &[bool],
    ) -> Result<()>;
}

/// The operations a compute device provides to the model, in four op groups ([`Memory`],
/// [`Convolution`], [`FlowLayers`], [`Optimiser`]; `use backend::prelude::*` brings them
/// into scope), and its name. Object safe: the model holds a `&dyn Backend`. Every op is
/// required: a backend that lacks one does not compile (nothing falls back to moving a
/// device's buffers through the host).
pub trait Backend: Memory + Convolution + FlowLayers + Optimiser + Send + Sync + Debug {
    /// A short human-readable name ("cpu (2 threads)", "cuda:0 NVIDIA H200").
    fn name(&self) -> String;
}
