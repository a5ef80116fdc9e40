//! Compute backends. The model and the training loop call the [`Backend`] trait on opaque
//! [`Buffer`]s and never name an implementation: [`cpu::CpuBackend`], or
//! [`cuda::CudaBackend`] on a GPU (or on the host simulator in tests); [`select`] picks one
//! for `--device`.
//!
//! Tensors are flat f32 buffers in NCHW order. The ops are the flow's: batched convolution
//! (forward, backward-data, backward-weight), ReLU's backward, squeeze, the mask gather and
//! scatter around each coupling's CNN, the fused affine coupling forward / inverse /
//! backward, logit, reductions and a fused Adam step.

pub mod actnorm;
mod check;
pub mod cpu;
pub mod cuda;
pub mod glow_coupling;
pub mod select;

pub use cpu::conv::ConvShape;

use clayflow_kernel::Mask;
use std::fmt::Debug;

/// A failed backend operation.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A buffer has the wrong length for the operation.
    #[error("{op}: buffer `{what}` has length {got}, expected {expected}")]
    Size {
        /// The operation.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// A buffer belongs to another backend.
    #[error("{op}: buffer lives on another device")]
    WrongDevice {
        /// The operation.
        op: &'static str,
    },
    /// A device-level failure (driver, kernel launch, out of memory).
    #[error("device error: {0}")]
    Device(String),
}

/// Result of a backend operation.
pub type Result<T> = std::result::Result<T, BackendError>;

/// Storage of a [`Buffer`]. Each backend reads only its own variant.
#[derive(Debug)]
pub enum Storage {
    /// Host memory (the CPU backend, and the CUDA backend on the host simulator).
    Host(Vec<f32>),
    /// GPU memory (the CUDA backend on a real GPU).
    Cuda(cuda::gpu::CudaMem),
}

/// An f32 tensor owned by a backend. Not `Clone`: copies go through [`Backend::copy`], on the
/// buffer's own device.
#[derive(Debug)]
pub struct Buffer {
    /// The storage.
    pub storage: Storage,
}

impl Buffer {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.storage {
            Storage::Host(v) => v.len(),
            Storage::Cuda(m) => m.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Shape of a batch of images or flow states: `batch x channels x height x width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape4 {
    /// Images in the batch.
    pub batch: usize,
    /// Channels.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
}

impl Shape4 {
    /// Elements per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Elements in the batch.
    pub fn len(&self) -> usize {
        self.batch * self.image_len()
    }

    /// True when the batch holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pixels per channel plane.
    pub fn plane(&self) -> usize {
        self.height * self.width
    }
}

/// One Adam update's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Learning rate for this step (after warm-up and any reduction).
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// Factor applied to the gradient first (gradient-norm clipping).
    pub grad_scale: f32,
}

/// The operations a compute device provides to the model. Object safe: the model holds a
/// `&dyn Backend`.
pub trait Backend: Send + Sync + Debug {
    /// A short human-readable name ("cpu (2 threads)", "cuda:0 NVIDIA H200").
    fn name(&self) -> String;

    /// A zero-filled buffer of `len` elements.
    fn zeros(&self, len: usize) -> Result<Buffer>;
    /// A buffer holding a copy of `data`.
    fn upload(&self, data: &[f32]) -> Result<Buffer>;
    /// The buffer's contents on the host.
    fn download(&self, buf: &Buffer) -> Result<Vec<f32>>;
    /// `dst = src` (same length).
    fn copy(&self, src: &Buffer, dst: &mut Buffer) -> Result<()>;
    /// Every element of `buf` set to `value`.
    fn fill(&self, buf: &mut Buffer, value: f32) -> Result<()>;
    /// `y += a * x` elementwise.
    fn axpy(&self, a: f32, x: &Buffer, y: &mut Buffer) -> Result<()>;
    /// `sum(x^2)`, accumulated in f64.
    fn sum_squares(&self, x: &Buffer) -> Result<f64>;
    /// `sum(x^2)` over several buffers (the squared gradient norm): the per-buffer
    /// [`Backend::sum_squares`] added in order. A device may do it with one synchronisation.
    fn sum_squares_all(&self, xs: &[Buffer]) -> Result<f64> {
        let mut total = 0.0;
        for x in xs {
            total += self.sum_squares(x)?;
        }
        Ok(total)
    }

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

    /// In place `u -> logit(a + (1 - 2a) u)`; writes each image's log-det to `log_det`
    /// (length `batch`).
    fn logit_forward(
        &self,
        shape: Shape4,
        alpha: f32,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()>;
    /// In place inverse of [`Backend::logit_forward`].
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
    /// `s = scale * tanh(s_raw)`, `(s_raw, t) = st`; `log_det[i] += sum(s)` per image.
    fn coupling_forward(
        &self,
        shape: Shape4,
        mask: Mask,
        st: &Buffer,
        scale: &Buffer,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()>;
    /// The inverse, `y_b = (y_b - t) exp(-s)`, in place.
    fn coupling_inverse(
        &self,
        shape: Shape4,
        mask: Mask,
        st: &Buffer,
        scale: &Buffer,
        y: &mut Buffer,
    ) -> Result<()>;
    /// Backward of [`Backend::coupling_forward`] given the coupling's *input* `x`: turns
    /// `dy` (gradient w.r.t. the output) into the gradient w.r.t. the input through the
    /// affine path (`dx_b = dy_b exp(s)`, `dx_a = dy_a`), writes `d_st` (gradient w.r.t.
    /// `(s_raw, t)`) and *adds* to `d_scale`. `g_log_det` is the loss's gradient w.r.t.
    /// each image's log-det.
    #[allow(clippy::too_many_arguments)]
    fn coupling_backward(
        &self,
        shape: Shape4,
        mask: Mask,
        x: &Buffer,
        st: &Buffer,
        scale: &Buffer,
        g_log_det: f32,
        dy: &mut Buffer,
        d_st: &mut Buffer,
        d_scale: &mut Buffer,
    ) -> Result<()>;

    /// Glow's coupling forward (`s = log sigmoid(s_raw + 2)`, see [`glow_coupling`]); the
    /// default moves the buffers through the host.
    fn glow_coupling_forward(
        &self,
        shape: Shape4,
        mask: Mask,
        st: &Buffer,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()> {
        let op = "glow_coupling_forward";
        check_glow_coupling(op, shape, mask, x, st)?;
        expect_len(op, "log_det", log_det, shape.batch)?;
        let stv = self.download(st)?;
        let (mut xv, mut ld) = (self.download(x)?, self.download(log_det)?);
        glow_coupling::forward(shape, mask, &stv, &mut xv, &mut ld);
        *x = self.upload(&xv)?;
        *log_det = self.upload(&ld)?;
        Ok(())
    }
    /// Glow's coupling inverse; the default moves the buffers through the host.
    fn glow_coupling_inverse(
        &self,
        shape: Shape4,
        mask: Mask,
        st: &Buffer,
        y: &mut Buffer,
    ) -> Result<()> {
        check_glow_coupling("glow_coupling_inverse", shape, mask, y, st)?;
        let stv = self.download(st)?;
        let mut yv = self.download(y)?;
        glow_coupling::inverse(shape, mask, &stv, &mut yv);
        *y = self.upload(&yv)?;
        Ok(())
    }
    /// Glow's coupling backward (see [`glow_coupling::backward`]); the default moves the
    /// buffers through the host.
    #[allow(clippy::too_many_arguments)]
    fn glow_coupling_backward(
        &self,
        shape: Shape4,
        mask: Mask,
        x: &Buffer,
        st: &Buffer,
        g_log_det: f32,
        dy: &mut Buffer,
        d_st: &mut Buffer,
    ) -> Result<()> {
        let op = "glow_coupling_backward";
        check_glow_coupling(op, shape, mask, x, st)?;
        expect_len(op, "dy", dy, shape.len())?;
        expect_len(op, "d_st", d_st, st.len())?;
        let (xv, stv) = (self.download(x)?, self.download(st)?);
        let (mut g, mut ds) = (self.download(dy)?, self.download(d_st)?);
        glow_coupling::backward(shape, mask, &xv, &stv, g_log_det, &mut g, &mut ds);
        *dy = self.upload(&g)?;
        *d_st = self.upload(&ds)?;
        Ok(())
    }

    /// ActNorm in place (see [`actnorm`]): `x = x exp(logs[c]) + bias[c]`, and
    /// `log_det[i] += plane * sum(logs)`. The default moves the buffers through the host; a
    /// device backend may override it with a kernel.
    fn actnorm_forward(
        &self,
        shape: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()> {
        let op = "actnorm_forward";
        check_actnorm(op, shape, logs, bias, x)?;
        expect_len(op, "log_det", log_det, shape.batch)?;
        let (l, b) = (self.download(logs)?, self.download(bias)?);
        let (mut xv, mut ld) = (self.download(x)?, self.download(log_det)?);
        actnorm::forward(shape, &l, &b, &mut xv, &mut ld);
        *x = self.upload(&xv)?;
        *log_det = self.upload(&ld)?;
        Ok(())
    }
    /// The inverse of [`Backend::actnorm_forward`] in place: `y = (y - bias[c]) exp(-logs[c])`.
    fn actnorm_inverse(
        &self,
        shape: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        y: &mut Buffer,
    ) -> Result<()> {
        check_actnorm("actnorm_inverse", shape, logs, bias, y)?;
        let (l, b) = (self.download(logs)?, self.download(bias)?);
        let mut yv = self.download(y)?;
        actnorm::inverse(shape, &l, &b, &mut yv);
        *y = self.upload(&yv)?;
        Ok(())
    }
    /// Backward of [`Backend::actnorm_forward`] given its *input* `x`: `dy` becomes the
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
    ) -> Result<()> {
        let op = "actnorm_backward";
        check_actnorm(op, shape, logs, d_bias, x)?;
        expect_len(op, "dy", dy, shape.len())?;
        expect_len(op, "d_logs", d_logs, shape.channels)?;
        let (xv, l) = (self.download(x)?, self.download(logs)?);
        let (mut g, mut dl, mut db) = (
            self.download(dy)?,
            self.download(d_logs)?,
            self.download(d_bias)?,
        );
        actnorm::backward(shape, &xv, &l, g_log_det, &mut g, &mut dl, &mut db);
        *dy = self.upload(&g)?;
        *d_logs = self.upload(&dl)?;
        *d_bias = self.upload(&db)?;
        Ok(())
    }

    /// Per-image `sum(z^2)` (length `batch`), accumulated in f64.
    fn per_image_sum_squares(&self, shape: Shape4, z: &Buffer) -> Result<Vec<f64>>;
    /// One Adam step on `param` with gradient `grad` and moments `m`, `v`.
    fn adam(
        &self,
        hp: &AdamStep,
        param: &mut Buffer,
        grad: &Buffer,
        m: &mut Buffer,
        v: &mut Buffer,
    ) -> Result<()>;
}

/// Checks the buffers of an ActNorm op: per-channel `logs` and `bias`, a `shape` tensor `x`.
pub(crate) fn check_glow_coupling(
    op: &'static str,
    shape: Shape4,
    mask: Mask,
    x: &Buffer,
    st: &Buffer,
) -> Result<()> {
    expect_len(op, "x", x, shape.len())?;
    let (cc, _) = mask.split_channels(shape.channels);
    expect_len(op, "st", st, shape.batch * 2 * cc * shape.plane())
}

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
