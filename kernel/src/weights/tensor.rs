//! Read-only views of the tensors inside a blob: one tensor ([`Tensor`], widened to f32 as it
//! is read), a coupling's seven and a Glow step's five.

use crate::arch::Mask;

use super::DType;

/// A read-only view of one tensor's weights inside a blob.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a> {
    pub(super) dtype: DType,
    /// Exactly `len * dtype.size()` bytes (padding excluded).
    pub(super) bytes: &'a [u8],
}

impl<'a> Tensor<'a> {
    /// A view of `bytes` as elements of `dtype` (trailing partial element ignored).
    pub fn new(dtype: DType, bytes: &'a [u8]) -> Tensor<'a> {
        let partial = bytes.len().checked_rem(dtype.size()).unwrap_or(0);
        let whole = bytes.len().saturating_sub(partial);
        Tensor {
            dtype,
            bytes: bytes.get(..whole).unwrap_or(&[]),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.dtype.elements(self.bytes.len())
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The elements, widened to f32, in storage order.
    pub fn iter(&self) -> TensorIter<'a> {
        TensorIter {
            dtype: self.dtype,
            bytes: self.bytes,
        }
    }

    /// The storage type and the raw little-endian bytes (for decoders that widen in bulk).
    pub(crate) fn raw(&self) -> (DType, &'a [u8]) {
        (self.dtype, self.bytes)
    }

    /// Elements `start..start + len` as a tensor, or `None` when out of range.
    pub fn slice(&self, start: usize, len: usize) -> Option<Tensor<'a>> {
        let s = self.dtype.size();
        let a = start.checked_mul(s)?;
        let n = len.checked_mul(s)?;
        Some(Tensor {
            dtype: self.dtype,
            bytes: self.bytes.get(a..)?.get(..n)?,
        })
    }

    /// Position of the first element that is NaN or infinite, if any. Tests the exponent
    /// bits of the stored value (all ones means inf or NaN), so f16 needs no widening.
    pub fn first_non_finite(&self) -> Option<usize> {
        match self.dtype {
            DType::F32 => {
                let (elements, _) = self.bytes.as_chunks::<4>();
                elements
                    .iter()
                    .position(|e| u32::from_le_bytes(*e) & 0x7F80_0000 == 0x7F80_0000)
            }
            DType::F16 => {
                let (elements, _) = self.bytes.as_chunks::<2>();
                elements
                    .iter()
                    .position(|e| u16::from_le_bytes(*e) & 0x7C00 == 0x7C00)
            }
        }
    }
}

/// Iterator over a [`Tensor`]'s elements as f32.
#[derive(Clone, Debug)]
pub struct TensorIter<'a> {
    dtype: DType,
    bytes: &'a [u8],
}

impl Iterator for TensorIter<'_> {
    type Item = f32;

    #[inline]
    fn next(&mut self) -> Option<f32> {
        match self.dtype {
            DType::F32 => {
                let (head, rest) = self.bytes.split_first_chunk::<4>()?;
                self.bytes = rest;
                Some(f32::from_le_bytes(*head))
            }
            DType::F16 => {
                let (head, rest) = self.bytes.split_first_chunk::<2>()?;
                self.bytes = rest;
                Some(half::f16::from_le_bytes(*head).to_f32())
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.dtype.elements(self.bytes.len());
        (n, Some(n))
    }
}

impl ExactSizeIterator for TensorIter<'_> {}

/// The seven tensors of one coupling.
#[derive(Clone, Copy, Debug)]
pub struct CouplingWeights<'a> {
    /// The coupling's mask.
    pub mask: Mask,
    /// Per-changed-channel scale of `tanh(s_raw)`; empty in a Glow model.
    pub scale: Tensor<'a>,
    /// Conv weights `[cout][cin][k][k]`, convs 0, 1, 2.
    pub conv_w: [Tensor<'a>; 3],
    /// Conv biases `[cout]`, convs 0, 1, 2.
    pub conv_b: [Tensor<'a>; 3],
}

impl<'a> CouplingWeights<'a> {
    /// The seven tensors in blob order (the order of [`crate::arch::COUPLING_TENSORS`]).
    pub fn in_blob_order(&self) -> [Tensor<'a>; 7] {
        let [w0, w1, w2] = self.conv_w;
        let [b0, b1, b2] = self.conv_b;
        [self.scale, w0, b0, w1, b1, w2, b2]
    }
}

/// The five tensors a Glow step applies before its coupling, all stored as f32. With `C`
/// the channels of the step's level and `p` a pixel:
///
/// * ActNorm: `y[c, p] = x[c, p] * exp(logs[c]) + bias[c]`, log-det `plane * sum(logs)`;
/// * 1x1 conv: `y[o, p] = sum_i w[o][i] x[i, p]`, log-det `plane * logdet[0]`, where
///   `logdet[0] = ln|det w|` and `w_inv = w^-1` were computed at export.
#[derive(Clone, Copy, Debug)]
pub struct GlowWeights<'a> {
    /// ActNorm log-scale, `[C]`.
    pub logs: Tensor<'a>,
    /// ActNorm bias, `[C]`.
    pub bias: Tensor<'a>,
    /// The 1x1 convolution `W`, `[C][C]` row-major (output, input).
    pub w: Tensor<'a>,
    /// `W^-1`, `[C][C]` row-major; the inverse pass multiplies by it.
    pub w_inv: Tensor<'a>,
    /// `ln|det W|`, `[1]`.
    pub logdet: Tensor<'a>,
}

impl<'a> GlowWeights<'a> {
    /// The five tensors in blob order (the order of [`GLOW_TENSORS`](crate::arch::GLOW_TENSORS)).
    pub fn in_blob_order(&self) -> [Tensor<'a>; 5] {
        [self.logs, self.bias, self.w, self.w_inv, self.logdet]
    }
}

/// The learned prior's split coupling at a level `l < levels - 1` ([`crate::Arch::prior`]),
/// all stored as f32. With `C` the level's channels and `h = C/2`: the conv maps the even
/// channels (`h` planes) to `C` planes, `s_raw` then `t`; changed channel `j` (state channel
/// `2j + 1`) gets `x * exp(s) + t` with `s = scale[j] * tanh(s_raw)`.
#[derive(Clone, Copy, Debug)]
pub struct PriorWeights<'a> {
    /// Per-changed-channel scale of `tanh(s_raw)`, `[h]`.
    pub scale: Tensor<'a>,
    /// The 3x3 conv weight `[C][h][3][3]`.
    pub w: Tensor<'a>,
    /// The conv bias `[C]`.
    pub b: Tensor<'a>,
}

impl<'a> PriorWeights<'a> {
    /// The three tensors in blob order (the order of
    /// [`PRIOR_TENSORS`](crate::arch::PRIOR_TENSORS)).
    pub fn in_blob_order(&self) -> [Tensor<'a>; 3] {
        [self.scale, self.w, self.b]
    }
}

/// The learned prior's top ActNorm after the last level ([`crate::Arch::prior`]), stored as
/// f32: `y[c, p] = x[c, p] * exp(logs[c]) + bias[c]`, log-det `plane * sum(logs)`.
#[derive(Clone, Copy, Debug)]
pub struct TopWeights<'a> {
    /// Log-scale, `[C_last]`.
    pub logs: Tensor<'a>,
    /// Bias, `[C_last]`.
    pub bias: Tensor<'a>,
}

impl<'a> TopWeights<'a> {
    /// The two tensors in blob order (the order of [`TOP_TENSORS`](crate::arch::TOP_TENSORS)).
    pub fn in_blob_order(&self) -> [Tensor<'a>; 2] {
        [self.logs, self.bias]
    }
}
