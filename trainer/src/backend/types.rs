//! The backend-agnostic types every [`Backend`](super::Backend) shares: buffers and
//! their storage, errors, the shapes of the ops ([`Shape4`], [`ConvShape`]) and their
//! parameters ([`AdamStep`], [`CouplingScale`], [`LuFactors`]), and the `(hi, lo)` float
//! pairs of the per-image accumulators. Re-exported from [`crate::backend`].

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
    Cuda(super::cuda::gpu::CudaMem),
}

/// An f32 tensor owned by a backend. Not `Clone`: copies go through
/// [`Memory::copy`](super::Memory::copy), on the buffer's own device.
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

/// Shape of one convolution problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Number of images (N).
    pub batch: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Image height (same for input and output).
    pub height: usize,
    /// Image width (same for input and output).
    pub width: usize,
    /// Square kernel size; must be odd.
    pub kernel: usize,
}

impl ConvShape {
    /// Number of `f32`s in the input `x` (and in `dx`): `batch * cin * height * width`.
    pub fn input_len(&self) -> usize {
        self.batch * self.cin * self.hw()
    }

    /// Number of `f32`s in the output `y` (and in `dy`): `batch * cout * height * width`.
    pub fn output_len(&self) -> usize {
        self.batch * self.cout * self.hw()
    }

    /// Number of `f32`s in the weights `w` (and in `dw`): `cout * cin * kernel * kernel`.
    pub fn weight_len(&self) -> usize {
        self.cout * self.cin * self.kernel * self.kernel
    }

    /// Floating-point operations of the forward pass: `2 * batch * cout * cin * k * k * h * w`
    /// (two per multiply-accumulate, counting the padded taps; bias and ReLU are not counted).
    /// Backward-data and backward-weight cost the same.
    pub fn flops(&self) -> u64 {
        2 * self.batch as u64
            * self.cout as u64
            * self.cin as u64
            * (self.kernel * self.kernel) as u64
            * self.hw() as u64
    }

    /// Zero padding on each side: `kernel / 2`.
    pub fn pad(&self) -> usize {
        self.kernel / 2
    }

    /// Pixels per channel plane: `height * width`.
    pub(crate) fn hw(&self) -> usize {
        self.height * self.width
    }

    /// Panics unless the kernel size is odd (the CPU convolutions' precondition).
    pub(crate) fn check_kernel(&self, op: &str) {
        assert!(
            self.kernel % 2 == 1,
            "{op}: kernel size must be odd, got {}",
            self.kernel
        );
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

/// The log-scale function of an affine coupling, `s = f(s_raw)` on each changed element
/// (the kernel's `coupling::apply` makes the same choice by `Arch::glow`).
#[derive(Clone, Copy, Debug)]
pub enum CouplingScale<'a> {
    /// The seed's RealNVP: `s = scale[j] * tanh(s_raw)`, with the learned per-channel `scale`
    /// (one value per changed channel). Its backward adds `dL/dscale` to `d_scale`.
    Tanh(&'a Buffer),
    /// Glow's bound with a floor `f` ([`clayflow_kernel::coupling::glow_log_scale`]):
    /// `exp(s) = f + (1 - f) sigmoid(s_raw + 2)` lies in `(f, 1)`, so a coupling only
    /// contracts and an unusual image cannot be blown up through many couplings (measured:
    /// with `tanh`, one held-out digit reached 6,090 bits/dim after 10 minutes of training
    /// while the median was 1.43), and its inverse expands at most `1/f`-fold, so an unusual
    /// latent cannot be blown up to infinity (`f = 0`, models before the floor: it could).
    /// No `scale` tensor is read and `d_scale` is left untouched.
    Sigmoid {
        /// The floor `f` (`Arch::scale_floor`).
        floor: f32,
    },
}

impl CouplingScale<'_> {
    /// The kernels' `mode` code: 0 `Tanh`, 1 `Sigmoid`.
    pub fn code(&self) -> i32 {
        match self {
            CouplingScale::Tanh(_) => 0,
            CouplingScale::Sigmoid { .. } => 1,
        }
    }

    /// The kernels' `floor` argument: the Glow floor, 0 for `Tanh` (which ignores it).
    pub fn floor(&self) -> f32 {
        match self {
            CouplingScale::Tanh(_) => 0.0,
            CouplingScale::Sigmoid { floor } => *floor,
        }
    }
}

/// The five LU factors of an invertible 1x1 convolution on a backend (the layout of
/// [`crate::invconv`]: `W = P L (U + diag(sign exp(log_s)))`).
#[derive(Clone, Copy, Debug)]
pub struct LuFactors<'a> {
    /// Row permutation (`C` integers stored as f32): `W[r] = M[perm[r]]`.
    pub perm: &'a Buffer,
    /// Signs of `diag U'` (`C` values, each +-1).
    pub sign: &'a Buffer,
    /// `C x C`, strict lower triangle used.
    pub lower: &'a Buffer,
    /// `C x C`, strict upper triangle used.
    pub upper: &'a Buffer,
    /// `C` values.
    pub log_s: &'a Buffer,
}

/// The f64 values of `(hi, lo)` float pairs (see
/// [`FlowLayers::per_image_sum_squares`](super::FlowLayers::per_image_sum_squares)).
pub fn hi_lo(pairs: &[f32]) -> Vec<f64> {
    pairs
        .chunks_exact(2)
        .map(|p| f64::from(p[0]) + f64::from(p[1]))
        .collect()
}

/// Splits an f64 into the `(hi, lo)` float pair that [`hi_lo`] reads back (about 48 bits).
pub fn to_hi_lo(v: f64) -> [f32; 2] {
    let hi = v as f32;
    [hi, (v - f64::from(hi)) as f32]
}
