//! The weight blob: one versioned little-endian binary holding the architecture and every
//! parameter, f32 or f16, checked by CRC-32. `kernel/FORMAT.md` specifies it.
//!
//! Version 1 holds the seed's one-level RealNVP architectures; version 2 adds the number of
//! levels and the Glow flag in two formerly reserved header bytes (18 and 19); version 3 is
//! version 2 for Glow models without the coupling `scale` tensor that Glow's sigmoid bound
//! never reads. The writer picks the one version that describes the architecture
//! ([`blob_version`]), so every seed blob is byte-identical to what earlier kernels wrote.
//! The reader also takes the older Glow encoding (version 2 with the Glow flag) and skips
//! its unused `scale` tensors. Glow tensors (ActNorm, the
//! invertible 1x1 convolution, its inverse and log-det) are always stored as f32, even in
//! f16 blobs: `W` and `W^-1` must stay each other's inverse to f32 precision for the flow to
//! invert exactly.
//!
//! Parsing is zero-copy: a [`Model`] borrows the blob and decodes weights as it reads them.
//!
//! Size arithmetic here never overflows: header offsets are constants below 100, sizes
//! derived from the architecture are saturating `const fn`s (a saturated size is larger
//! than any real slice, so it fails a length check), and offsets into the blob are only
//! formed through `get(at..)` on slices whose lengths bound them.

use crate::arch::{step_tensors, Arch, Mask, TensorKind, GLOW_TENSORS, MAX_COUPLINGS};
use crate::error::{Buffer, Error};

/// The eight bytes every blob starts with.
pub const MAGIC: [u8; 8] = *b"CLAYFLOW";
/// The format version of one-level RealNVP blobs (the seed's), which this kernel reads and
/// writes for every architecture with `levels == 1` and no Glow steps.
pub const VERSION: u16 = 1;
/// The format version of multi-level blobs without Glow steps: byte 18 holds the levels,
/// byte 19 the flags (bit 0: Glow). Earlier kernels also wrote Glow models as version 2,
/// with an unused `scale` tensor per coupling; this one reads those (and skips the tensor).
pub const VERSION_2: u16 = 2;
/// The format version of Glow blobs: version 2's header, Glow flag set, and couplings
/// without the `scale` tensor.
pub const VERSION_3: u16 = 3;
/// Flag bit of header byte 19 (version 2): every coupling is preceded by ActNorm and an
/// invertible 1x1 convolution.
pub const FLAG_GLOW: u8 = 1;
/// Bytes of the fixed header before the mask codes.
const FIXED_HEADER: usize = 40;

/// Storage type of the weights in a blob (computation is always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DType {
    /// IEEE-754 binary32, little-endian.
    F32 = 1,
    /// IEEE-754 binary16, little-endian, widened to f32 on load.
    F16 = 2,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }

    /// The dtype from its blob code.
    pub const fn from_code(code: u8) -> Option<DType> {
        match code {
            1 => Some(DType::F32),
            2 => Some(DType::F16),
            _ => None,
        }
    }

    /// Whole elements in `bytes` bytes (division by the literal size cannot fail).
    const fn elements(self, bytes: usize) -> usize {
        match self {
            DType::F32 => bytes / 4,
            DType::F16 => bytes / 2,
        }
    }
}

const fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// The format version [`write_blob`] uses for `arch`: [`VERSION`] (1) for one level without
/// Glow steps, so seed blobs stay byte-identical, [`VERSION_3`] for Glow steps, else
/// [`VERSION_2`].
pub const fn blob_version(arch: &Arch) -> u16 {
    if arch.glow {
        VERSION_3
    } else if arch.levels == 1 {
        VERSION
    } else {
        VERSION_2
    }
}

/// Bytes of the header (fixed part + mask codes padded to 4): the offset of the first tensor.
/// The same for both versions (version 2 uses two bytes that version 1 reserves).
pub const fn header_len(arch: &Arch) -> usize {
    align4(FIXED_HEADER.saturating_add(arch.couplings))
}

/// The storage type of a tensor of `kind` in a blob of `dtype`: f32 for the Glow tensors
/// (always, so that `W` and `W^-1` stay exact inverses), `dtype` for the coupling tensors.
pub const fn stored_dtype(kind: TensorKind, dtype: DType) -> DType {
    if kind.is_glow() {
        DType::F32
    } else {
        dtype
    }
}

/// Bytes one tensor of `len` elements occupies, padded to a multiple of 4.
const fn tensor_bytes(len: usize, dtype: DType) -> usize {
    align4(len.saturating_mul(dtype.size()))
}

/// Bytes of flow step `i` (mask `m`): its Glow tensors (if any) and its coupling tensors, at
/// the shape of its level; with `legacy`, also the unused `scale` tensor that version 2 Glow
/// blobs store.
const fn step_bytes(arch: &Arch, i: usize, m: Mask, dtype: DType, legacy: bool) -> usize {
    let view = arch.step_arch(i);
    let mut n = if legacy {
        tensor_bytes(view.changed(m), dtype)
    } else {
        0
    };
    let mut kinds = step_tensors(arch.glow);
    while let [kind, rest @ ..] = kinds {
        kinds = rest;
        let len = view.tensor_len(m, *kind);
        n = n.saturating_add(tensor_bytes(len, stored_dtype(*kind, dtype)));
    }
    n
}

/// Bytes of the first `count` flow steps' tensors: the offset of step `count`'s first tensor
/// in the tensor section (`legacy`: of a version 2 Glow blob).
const fn steps_bytes(arch: &Arch, dtype: DType, count: usize, legacy: bool) -> usize {
    let mut n = 0usize;
    let mut i = 0usize;
    let mut masks = arch.first_masks(count);
    while let [m, rest @ ..] = masks {
        masks = rest;
        n = n.saturating_add(step_bytes(arch, i, *m, dtype, legacy));
        i = i.saturating_add(1);
    }
    n
}

/// Bytes of the tensor section.
const fn tensors_len(arch: &Arch, dtype: DType, legacy: bool) -> usize {
    steps_bytes(arch, dtype, arch.couplings, legacy)
}

/// Elements of the unused `scale` tensors a version 2 Glow blob stores (`changed` per step),
/// which its header's parameter count includes.
const fn legacy_scale_params(arch: &Arch) -> usize {
    let mut n = 0usize;
    let mut i = 0usize;
    let mut masks = arch.first_masks(arch.couplings);
    while let [m, rest @ ..] = masks {
        masks = rest;
        n = n.saturating_add(arch.step_arch(i).changed(*m));
        i = i.saturating_add(1);
    }
    n
}

/// Total bytes of the blob for `arch` stored as `dtype` (header + tensors + 4-byte CRC), in
/// the version [`write_blob`] writes ([`blob_version`]).
pub const fn blob_len(arch: &Arch, dtype: DType) -> usize {
    stored_len(arch, dtype, false)
}

/// [`blob_len`], or with `legacy` the length of a version 2 Glow blob (with `scale` tensors).
const fn stored_len(arch: &Arch, dtype: DType, legacy: bool) -> usize {
    header_len(arch)
        .saturating_add(tensors_len(arch, dtype, legacy))
        .saturating_add(4)
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0u32;
    let mut slots: &mut [u32] = &mut table;
    while let [slot, rest @ ..] = slots {
        slots = rest;
        let mut c = i;
        let mut k = 0u32;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            // Counters below 256 and 8: no wrap happens.
            k = k.wrapping_add(1);
        }
        *slot = c;
        i = i.wrapping_add(1);
    }
    table
};

/// CRC-32 (IEEE 802.3, the one of zlib, PNG and Python's `zlib.crc32`).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        // A u8 index into 256 entries: `get` is always `Some`, and the optimiser knows it
        // (no branch is emitted).
        let entry = CRC_TABLE.get(usize::from(c as u8 ^ b));
        c = entry.copied().unwrap_or(0) ^ (c >> 8);
    }
    !c
}

/// A read-only view of one tensor's weights inside a blob.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a> {
    dtype: DType,
    /// Exactly `len * dtype.size()` bytes (padding excluded).
    bytes: &'a [u8],
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
    /// The five tensors in blob order (the order of [`GLOW_TENSORS`]).
    pub fn in_blob_order(&self) -> [Tensor<'a>; 5] {
        [self.logs, self.bias, self.w, self.w_inv, self.logdet]
    }
}

/// A parsed, checked model: the architecture plus a borrowed view of the weights.
#[derive(Clone, Copy, Debug)]
pub struct Model<'a> {
    arch: Arch,
    dtype: DType,
    tensors: &'a [u8],
    /// A version 2 Glow blob: each coupling's tensors start with an unused `scale` tensor.
    legacy: bool,
}

/// The `N` bytes at `at`, or `Truncated`.
fn read<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], Error> {
    b.get(at..)
        .and_then(|s| s.first_chunk::<N>())
        .copied()
        .ok_or(Error::Truncated {
            needed: at.saturating_add(N),
            got: b.len(),
        })
}

fn read_u16(b: &[u8], at: usize) -> Result<u16, Error> {
    read(b, at).map(u16::from_le_bytes)
}

fn read_u32(b: &[u8], at: usize) -> Result<u32, Error> {
    read(b, at).map(u32::from_le_bytes)
}

fn read_u8(b: &[u8], at: usize) -> Result<u8, Error> {
    read(b, at).map(u8::from_le_bytes)
}

impl<'a> Model<'a> {
    /// Parses and checks a blob: magic, version, dtype, architecture, exact length, CRC-32,
    /// and that every weight is finite. Never panics, whatever the bytes.
    pub fn from_blob(blob: &'a [u8]) -> Result<Model<'a>, Error> {
        if blob.len() < FIXED_HEADER {
            // Still report a wrong magic first if there are enough bytes to tell.
            if blob.len() >= 8 && blob.get(..8) != Some(&MAGIC[..]) {
                return Err(Error::BadMagic);
            }
            return Err(Error::Truncated {
                needed: FIXED_HEADER,
                got: blob.len(),
            });
        }
        if blob.get(..8) != Some(&MAGIC[..]) {
            return Err(Error::BadMagic);
        }
        let version = read_u16(blob, 8)?;
        if !matches!(version, VERSION | VERSION_2 | VERSION_3) {
            return Err(Error::UnsupportedVersion(version));
        }
        let code = read_u8(blob, 10)?;
        let dtype = DType::from_code(code).ok_or(Error::UnknownDtype(code))?;
        if read_u8(blob, 11)? != 0 {
            return Err(Error::BadHeader("reserved byte 11 is not 0"));
        }
        let squeeze = match read_u8(blob, 20)? {
            0 => false,
            1 => true,
            _ => return Err(Error::BadHeader("squeeze flag is not 0 or 1")),
        };
        let couplings = usize::from(read_u8(blob, 21)?);
        let mut masks = [Mask::ChannelEven; MAX_COUPLINGS];
        if couplings > MAX_COUPLINGS || couplings == 0 {
            return Err(Error::InvalidArch(crate::error::ArchField::Couplings));
        }
        for (at, m) in (FIXED_HEADER..).zip(masks.iter_mut().take(couplings)) {
            let code = read_u8(blob, at)?;
            *m = Mask::from_code(code).ok_or(Error::BadHeader("unknown mask code"))?;
        }
        // Version 1 reserves bytes 18-19; versions 2 and 3 store the levels and the flags.
        let (levels, glow) = if version == VERSION {
            if read_u16(blob, 18)? != 0 || read_u16(blob, 30)? != 0 {
                return Err(Error::BadHeader("reserved bytes 18-19 or 30-31 are not 0"));
            }
            (1, false)
        } else {
            if read_u16(blob, 30)? != 0 {
                return Err(Error::BadHeader("reserved bytes 30-31 are not 0"));
            }
            let flags = read_u8(blob, 19)?;
            if flags & !FLAG_GLOW != 0 {
                return Err(Error::BadHeader(
                    "unknown flag bits in byte 19 (versions 2 and 3 define only bit 0, Glow)",
                ));
            }
            (usize::from(read_u8(blob, 18)?), flags & FLAG_GLOW != 0)
        };
        let arch = Arch {
            channels: usize::from(read_u16(blob, 16)?),
            height: usize::from(read_u16(blob, 12)?),
            width: usize::from(read_u16(blob, 14)?),
            squeeze,
            levels,
            glow,
            couplings,
            masks,
            kernels: [
                usize::from(read_u8(blob, 22)?),
                usize::from(read_u8(blob, 23)?),
                usize::from(read_u8(blob, 24)?),
            ],
            bits: u32::from(read_u8(blob, 25)?),
            hidden: [
                usize::from(read_u16(blob, 26)?),
                usize::from(read_u16(blob, 28)?),
            ],
            logit_alpha: f32::from_bits(read_u32(blob, 32)?),
        };
        arch.validate()?;
        // One encoding per model (a one-level, non-Glow architecture is version 1, a Glow one
        // version 3), except that the Glow encoding of earlier kernels (version 2, with the
        // unused `scale` tensors) is still read.
        let legacy = version == VERSION_2 && glow;
        if blob_version(&arch) != version && !legacy {
            return Err(Error::BadHeader(if version == VERSION_3 {
                "version 3 blob without the Glow flag (must be version 1 or 2)"
            } else {
                "version 2 blob with 1 level and no Glow flag (must be version 1)"
            }));
        }
        let stated_params = read_u32(blob, 36)?;
        let params = if legacy {
            arch.param_count()
                .saturating_add(legacy_scale_params(&arch))
        } else {
            arch.param_count()
        };
        if usize::try_from(stated_params).ok() != Some(params) {
            return Err(Error::BadHeader(
                "parameter count does not match the architecture (wrong shapes)",
            ));
        }
        let expected = stored_len(&arch, dtype, legacy);
        if blob.len() < expected {
            return Err(Error::Truncated {
                needed: expected,
                got: blob.len(),
            });
        }
        if blob.len() > expected {
            return Err(Error::TrailingBytes {
                expected,
                got: blob.len(),
            });
        }
        let (body, stored) = blob.split_last_chunk::<4>().ok_or(Error::Truncated {
            needed: expected,
            got: blob.len(),
        })?;
        let stored = u32::from_le_bytes(*stored);
        let computed = crc32(body);
        if stored != computed {
            return Err(Error::ChecksumMismatch { stored, computed });
        }
        let tensors = body.get(header_len(&arch)..).unwrap_or(&[]);
        let model = Model {
            arch,
            dtype,
            tensors,
            legacy,
        };
        // Every weight finite: a corrupt blob cannot smuggle NaN/inf weights in. (Finite but
        // huge weights can still overflow f32 downstream; outputs are then inf/NaN, never a panic.)
        // A version 2 Glow blob's `scale` tensors are never read, so not checked either; the
        // flat index counts the weights the model has (as if the blob were version 3).
        let mut first = 0usize;
        let mut tensor = 0usize;
        let no_glow = [None; 5];
        for i in 0..couplings {
            let glow_tensors = if glow {
                model.glow_step(i)?.in_blob_order().map(Some)
            } else {
                no_glow
            };
            let coupling_tensors = model.coupling(i)?.in_blob_order().map(Some);
            let kinds = step_tensors(glow).iter();
            let tensors = glow_tensors.into_iter().chain(coupling_tensors).flatten();
            for (t, &kind) in tensors.zip(kinds) {
                if let Some(k) = t.first_non_finite() {
                    return Err(non_finite(glow, tensor, i, kind, first.saturating_add(k)));
                }
                first = first.saturating_add(t.len());
                tensor = tensor.saturating_add(1);
            }
        }
        Ok(model)
    }

    /// The architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// The stored weight dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The blob's format version: [`blob_version`] of the architecture, or [`VERSION_2`] for
    /// a Glow blob written by an earlier kernel.
    pub fn version(&self) -> u16 {
        if self.legacy {
            VERSION_2
        } else {
            blob_version(&self.arch)
        }
    }

    /// The tensor of `kind` (mask `mask`, level view `view`) at byte `*offset` of the
    /// tensor section; advances `*offset` past it and its padding.
    fn take(
        &self,
        view: &Arch,
        mask: Mask,
        kind: TensorKind,
        offset: &mut usize,
    ) -> Result<Tensor<'a>, Error> {
        let dtype = stored_dtype(kind, self.dtype);
        let n = view.tensor_len(mask, kind).saturating_mul(dtype.size());
        let at = *offset;
        let bytes = self
            .tensors
            .get(at..)
            .and_then(|rest| rest.get(..n))
            .ok_or(Error::Truncated {
                needed: at.saturating_add(n),
                got: self.tensors.len(),
            })?;
        *offset = at.saturating_add(align4(n));
        Ok(Tensor { dtype, bytes })
    }

    /// Step `i`'s mask and the byte offset of its first tensor in the tensor section.
    fn step_start(&self, i: usize) -> Result<(Mask, usize), Error> {
        let mask = *self
            .arch
            .active_masks()
            .get(i)
            .ok_or(Error::InvalidArgument("coupling index out of range"))?;
        Ok((mask, steps_bytes(&self.arch, self.dtype, i, self.legacy)))
    }

    /// The Glow tensors of step `i` (ActNorm, 1x1 conv, its inverse and log-det), at the
    /// shape of step `i`'s level. An error when the architecture has no Glow steps or `i` is
    /// out of range.
    pub fn glow_step(&self, i: usize) -> Result<GlowWeights<'a>, Error> {
        if !self.arch.glow {
            return Err(Error::InvalidArgument("the architecture has no Glow steps"));
        }
        let (mask, mut offset) = self.step_start(i)?;
        let view = self.arch.step_arch(i);
        let [logs, bias, w, w_inv, logdet] = GLOW_TENSORS;
        Ok(GlowWeights {
            logs: self.take(&view, mask, logs, &mut offset)?,
            bias: self.take(&view, mask, bias, &mut offset)?,
            w: self.take(&view, mask, w, &mut offset)?,
            w_inv: self.take(&view, mask, w_inv, &mut offset)?,
            logdet: self.take(&view, mask, logdet, &mut offset)?,
        })
    }

    /// The coupling weights of step `i` (0 is nearest the image), at the shape of step `i`'s
    /// level (run it with [`Arch::step_arch`]`(i)`). In a Glow architecture these follow the
    /// step's Glow tensors ([`Model::glow_step`]).
    pub fn coupling(&self, i: usize) -> Result<CouplingWeights<'a>, Error> {
        let (mask, mut offset) = self.step_start(i)?;
        let view = self.arch.step_arch(i);
        if self.arch.glow {
            for kind in GLOW_TENSORS {
                let len = view.tensor_len(mask, kind);
                offset = offset.saturating_add(tensor_bytes(len, DType::F32));
            }
        }
        if self.legacy {
            // The unused `scale` tensor of a version 2 Glow blob.
            offset = offset.saturating_add(tensor_bytes(view.changed(mask), self.dtype));
        }
        let mut take = |kind: TensorKind| self.take(&view, mask, kind, &mut offset);
        // Empty in a Glow model (its `tensor_len` is 0).
        let scale = take(TensorKind::Scale)?;
        let w0 = take(TensorKind::ConvWeight(0))?;
        let b0 = take(TensorKind::ConvBias(0))?;
        let w1 = take(TensorKind::ConvWeight(1))?;
        let b1 = take(TensorKind::ConvBias(1))?;
        let w2 = take(TensorKind::ConvWeight(2))?;
        let b2 = take(TensorKind::ConvBias(2))?;
        Ok(CouplingWeights {
            mask,
            scale,
            conv_w: [w0, w1, w2],
            conv_b: [b0, b1, b2],
        })
    }
}

/// The `len` bytes of `out` at `at`, or a `BufferSize` error for the blob buffer.
fn region(out: &mut [u8], at: usize, len: usize) -> Result<&mut [u8], Error> {
    let got = out.len();
    out.get_mut(at..)
        .and_then(|rest| rest.get_mut(..len))
        .ok_or(Error::BufferSize {
            buffer: Buffer::Blob,
            needed: at.saturating_add(len),
            got,
        })
}

fn put(out: &mut [u8], at: usize, bytes: &[u8]) -> Result<(), Error> {
    region(out, at, bytes.len())?.copy_from_slice(bytes);
    Ok(())
}

/// Writes the blob of `arch` with the flat parameter vector `params` (length
/// [`Arch::param_count`], in blob tensor order) stored as `dtype` into `out` (length at least
/// [`blob_len`]). Returns the bytes written. Fails on a non-finite weight, or one that
/// overflows f16.
pub fn write_blob(
    arch: &Arch,
    dtype: DType,
    params: &[f32],
    out: &mut [u8],
) -> Result<usize, Error> {
    arch.validate()?;
    if params.len() != arch.param_count() {
        return Err(Error::BufferSize {
            buffer: Buffer::Weights,
            needed: arch.param_count(),
            got: params.len(),
        });
    }
    let total = blob_len(arch, dtype);
    if out.len() < total {
        return Err(Error::BufferSize {
            buffer: Buffer::Blob,
            needed: total,
            got: out.len(),
        });
    }
    let out = out.get_mut(..total).ok_or(Error::BufferSize {
        buffer: Buffer::Blob,
        needed: total,
        got: 0,
    })?;
    out.fill(0);
    let narrow = |v: usize| {
        u16::try_from(v).map_err(|_| Error::InvalidArch(crate::error::ArchField::TooLarge))
    };
    let byte = |v: usize| {
        u8::try_from(v).map_err(|_| Error::InvalidArch(crate::error::ArchField::TooLarge))
    };
    let version = blob_version(arch);
    put(out, 0, &MAGIC)?;
    put(out, 8, &version.to_le_bytes())?;
    put(out, 10, &[dtype as u8, 0])?;
    put(out, 12, &narrow(arch.height)?.to_le_bytes())?;
    put(out, 14, &narrow(arch.width)?.to_le_bytes())?;
    put(out, 16, &narrow(arch.channels)?.to_le_bytes())?;
    if version != VERSION {
        let flags = if arch.glow { FLAG_GLOW } else { 0 };
        put(out, 18, &[byte(arch.levels)?, flags])?;
    }
    put(out, 20, &[u8::from(arch.squeeze), byte(arch.couplings)?])?;
    put(
        out,
        22,
        &[
            byte(arch.kernels[0])?,
            byte(arch.kernels[1])?,
            byte(arch.kernels[2])?,
            byte(arch.bits as usize)?,
        ],
    )?;
    put(out, 26, &narrow(arch.hidden[0])?.to_le_bytes())?;
    put(out, 28, &narrow(arch.hidden[1])?.to_le_bytes())?;
    put(out, 32, &arch.logit_alpha.to_bits().to_le_bytes())?;
    let count = u32::try_from(arch.param_count())
        .map_err(|_| Error::InvalidArch(crate::error::ArchField::TooLarge))?;
    put(out, 36, &count.to_le_bytes())?;
    let codes = region(out, FIXED_HEADER, arch.couplings)?;
    for (code, m) in codes.iter_mut().zip(arch.active_masks()) {
        *code = *m as u8;
    }
    let mut at = header_len(arch);
    let mut first = 0usize;
    let mut tensor = 0usize;
    let mut rest = params;
    for (i, &m) in arch.active_masks().iter().enumerate() {
        let view = arch.step_arch(i);
        for &kind in step_tensors(arch.glow) {
            let len = view.tensor_len(m, kind);
            let dtype = stored_dtype(kind, dtype);
            let (values, tail) = rest.split_at_checked(len).ok_or(Error::BufferSize {
                buffer: Buffer::Weights,
                needed: arch.param_count(),
                got: params.len(),
            })?;
            rest = tail;
            let dst = region(out, at, len.saturating_mul(dtype.size()))?;
            let bad = |k: usize| non_finite(arch.glow, tensor, i, kind, first.saturating_add(k));
            match dtype {
                DType::F32 => {
                    let (dst, _) = dst.as_chunks_mut::<4>();
                    for (k, (d, &v)) in dst.iter_mut().zip(values).enumerate() {
                        if !v.is_finite() {
                            return Err(bad(k));
                        }
                        *d = v.to_le_bytes();
                    }
                }
                DType::F16 => {
                    let (dst, _) = dst.as_chunks_mut::<2>();
                    for (k, (d, &v)) in dst.iter_mut().zip(values).enumerate() {
                        let h = half::f16::from_f32(v);
                        if !v.is_finite() || !h.is_finite() {
                            return Err(bad(k));
                        }
                        *d = h.to_le_bytes();
                    }
                }
            }
            first = first.saturating_add(len);
            tensor = tensor.saturating_add(1);
            at = at.saturating_add(tensor_bytes(len, dtype));
        }
    }
    let (body, crc) = out.split_last_chunk_mut::<4>().ok_or(Error::BufferSize {
        buffer: Buffer::Blob,
        needed: total,
        got: 0,
    })?;
    *crc = crc32(body).to_le_bytes();
    Ok(total)
}

/// The non-finite-weight error for tensor number `tensor` (blob order), the `kind` tensor
/// of step `step`, at flat parameter `index`: [`Error::NonFiniteWeight`] for architectures
/// without Glow steps (seven tensors per step), [`Error::NonFiniteGlowWeight`] with them.
fn non_finite(glow: bool, tensor: usize, step: usize, kind: TensorKind, index: usize) -> Error {
    if glow {
        Error::NonFiniteGlowWeight { step, kind, index }
    } else {
        Error::NonFiniteWeight { tensor, index }
    }
}

/// Rounds every parameter through f16 and back, so a caller can see exactly the values an
/// f16 blob will hold, for architectures without Glow steps (every tensor is then stored in
/// the blob's dtype). For any architecture use [`round_to_f16_for`].
pub fn round_to_f16(params: &mut [f32]) {
    for v in params {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

/// Rounds through f16 and back exactly the parameters an f16 blob of `arch` stores as f16
/// (the coupling tensors), leaving the Glow tensors (stored as f32) untouched; so an f16
/// round trip of `params` returns `round_to_f16_for(arch, params)` bit for bit. For an
/// architecture without Glow steps it equals [`round_to_f16`]. Errors on an invalid `arch`
/// or when `params.len()` is not [`Arch::param_count`] (then `params` is unchanged).
pub fn round_to_f16_for(arch: &Arch, params: &mut [f32]) -> Result<(), Error> {
    arch.validate()?;
    if params.len() != arch.param_count() {
        return Err(Error::BufferSize {
            buffer: Buffer::Weights,
            needed: arch.param_count(),
            got: params.len(),
        });
    }
    let mut rest = params;
    for (i, &m) in arch.active_masks().iter().enumerate() {
        let view = arch.step_arch(i);
        for &kind in step_tensors(arch.glow) {
            let len = view.tensor_len(m, kind);
            let (values, tail) = rest.split_at_mut_checked(len).ok_or(Error::BufferSize {
                buffer: Buffer::Weights,
                needed: arch.param_count(),
                got: 0,
            })?;
            rest = tail;
            if !kind.is_glow() {
                round_to_f16(values);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{alternating_masks, COLOR, COLOR_GLOW, COUPLING_TENSORS, MNIST, MNIST_GLOW};
    use crate::error::ArchField;
    use crate::flow::sample;
    use crate::scratch_len;
    use crate::testutil::{blob, random_params, MNIST_OR_MINI};
    use proptest::prelude::*;
    use std::string::ToString;
    use std::vec::Vec;

    /// 3x4x4 without squeeze, masks channel-even, checker-odd, channel-odd: the channel
    /// split is uneven (kept 2 / changed 1, then 1 / 2), hidden widths are odd so f16 tensors
    /// need padding, and three couplings leave one padding byte in the header (43 -> 44).
    fn small() -> Arch {
        let mut masks = [Mask::ChannelEven; MAX_COUPLINGS];
        masks[1] = Mask::CheckerOdd;
        masks[2] = Mask::ChannelOdd;
        Arch {
            channels: 3,
            height: 4,
            width: 4,
            squeeze: false,
            levels: 1,
            glow: false,
            couplings: 3,
            masks,
            kernels: [3, 1, 5],
            hidden: [3, 5],
            bits: 5,
            logit_alpha: 0.01,
        }
    }

    /// 1x4x4 squeezed to 4x2x2, two channel couplings.
    fn squeezed() -> Arch {
        Arch {
            channels: 1,
            height: 4,
            width: 4,
            squeeze: true,
            levels: 1,
            glow: false,
            couplings: 2,
            masks: alternating_masks(Mask::ChannelOdd),
            kernels: [3, 3, 1],
            hidden: [2, 4],
            bits: 8,
            logit_alpha: 0.05,
        }
    }

    /// A version 2 model: 2x4x4 without squeeze, 2 levels (2x4x4, then 4x2x2), Glow steps,
    /// a checkerboard and channel masks, odd hidden widths (f16 padding).
    fn glow_small() -> Arch {
        let mut masks = [Mask::ChannelEven; MAX_COUPLINGS];
        masks[..4].copy_from_slice(&[
            Mask::ChannelEven,
            Mask::CheckerOdd,
            Mask::ChannelOdd,
            Mask::CheckerEven,
        ]);
        Arch {
            channels: 2,
            height: 4,
            width: 4,
            squeeze: false,
            levels: 2,
            glow: true,
            couplings: 4,
            masks,
            kernels: [3, 1, 3],
            hidden: [3, 5],
            bits: 8,
            logit_alpha: 0.05,
        }
    }

    fn valid_glow(dtype: DType) -> Vec<u8> {
        blob(&glow_small(), dtype, &random_params(&glow_small(), 8, 1.0))
    }

    /// `(byte offset, step, kind, element size)` of flat parameter `index` in a blob of
    /// `arch`, from the spec (step tensors in blob order at the level's shape, Glow tensors
    /// f32, each tensor padded to 4 bytes), not from the parser.
    fn locate(arch: &Arch, dtype: DType, index: usize) -> (usize, usize, TensorKind, usize) {
        let mut at = (40 + arch.couplings).div_ceil(4) * 4;
        let mut first = 0;
        for (i, &m) in arch.active_masks().iter().enumerate() {
            let view = arch.step_arch(i);
            for &kind in step_tensors(arch.glow) {
                let len = view.tensor_len(m, kind);
                let size = if kind.is_glow() { 4 } else { dtype.size() };
                if index < first + len {
                    return (at + (index - first) * size, i, kind, size);
                }
                first += len;
                at += (len * size).div_ceil(4) * 4;
            }
        }
        panic!("parameter {index} out of range");
    }

    fn valid(dtype: DType) -> Vec<u8> {
        blob(&small(), dtype, &random_params(&small(), 7, 1.0))
    }

    /// Recomputes the trailing CRC-32 over everything before it.
    fn fix_crc(b: &mut [u8]) {
        let n = b.len() - 4;
        let crc = crc32(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }

    fn set_u16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn err(b: &[u8]) -> Error {
        Model::from_blob(b).expect_err("blob should be rejected")
    }

    /// Byte offset of flat parameter `index` in a blob of `arch`, computed from the spec
    /// (each tensor padded to 4 bytes), not from the parser.
    fn weight_offset(arch: &Arch, dtype: DType, index: usize) -> usize {
        let mut at = (40 + arch.couplings).div_ceil(4) * 4;
        let mut first = 0;
        for &m in arch.active_masks() {
            for kind in COUPLING_TENSORS {
                let len = arch.tensor_len(m, kind);
                if index < first + len {
                    return at + (index - first) * dtype.size();
                }
                first += len;
                at += (len * dtype.size()).div_ceil(4) * 4;
            }
        }
        panic!("parameter {index} out of range");
    }

    /// Blob-order tensor number (coupling * 7 + kind) holding flat parameter `index`,
    /// computed from the spec, not from the parser.
    fn tensor_of(arch: &Arch, index: usize) -> usize {
        let mut first = 0;
        let mut tensor = 0;
        for &m in arch.active_masks() {
            for kind in COUPLING_TENSORS {
                first += arch.tensor_len(m, kind);
                if index < first {
                    return tensor;
                }
                tensor += 1;
            }
        }
        panic!("parameter {index} out of range");
    }

    /// Every weight of a model in blob order, widened to f32.
    fn weights(model: &Model<'_>) -> Vec<f32> {
        let mut out = Vec::new();
        for i in 0..model.arch().couplings {
            let c = model.coupling(i).unwrap();
            assert_eq!(c.mask, model.arch().masks[i]);
            for t in [
                c.scale,
                c.conv_w[0],
                c.conv_b[0],
                c.conv_w[1],
                c.conv_b[1],
                c.conv_w[2],
                c.conv_b[2],
            ] {
                out.extend(t.iter());
            }
        }
        out
    }

    /// Arch equality as far as the blob can carry it: the mask slots past `couplings` are
    /// not stored (the parser fills them with `ChannelEven`), so `==` on `Arch` is too strict.
    fn assert_same_arch(got: &Arch, want: &Arch) {
        assert_eq!(got.active_masks(), want.active_masks());
        let mut norm = *want;
        norm.masks = [Mask::ChannelEven; MAX_COUPLINGS];
        norm.masks[..want.couplings].copy_from_slice(want.active_masks());
        assert_eq!(*got, norm);
        assert_eq!(got.logit_alpha.to_bits(), want.logit_alpha.to_bits());
    }

    /// An independent writer that follows FORMAT.md byte by byte.
    fn spec_blob(arch: &Arch, dtype: DType, params: &[f32]) -> Vec<u8> {
        spec_blob_as(arch, dtype, params, false)
    }

    /// [`spec_blob`], or with `legacy` (a Glow `arch`) the version 2 encoding earlier kernels
    /// wrote: each coupling's tensors start with a `scale` tensor (`changed` values, here
    /// 0.5, unused), which the header's parameter count includes.
    fn spec_blob_as(arch: &Arch, dtype: DType, params: &[f32], legacy: bool) -> Vec<u8> {
        assert!(!legacy || arch.glow);
        let v2 = arch.levels > 1 || arch.glow;
        let version: u16 = if arch.glow && !legacy {
            3
        } else if v2 {
            2
        } else {
            1
        };
        let mut b = Vec::new();
        b.extend_from_slice(b"CLAYFLOW");
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&[dtype as u8, 0]);
        for v in [arch.height, arch.width, arch.channels] {
            b.extend_from_slice(&(v as u16).to_le_bytes());
        }
        if v2 {
            b.extend_from_slice(&[arch.levels as u8, u8::from(arch.glow)]);
        } else {
            b.extend_from_slice(&[0, 0]);
        }
        b.extend_from_slice(&[u8::from(arch.squeeze), arch.couplings as u8]);
        b.extend_from_slice(&[
            arch.kernels[0] as u8,
            arch.kernels[1] as u8,
            arch.kernels[2] as u8,
            arch.bits as u8,
        ]);
        for v in [arch.hidden[0], arch.hidden[1], 0] {
            b.extend_from_slice(&(v as u16).to_le_bytes());
        }
        b.extend_from_slice(&arch.logit_alpha.to_le_bytes());
        let scales: usize = (0..arch.couplings)
            .map(|i| arch.step_arch(i).changed(arch.masks[i]))
            .sum();
        let count = params.len() + if legacy { scales } else { 0 };
        b.extend_from_slice(&(count as u32).to_le_bytes());
        assert_eq!(b.len(), 40);
        b.extend(arch.active_masks().iter().map(|&m| m as u8));
        let pad = |b: &mut Vec<u8>| b.resize(b.len().div_ceil(4) * 4, 0);
        pad(&mut b);
        let mut rest = params;
        for (i, &m) in arch.active_masks().iter().enumerate() {
            let view = arch.step_arch(i);
            let glow: &[TensorKind] = if arch.glow { &GLOW_TENSORS } else { &[] };
            for &kind in glow.iter().chain(&COUPLING_TENSORS) {
                if legacy && kind == TensorKind::Scale {
                    for _ in 0..view.changed(m) {
                        match dtype {
                            DType::F32 => b.extend_from_slice(&0.5f32.to_le_bytes()),
                            DType::F16 => {
                                b.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes())
                            }
                        }
                    }
                    pad(&mut b);
                    continue;
                }
                let (t, tail) = rest.split_at(view.tensor_len(m, kind));
                rest = tail;
                for &v in t {
                    match (dtype, kind.is_glow()) {
                        (DType::F32, _) | (_, true) => b.extend_from_slice(&v.to_le_bytes()),
                        (DType::F16, false) => {
                            b.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())
                        }
                    }
                }
                pad(&mut b);
            }
        }
        assert!(rest.is_empty());
        let crc = crc32(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn crc32_matches_the_zlib_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"a"), 0xE8B7_BE43);
    }

    #[test]
    fn preset_blob_sizes() {
        assert_eq!(header_len(&MNIST), 52);
        assert_eq!(blob_len(&MNIST, DType::F32), 1_337_816);
        assert_eq!(blob_len(&MNIST, DType::F16), 668_936);
        assert_eq!(blob_len(&COLOR, DType::F32), 12_017_432);
        assert_eq!(blob_len(&COLOR, DType::F16), 6_008_744);
        // No preset tensor has an odd f16 length, so there is no padding: 52 + n * size + 4.
        assert_eq!(
            blob_len(&MNIST, DType::F16),
            52 + 2 * MNIST.param_count() + 4
        );
        assert_eq!(
            blob_len(&COLOR, DType::F32),
            52 + 4 * COLOR.param_count() + 4
        );
        assert_eq!(header_len(&small()), 44);
    }

    /// The reference vector printed in FORMAT.md: the MNIST preset with every weight 0.0.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "writes and CRCs two full MNIST blobs (2 MB): minutes under Miri; \
                  writer_matches_the_documented_layout checks the same writer on a small arch"
    )]
    fn zero_weight_mnist_blob_matches_the_documented_vector() {
        let zeros = std::vec![0.0f32; MNIST.param_count()];
        let header: [u8; 52] = [
            0x43, 0x4c, 0x41, 0x59, 0x46, 0x4c, 0x4f, 0x57, 0x01, 0x00, 0x01, 0x00, 0x1c, 0x00,
            0x1c, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x05, 0x07, 0x03, 0x08, 0x08, 0x00,
            0x40, 0x00, 0x00, 0x00, 0xcd, 0xcc, 0x4c, 0x3d, 0x68, 0x1a, 0x05, 0x00, 0x00, 0x01,
            0x00, 0x01, 0x00, 0x01, 0x00, 0x01, 0x00, 0x01, 0x00, 0x01,
        ];
        for (dtype, crc) in [(DType::F32, 0x8F5E_E608u32), (DType::F16, 0xEBDE_C171)] {
            let b = blob(&MNIST, dtype, &zeros);
            assert_eq!(b.len(), blob_len(&MNIST, dtype));
            let mut want = header;
            want[10] = dtype as u8;
            assert_eq!(b[..52], want);
            assert!(b[52..b.len() - 4].iter().all(|&v| v == 0));
            assert_eq!(b[b.len() - 4..], crc.to_le_bytes());
        }
    }

    #[test]
    fn writer_matches_the_documented_layout() {
        let multi = Arch {
            glow: false,
            ..glow_small()
        };
        for arch in [small(), squeezed(), MNIST_OR_MINI, glow_small(), multi] {
            let params = random_params(&arch, 3, 1.0);
            for dtype in [DType::F32, DType::F16] {
                let b = blob(&arch, dtype, &params);
                assert_eq!(b.len(), blob_len(&arch, dtype));
                assert!(b == spec_blob(&arch, dtype, &params), "{arch:?} {dtype:?}");
            }
        }
        // Spot checks of the fixed offsets on the small model.
        let b = valid(DType::F16);
        assert_eq!(&b[..8], b"CLAYFLOW");
        assert_eq!(b[8..12], [1, 0, 2, 0]);
        assert_eq!(b[12..20], [4, 0, 4, 0, 3, 0, 0, 0]); // height, width, channels, reserved
        assert_eq!(b[20..26], [0, 3, 3, 1, 5, 5]); // squeeze, couplings, k0..k2, bits
        assert_eq!(b[26..32], [3, 0, 5, 0, 0, 0]); // hidden0, hidden1, reserved
        assert_eq!(b[32..36], 0.01f32.to_le_bytes());
        assert_eq!(b[36..40], (small().param_count() as u32).to_le_bytes());
        assert_eq!(b[40..44], [0, 3, 1, 0]); // mask codes, one padding byte
        let n = b.len() - 4;
        assert_eq!(b[n..], crc32(&b[..n]).to_le_bytes());
    }

    /// On the MNIST preset natively, on its 4x4 miniature under Miri.
    #[test]
    fn round_trip_f32_is_bit_identical() {
        for arch in [small(), squeezed(), MNIST_OR_MINI] {
            let params = random_params(&arch, 11, 1.0);
            let b = blob(&arch, DType::F32, &params);
            let model = Model::from_blob(&b).unwrap();
            assert_same_arch(model.arch(), &arch);
            assert_eq!(model.dtype(), DType::F32);
            let got = weights(&model);
            assert_eq!(got.len(), params.len());
            assert!(got
                .iter()
                .zip(&params)
                .all(|(a, e)| a.to_bits() == e.to_bits()));
            assert_eq!(
                model.coupling(arch.couplings).unwrap_err(),
                Error::InvalidArgument("coupling index out of range")
            );
        }
    }

    /// On the MNIST preset natively, on its 4x4 miniature under Miri.
    #[test]
    fn round_trip_f16_gives_the_f16_rounded_values() {
        for arch in [small(), squeezed(), MNIST_OR_MINI] {
            let mut params = random_params(&arch, 12, 1.0);
            // Values that are not f16-exact, one near the top of its range.
            params[0] = 0.1;
            params[1] = 65_519.0;
            let b = blob(&arch, DType::F16, &params);
            let model = Model::from_blob(&b).unwrap();
            assert_same_arch(model.arch(), &arch);
            assert_eq!(model.dtype(), DType::F16);
            round_to_f16(&mut params);
            assert_eq!(params[1], 65_504.0);
            let got = weights(&model);
            assert_eq!(got.len(), params.len());
            assert!(got
                .iter()
                .zip(&params)
                .all(|(a, e)| a.to_bits() == e.to_bits()));
        }
    }

    /// Every weight of a model in blob order (Glow tensors first in each step), widened.
    fn all_weights(model: &Model<'_>) -> Vec<f32> {
        let mut out = Vec::new();
        for i in 0..model.arch().couplings {
            if model.arch().glow {
                for t in model.glow_step(i).unwrap().in_blob_order() {
                    out.extend(t.iter());
                }
            }
            for t in model.coupling(i).unwrap().in_blob_order() {
                out.extend(t.iter());
            }
        }
        out
    }

    #[test]
    fn glow_blob_sizes_and_header() {
        // MNIST_GLOW: level 0 (16 steps on 4x14x14), level 1 (16 steps on 8x7x7).
        // No coupling `scale` tensors (version 3).
        assert_eq!(MNIST_GLOW.param_count(), 304_224);
        assert_eq!(header_len(&MNIST_GLOW), 72);
        // Glow tensors per step: 2C + 2C^2 + 1 f32s (C = 4: 41, C = 8: 145).
        let glow = 16 * (2 * 4 + 2 * 16 + 1) + 16 * (2 * 8 + 2 * 64 + 1);
        let coupling = MNIST_GLOW.param_count() - glow;
        assert_eq!(
            blob_len(&MNIST_GLOW, DType::F32),
            72 + 4 * MNIST_GLOW.param_count() + 4
        );
        assert_eq!(
            blob_len(&MNIST_GLOW, DType::F16),
            72 + 4 * glow + 2 * coupling + 4
        );
        std::println!(
            "MNIST_GLOW blob: f32 {} bytes, f16 {} bytes; COLOR_GLOW: f32 {}, f16 {}",
            blob_len(&MNIST_GLOW, DType::F32),
            blob_len(&MNIST_GLOW, DType::F16),
            blob_len(&COLOR_GLOW, DType::F32),
            blob_len(&COLOR_GLOW, DType::F16)
        );
        let b = valid_glow(DType::F16);
        assert_eq!(b[8..12], [3, 0, 2, 0]); // version 3, f16
        assert_eq!(b[16..20], [2, 0, 2, 1]); // channels 2, levels 2, flags: Glow
        assert_eq!(b[30..32], [0, 0]);
        assert_eq!(b[40..44], [0, 3, 1, 2]);
        // Levels without Glow: flags 0.
        let multi = blob(
            &Arch {
                glow: false,
                ..glow_small()
            },
            DType::F32,
            &random_params(
                &Arch {
                    glow: false,
                    ..glow_small()
                },
                1,
                1.0,
            ),
        );
        assert_eq!(multi[8..10], [2, 0]);
        assert_eq!(multi[18..20], [2, 0]);
        // Glow with one level is version 3 too.
        let one = Arch {
            levels: 1,
            couplings: 2,
            ..glow_small()
        };
        let b1 = blob(&one, DType::F32, &random_params(&one, 1, 1.0));
        assert_eq!((b1[8], b1[18], b1[19]), (3, 1, 1));
        assert_eq!(blob_version(&one), VERSION_3);
        assert_eq!(blob_version(&glow_small()), VERSION_3);
        assert_eq!(
            blob_version(&Arch {
                glow: false,
                ..glow_small()
            }),
            VERSION_2
        );
        assert_eq!(blob_version(&MNIST), VERSION);
    }

    /// Glow blobs round-trip: f32 bit for bit; f16 gives `round_to_f16_for`, which keeps the
    /// Glow tensors (stored as f32) exact and rounds the coupling tensors.
    #[test]
    fn glow_round_trips_f32_and_f16() {
        let arch = glow_small();
        let mut params = random_params(&arch, 21, 1.0);
        let b = blob(&arch, DType::F32, &params);
        let model = Model::from_blob(&b).unwrap();
        assert_same_arch(model.arch(), &arch);
        let got = all_weights(&model);
        assert!(got
            .iter()
            .zip(&params)
            .all(|(a, e)| a.to_bits() == e.to_bits()));
        assert_eq!(got.len(), params.len());
        let b16 = blob(&arch, DType::F16, &params);
        let m16 = Model::from_blob(&b16).unwrap();
        let g = m16.glow_step(2).unwrap();
        // Step 2 is on level 1 (4 channels): W is 4x4, stored as f32.
        assert_eq!(
            (g.logs.len(), g.w.len(), g.w_inv.len(), g.logdet.len()),
            (4, 16, 16, 1)
        );
        let off = arch.coupling_offset(2) + 8;
        let w: Vec<f32> = g.w.iter().collect();
        assert!(w
            .iter()
            .zip(&params[off..off + 16])
            .all(|(a, e)| a.to_bits() == e.to_bits()));
        let unrounded = params.clone();
        round_to_f16_for(&arch, &mut params).unwrap();
        let got16 = all_weights(&m16);
        assert!(got16
            .iter()
            .zip(&params)
            .all(|(a, e)| a.to_bits() == e.to_bits()));
        // Some coupling weight changed, no Glow weight did.
        assert!(params.iter().zip(&unrounded).any(|(a, e)| a != e));
        for (k, (a, e)) in params.iter().zip(&unrounded).enumerate() {
            if locate(&arch, DType::F16, k).2.is_glow() {
                assert_eq!(a.to_bits(), e.to_bits());
            }
        }
        // The old function agrees with the new on seed architectures.
        let mut p = random_params(&small(), 4, 1.0);
        let mut q = p.clone();
        round_to_f16(&mut p);
        round_to_f16_for(&small(), &mut q).unwrap();
        assert_eq!(p, q);
        assert!(round_to_f16_for(&arch, &mut q).is_err());
        // Accessors: out of range, and no Glow tensors in a RealNVP model.
        assert_eq!(
            model.glow_step(4).unwrap_err(),
            Error::InvalidArgument("coupling index out of range")
        );
        assert!(model.coupling(4).is_err());
        let seed = valid(DType::F32);
        assert_eq!(
            Model::from_blob(&seed).unwrap().glow_step(0).unwrap_err(),
            Error::InvalidArgument("the architecture has no Glow steps")
        );
    }

    /// A version 2 Glow blob (what earlier kernels wrote: an unused `scale` tensor per
    /// coupling) still loads, with exactly the weights and results of the version 3 blob of
    /// the same parameters; its own corruptions are still caught.
    #[test]
    fn version_2_glow_blobs_still_load() {
        let arch = glow_small();
        let params = random_params(&arch, 31, 1.0);
        for dtype in [DType::F32, DType::F16] {
            let old = spec_blob_as(&arch, dtype, &params, true);
            let new = blob(&arch, dtype, &params);
            assert_eq!(new, spec_blob(&arch, dtype, &params));
            // The only difference in length: the scale tensors, each padded to 4 bytes.
            assert_eq!(old.len() - new.len(), {
                let size = dtype.size();
                (0..4)
                    .map(|i| (arch.step_arch(i).changed(arch.masks[i]) * size).div_ceil(4) * 4)
                    .sum::<usize>()
            });
            let (a, b) = (
                Model::from_blob(&old).unwrap(),
                Model::from_blob(&new).unwrap(),
            );
            assert_eq!((a.version(), b.version()), (VERSION_2, VERSION_3));
            assert_same_arch(a.arch(), &arch);
            let (wa, wb) = (all_weights(&a), all_weights(&b));
            assert_eq!(wa.len(), arch.param_count());
            assert!(wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert_eq!(a.coupling(0).unwrap().scale.len(), 0);
            let mut scratch = std::vec![0f32; scratch_len(&arch)];
            let d = arch.dim();
            let (mut pa, mut va, mut pb, mut vb) = (
                std::vec![0u8; d],
                std::vec![0f32; d],
                std::vec![0u8; d],
                std::vec![0f32; d],
            );
            sample(&a, 3, 0.9, &mut scratch, &mut pa, &mut va).unwrap();
            sample(&b, 3, 0.9, &mut scratch, &mut pb, &mut vb).unwrap();
            assert_eq!(
                va.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                vb.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            // Its checks: truncation, a changed byte, a wrong parameter count.
            assert!(matches!(
                err(&old[..old.len() - 1]),
                Error::Truncated { .. }
            ));
            let mut m = old.clone();
            let last = m.len() - 5;
            m[last] ^= 1;
            assert!(matches!(err(&m), Error::ChecksumMismatch { .. }));
            let mut m = old.clone();
            set_u32(&mut m, 36, arch.param_count() as u32);
            fix_crc(&mut m);
            assert!(matches!(err(&m), Error::BadHeader(s) if s.contains("parameter count")));
        }
        // The seed's models and multi-level RealNVPs keep their versions.
        assert_eq!(
            Model::from_blob(&valid(DType::F32)).unwrap().version(),
            VERSION
        );
    }

    /// Version 2 corruption: bad levels, bad flags, a version 2 header for a version 1
    /// architecture, a relabelled version, truncation, a non-finite Glow weight.
    #[test]
    fn glow_blob_corruptions_are_rejected() {
        let b = valid_glow(DType::F32);
        // Levels 0, above MAX_LEVELS, not dividing the couplings (4), or a split of an odd
        // channel count (levels 3 would need 3 divisions of 4 couplings: also Levels).
        for levels in [0u8, 3, 9, 0xFF] {
            let mut m = b.clone();
            m[18] = levels;
            assert_eq!(
                err(&m),
                Error::InvalidArch(ArchField::Levels),
                "levels {levels}"
            );
        }
        // Four levels: 4 couplings divide, but 2x4x4 cannot be halved 3 times more.
        let mut m = b.clone();
        m[18] = 4;
        assert_eq!(err(&m), Error::InvalidArch(ArchField::Size));
        for flags in [2u8, 3, 0x80, 0xFF] {
            let mut m = b.clone();
            m[19] = flags;
            assert_eq!(
                err(&m),
                Error::BadHeader(
                    "unknown flag bits in byte 19 (versions 2 and 3 define only bit 0, Glow)"
                ),
                "flags {flags:#x}"
            );
        }
        let mut m = b.clone();
        m[30] = 1;
        assert_eq!(err(&m), Error::BadHeader("reserved bytes 30-31 are not 0"));
        // Levels 1, no Glow, under version 2: must be written as version 1.
        let mut m = valid(DType::F32);
        m[8] = 2;
        m[18] = 1;
        assert_eq!(
            err(&m),
            Error::BadHeader("version 2 blob with 1 level and no Glow flag (must be version 1)")
        );
        // Glow flag cleared: version 3 is only for Glow models.
        let mut m = b.clone();
        m[19] = 0;
        assert_eq!(
            err(&m),
            Error::BadHeader("version 3 blob without the Glow flag (must be version 1 or 2)")
        );
        // Relabelled version 2 (the older Glow encoding): its parameter count includes the
        // `scale` tensors, so this header's does not match.
        let mut m = b.clone();
        m[8] = 2;
        assert!(matches!(err(&m), Error::BadHeader(s) if s.contains("parameter count")));
        // A version 3 blob relabelled 1: bytes 18-19 are reserved there.
        let mut m = b.clone();
        m[8] = 1;
        assert_eq!(
            err(&m),
            Error::BadHeader("reserved bytes 18-19 or 30-31 are not 0")
        );
        // Every strict prefix is a truncation.
        for dtype in [DType::F32, DType::F16] {
            let b = valid_glow(dtype);
            for cut in (0..b.len()).filter(|&c| !cfg!(miri) || c < 64 || c % 31 == 0) {
                assert!(
                    matches!(err(&b[..cut]), Error::Truncated { got, .. } if got == cut),
                    "cut {cut}"
                );
            }
        }
        // A non-finite weight in each Glow tensor kind and in a coupling tensor, f32 and f16
        // blobs (Glow tensors are f32 in both).
        let arch = glow_small();
        for dtype in [DType::F32, DType::F16] {
            let b = valid_glow(dtype);
            let targets = [
                0,                                // step 0 actnorm logs
                3,                                // step 0 actnorm bias
                5,                                // step 0 W
                arch.coupling_offset(2) + 8 + 16, // step 2 W^-1
                arch.coupling_offset(3) + 40,     // step 3 log-det
                arch.coupling_offset(1) + 20,     // step 1 conv 0 weight
                arch.param_count() - 1,           // last conv bias
            ];
            for index in targets {
                let (at, step, kind, size) = locate(&arch, dtype, index);
                let mut m = b.clone();
                if size == 4 {
                    m[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
                } else {
                    set_u16(&mut m, at, 0x7E00);
                }
                fix_crc(&mut m);
                assert_eq!(
                    err(&m),
                    Error::NonFiniteGlowWeight { step, kind, index },
                    "{dtype:?} index {index}"
                );
                assert!(err(&m)
                    .to_string()
                    .contains(&std::format!("step {step} {kind}")));
            }
            assert_eq!(locate(&arch, dtype, 5).2, TensorKind::InvConvWeight);
            assert_eq!(
                locate(&arch, dtype, arch.coupling_offset(3) + 40).2,
                TensorKind::InvConvLogDet
            );
        }
        // The writer: a non-finite Glow weight; a Glow weight beyond f16 range is fine in an
        // f16 blob (stored as f32), a coupling weight is not.
        let mut p = random_params(&arch, 8, 1.0);
        let mut out = std::vec![0u8; blob_len(&arch, DType::F16)];
        p[6] = 1e6;
        assert!(write_blob(&arch, DType::F16, &p, &mut out).is_ok());
        let model = Model::from_blob(&out).unwrap();
        assert_eq!(model.glow_step(0).unwrap().w.iter().nth(2), Some(1e6));
        p[6] = f32::NAN;
        assert_eq!(
            write_blob(&arch, DType::F16, &p, &mut out),
            Err(Error::NonFiniteGlowWeight {
                step: 0,
                kind: TensorKind::InvConvWeight,
                index: 6
            })
        );
        p[6] = 0.5;
        let k = arch.coupling_offset(1) + 30;
        p[k] = 1e6;
        assert!(matches!(
            write_blob(&arch, DType::F16, &p, &mut out),
            Err(Error::NonFiniteGlowWeight { step: 1, index, .. }) if index == k
        ));
    }

    #[test]
    fn truncated_blobs_are_rejected() {
        let b = valid(DType::F32);
        let len = b.len();
        assert_eq!(err(&[]), Error::Truncated { needed: 40, got: 0 });
        assert_eq!(
            err(&[]).to_string(),
            "weight blob truncated: needs 40 bytes, has 0"
        );
        // Inside the fixed header (magic intact).
        for cut in [1, 7, 8, 12, 21, 39] {
            assert_eq!(
                err(&b[..cut]),
                Error::Truncated {
                    needed: 40,
                    got: cut
                }
            );
        }
        // Inside the mask codes (three couplings: bytes 40..43).
        for cut in [40, 41, 42] {
            assert_eq!(
                err(&b[..cut]),
                Error::Truncated {
                    needed: cut + 1,
                    got: cut
                }
            );
        }
        // In the header padding, at the first tensor, inside the tensors, inside the CRC.
        for cut in [43, 44, 45, len / 2, len - 5, len - 4, len - 1] {
            assert_eq!(
                err(&b[..cut]),
                Error::Truncated {
                    needed: len,
                    got: cut
                }
            );
        }
        // Every strict prefix is a truncation, whatever the cut. (Under Miri, where each
        // parse costs tens of milliseconds: the header, the end, and every 97th cut.)
        let miri_cut = |c: usize| c < 64 || c + 8 > len || c.is_multiple_of(97);
        for cut in (0..len).filter(|&c| !cfg!(miri) || miri_cut(c)) {
            assert!(matches!(err(&b[..cut]), Error::Truncated { got, .. } if got == cut));
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let b = valid(DType::F16);
        for extra in [1, 3, 4, 100] {
            let mut long = b.clone();
            long.resize(b.len() + extra, 0);
            assert_eq!(
                err(&long),
                Error::TrailingBytes {
                    expected: b.len(),
                    got: b.len() + extra
                }
            );
        }
        // Even when the extra bytes carry a correct CRC of everything before them.
        let mut long = b.clone();
        long.extend_from_slice(&crc32(&b).to_le_bytes());
        assert!(matches!(err(&long), Error::TrailingBytes { .. }));
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut b = valid(DType::F32);
        b[0] = b'c';
        assert_eq!(err(&b), Error::BadMagic);
        assert!(err(&b).to_string().contains("magic is not CLAYFLOW"));
        b[0] = b'C';
        b[7] ^= 0x20;
        assert_eq!(err(&b), Error::BadMagic);
        // A short buffer with a wrong magic reports the magic, not the truncation...
        assert_eq!(err(b"NOTAFLOW"), Error::BadMagic);
        assert_eq!(err(&[0u8; 39]), Error::BadMagic);
        // ...but under 8 bytes the magic cannot be judged.
        assert_eq!(err(b"PK\x03\x04"), Error::Truncated { needed: 40, got: 4 });
    }

    #[test]
    fn unsupported_version_is_rejected() {
        let mut b = valid(DType::F32);
        for v in [0u16, 4, 0x0100, 0x0200, 0x0300, u16::MAX] {
            set_u16(&mut b, 8, v);
            assert_eq!(err(&b), Error::UnsupportedVersion(v));
        }
        set_u16(&mut b, 8, 4);
        assert_eq!(
            err(&b).to_string(),
            "weight blob version 4 is not supported (this kernel reads 1, 2 and 3)"
        );
        // A version 1 blob relabelled 2: byte 18 (levels in version 2) is 0.
        set_u16(&mut b, 8, 2);
        assert_eq!(err(&b), Error::InvalidArch(ArchField::Levels));
    }

    #[test]
    fn unknown_dtype_is_rejected() {
        let mut b = valid(DType::F32);
        for code in [0u8, 3, 4, 0x80, 0xFF] {
            b[10] = code;
            assert_eq!(err(&b), Error::UnknownDtype(code));
        }
    }

    #[test]
    fn nonzero_reserved_bytes_are_rejected() {
        let b = valid(DType::F32);
        let mut m = b.clone();
        m[11] = 1;
        assert_eq!(err(&m), Error::BadHeader("reserved byte 11 is not 0"));
        for at in [18, 19, 30, 31] {
            let mut m = b.clone();
            m[at] = 0x80;
            assert_eq!(
                err(&m),
                Error::BadHeader("reserved bytes 18-19 or 30-31 are not 0"),
                "byte {at}"
            );
        }
    }

    #[test]
    fn bad_squeeze_flag_is_rejected() {
        let mut b = valid(DType::F32);
        for flag in [2u8, 0xFF] {
            b[20] = flag;
            assert_eq!(err(&b), Error::BadHeader("squeeze flag is not 0 or 1"));
        }
        assert_eq!(
            err(&b).to_string(),
            "weight blob header invalid: squeeze flag is not 0 or 1"
        );
    }

    #[test]
    fn coupling_count_out_of_range_is_rejected() {
        let mut b = valid(DType::F32);
        for n in [0u8, 33, 0xFF] {
            b[21] = n;
            assert_eq!(err(&b), Error::InvalidArch(ArchField::Couplings));
        }
    }

    #[test]
    fn unknown_mask_code_is_rejected() {
        for at in [40, 41, 42] {
            for code in [4u8, 0xFF] {
                let mut b = valid(DType::F32);
                b[at] = code;
                assert_eq!(err(&b), Error::BadHeader("unknown mask code"));
            }
        }
    }

    #[test]
    fn invalid_arch_fields_are_rejected() {
        let b = valid(DType::F32);
        type Case = (fn(&mut [u8]), ArchField);
        let cases: &[Case] = &[
            (|b| set_u16(b, 16, 0), ArchField::Channels),
            (|b| set_u16(b, 16, 65), ArchField::Channels),
            (|b| set_u16(b, 12, 0), ArchField::Size),
            (|b| set_u16(b, 14, 1025), ArchField::Size),
            // Squeezing needs even sides.
            (
                |b| {
                    b[20] = 1;
                    set_u16(b, 12, 5);
                },
                ArchField::Size,
            ),
            (|b| b[22] = 4, ArchField::Kernel),
            (|b| b[23] = 0, ArchField::Kernel),
            (|b| b[24] = 17, ArchField::Kernel),
            (|b| set_u16(b, 26, 0), ArchField::Hidden),
            (|b| set_u16(b, 28, 4097), ArchField::Hidden),
            (|b| b[25] = 0, ArchField::Bits),
            (|b| b[25] = 9, ArchField::Bits),
            (|b| set_u32(b, 32, 0.5f32.to_bits()), ArchField::LogitAlpha),
            (|b| set_u32(b, 32, 0.0f32.to_bits()), ArchField::LogitAlpha),
            (
                |b| set_u32(b, 32, (-0.0f32).to_bits()),
                ArchField::LogitAlpha,
            ),
            (
                |b| set_u32(b, 32, f32::NAN.to_bits()),
                ArchField::LogitAlpha,
            ),
            (
                |b| set_u32(b, 32, f32::INFINITY.to_bits()),
                ArchField::LogitAlpha,
            ),
            // A channel mask on a single channel has nothing to split.
            (|b| set_u16(b, 16, 1), ArchField::Mask),
            // 64 x 1024 x 1024 pixels is over MAX_DIM.
            (
                |b| {
                    set_u16(b, 16, 64);
                    set_u16(b, 12, 1024);
                    set_u16(b, 14, 1024);
                },
                ArchField::TooLarge,
            ),
            // 4096 x 4096 x 15 x 15 conv weights is over MAX_PARAMS.
            (
                |b| {
                    set_u16(b, 26, 4096);
                    set_u16(b, 28, 4096);
                    b[23] = 15;
                },
                ArchField::TooLarge,
            ),
        ];
        for (i, (mutate, field)) in cases.iter().enumerate() {
            let mut m = b.clone();
            mutate(&mut m);
            assert_eq!(err(&m), Error::InvalidArch(*field), "case {i}");
        }
        let mut m = b.clone();
        m[22] = 4;
        assert_eq!(
            err(&m).to_string(),
            "invalid architecture: kernel sizes must be odd and 1..=15"
        );
    }

    #[test]
    fn wrong_parameter_count_is_rejected() {
        const WRONG: Error =
            Error::BadHeader("parameter count does not match the architecture (wrong shapes)");
        let b = valid(DType::F32);
        let count = small().param_count() as u32;
        // The stated count disagrees with the shapes.
        for stated in [0, count - 1, count + 1, u32::MAX] {
            let mut m = b.clone();
            set_u32(&mut m, 36, stated);
            fix_crc(&mut m);
            assert_eq!(err(&m), WRONG);
        }
        // The shapes change (hidden0 3 -> 4, a valid arch) but the count is the old one.
        let mut m = b.clone();
        set_u16(&mut m, 26, 4);
        fix_crc(&mut m);
        assert_eq!(err(&m), WRONG);
        assert!(err(&m).to_string().contains("wrong shapes"));
        // Shapes and count agree with each other but not with the data: a length error.
        let mut bigger = small();
        bigger.hidden[0] = 4;
        let mut m = b.clone();
        set_u16(&mut m, 26, 4);
        set_u32(&mut m, 36, bigger.param_count() as u32);
        fix_crc(&mut m);
        assert_eq!(
            err(&m),
            Error::Truncated {
                needed: blob_len(&bigger, DType::F32),
                got: b.len()
            }
        );
        let mut smaller = small();
        smaller.hidden[0] = 2;
        let mut m = b.clone();
        set_u16(&mut m, 26, 2);
        set_u32(&mut m, 36, smaller.param_count() as u32);
        fix_crc(&mut m);
        assert_eq!(
            err(&m),
            Error::TrailingBytes {
                expected: blob_len(&smaller, DType::F32),
                got: b.len()
            }
        );
    }

    #[test]
    fn checksum_mismatch_is_rejected() {
        let b = valid(DType::F32);
        let n = b.len() - 4;
        let stored = u32::from_le_bytes(b[n..].try_into().unwrap());
        // One bit of one weight, of the header padding byte, of the stored CRC itself.
        for at in [weight_offset(&small(), DType::F32, 5) + 1, 43, n + 2] {
            let mut m = b.clone();
            m[at] ^= 0x04;
            let stored = u32::from_le_bytes(m[n..].try_into().unwrap());
            assert_eq!(
                err(&m),
                Error::ChecksumMismatch {
                    stored,
                    computed: crc32(&m[..n])
                },
                "byte {at}"
            );
        }
        let mut m = b.clone();
        m[n - 1] ^= 0xFF;
        let e = err(&m);
        assert!(matches!(e, Error::ChecksumMismatch { stored: s, .. } if s == stored));
        assert!(e.to_string().starts_with("weight blob checksum mismatch"));
        // A padding byte inside the f16 tensors (the 1-element scale tensor at 44..48).
        let b16 = valid(DType::F16);
        let mut m = b16.clone();
        m[47] = 1;
        assert!(matches!(err(&m), Error::ChecksumMismatch { .. }));
    }

    #[test]
    fn non_finite_weights_are_rejected_f32() {
        let arch = small();
        let last = arch.param_count() - 1;
        let mid = arch.coupling_offset(1) + 10;
        let b = valid(DType::F32);
        // Under Miri (slow CRC over the blob per case) one position and two values suffice.
        let (indices, bads): (&[usize], &[f32]) = if cfg!(miri) {
            (&[mid], &[f32::NAN, f32::NEG_INFINITY])
        } else {
            (
                &[0, mid, last],
                &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY],
            )
        };
        for &index in indices {
            for &bad in bads {
                let mut m = b.clone();
                let at = weight_offset(&arch, DType::F32, index);
                m[at..at + 4].copy_from_slice(&bad.to_le_bytes());
                assert!(matches!(err(&m), Error::ChecksumMismatch { .. }));
                fix_crc(&mut m);
                let tensor = tensor_of(&arch, index);
                assert_eq!(
                    err(&m),
                    Error::NonFiniteWeight { tensor, index },
                    "{bad} at {index}"
                );
            }
        }
        let mut m = b.clone();
        let at = weight_offset(&arch, DType::F32, mid);
        m[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        fix_crc(&mut m);
        // `mid` is element 10 of coupling 1; the small arch's coupling 1 (checker-odd, 3
        // channels, scale of 3) puts it in conv 0's weight, tensor 7 + 1 = 8.
        assert_eq!(tensor_of(&arch, mid), 8);
        assert_eq!(
            err(&m).to_string(),
            std::format!(
                "weight {mid} is not finite (NaN, infinite, or beyond f16 range): \
                 tensor 8, coupling 1 conv 0 weight"
            )
        );
    }

    #[test]
    fn non_finite_weights_are_rejected_f16() {
        let arch = small();
        let last = arch.param_count() - 1;
        let mid = arch.coupling_offset(2) + 3;
        let b = valid(DType::F16);
        // quiet NaN, signalling NaN, +inf, -inf
        for index in [0, mid, last] {
            for bits in [0x7E00u16, 0x7C01, 0x7C00, 0xFC00] {
                let mut m = b.clone();
                let at = weight_offset(&arch, DType::F16, index);
                set_u16(&mut m, at, bits);
                fix_crc(&mut m);
                let tensor = tensor_of(&arch, index);
                assert_eq!(
                    err(&m),
                    Error::NonFiniteWeight { tensor, index },
                    "{bits:#x} at {index}"
                );
            }
        }
        // The largest finite f16 is fine.
        let mut m = b.clone();
        set_u16(&mut m, weight_offset(&arch, DType::F16, mid), 0x7BFF);
        fix_crc(&mut m);
        let model = Model::from_blob(&m).unwrap();
        assert_eq!(weights(&model)[mid], 65_504.0);
    }

    #[test]
    fn write_blob_errors() {
        let arch = small();
        let n = arch.param_count();
        let params = random_params(&arch, 9, 1.0);
        let len = blob_len(&arch, DType::F32);
        let mut out = std::vec![0u8; len];
        for wrong in [0, n - 1, n + 1] {
            let p = std::vec![0.0f32; wrong];
            assert_eq!(
                write_blob(&arch, DType::F32, &p, &mut out),
                Err(Error::BufferSize {
                    buffer: Buffer::Weights,
                    needed: n,
                    got: wrong
                })
            );
        }
        for dtype in [DType::F32, DType::F16] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut p = params.clone();
                p[n / 2] = bad;
                assert_eq!(
                    write_blob(&arch, dtype, &p, &mut out),
                    Err(Error::NonFiniteWeight {
                        tensor: tensor_of(&arch, n / 2),
                        index: n / 2
                    })
                );
            }
        }
        // Finite in f32 but beyond f16's range (65504; 65520 rounds up to infinity).
        for big in [1e6f32, -1e6, 65_520.0] {
            let mut p = params.clone();
            p[3] = big;
            assert_eq!(
                write_blob(&arch, DType::F16, &p, &mut out),
                Err(Error::NonFiniteWeight {
                    tensor: tensor_of(&arch, 3),
                    index: 3
                })
            );
            assert_eq!(write_blob(&arch, DType::F32, &p, &mut out), Ok(len));
        }
        // Output buffer too small, by one byte or entirely.
        for short in [0, 40, len - 1] {
            assert_eq!(
                write_blob(&arch, DType::F32, &params, &mut out[..short]),
                Err(Error::BufferSize {
                    buffer: Buffer::Blob,
                    needed: len,
                    got: short
                })
            );
        }
        // An invalid architecture.
        let mut bad = arch;
        bad.kernels[0] = 2;
        assert_eq!(
            write_blob(&bad, DType::F32, &params, &mut out),
            Err(Error::InvalidArch(ArchField::Kernel))
        );
        // A larger buffer: exactly blob_len bytes are written, the rest is untouched.
        let mut roomy = std::vec![0xAAu8; len + 10];
        assert_eq!(write_blob(&arch, DType::F32, &params, &mut roomy), Ok(len));
        assert!(roomy[len..].iter().all(|&v| v == 0xAA));
        assert!(Model::from_blob(&roomy[..len]).is_ok());
        assert!(matches!(
            Model::from_blob(&roomy),
            Err(Error::TrailingBytes { .. })
        ));
    }

    /// CRC-32 detects every single-byte error, so no one-byte change of a valid blob parses.
    #[test]
    fn every_single_byte_change_is_rejected() {
        for dtype in [DType::F32, DType::F16] {
            let b = valid(dtype);
            let mut m = b.clone();
            // Under Miri (a parse with its CRC takes seconds there): the header and the CRC,
            // each byte flipped once; the header is where parsing branches, a tensor byte
            // only reaches the CRC comparison (which the CRC bytes exercise).
            let positions: Vec<usize> = (0..b.len())
                .filter(|&at| !cfg!(miri) || at < 48 || at + 4 >= b.len())
                .collect();
            let flips: &[u8] = if cfg!(miri) {
                &[0xFF]
            } else {
                &[0x01, 0x80, 0xFF]
            };
            for at in positions {
                for &x in flips {
                    m[at] ^= x;
                    assert!(Model::from_blob(&m).is_err(), "byte {at} ^ {x:#x}");
                    m[at] ^= x;
                }
            }
        }
    }

    /// Parses `bytes`; when that succeeds, samples from the model (unless it is too big to
    /// be quick), which must not panic either.
    fn parse_and_sample(bytes: &[u8]) -> Result<(), Error> {
        let model = Model::from_blob(bytes)?;
        let arch = *model.arch();
        let work = arch.param_count().saturating_mul(arch.plane());
        if scratch_len(&arch) <= 1 << 20 && work <= 1 << 24 {
            let mut scratch = std::vec![0f32; scratch_len(&arch)];
            let mut pixels = std::vec![0u8; arch.dim()];
            let mut values = std::vec![0f32; arch.dim()];
            let r = sample(&model, 1, 1.0, &mut scratch, &mut pixels, &mut values);
            let max = ((1u32 << arch.bits) - 1) as u8;
            if r.is_ok() {
                assert!(
                    pixels.iter().all(|&p| p <= max),
                    "pixel above the bit depth"
                );
            }
        }
        Ok(())
    }

    /// Header fields for the structured fuzz: mostly valid small values, sometimes invalid.
    #[derive(Clone, Debug)]
    struct Fields {
        dtype: u8,
        channels: u16,
        height: u16,
        width: u16,
        squeeze: u8,
        masks: Vec<u8>,
        kernels: [u8; 3],
        bits: u8,
        hidden: [u16; 2],
        alpha: f32,
        count_delta: i8,
        nan_at: Option<prop::sample::Index>,
        seed: u64,
    }

    fn mostly<T: Clone + core::fmt::Debug + 'static>(
        good: impl Strategy<Value = T> + 'static,
        bad: std::vec::Vec<T>,
    ) -> BoxedStrategy<T> {
        prop_oneof![40 => good, 1 => prop::sample::select(bad)].boxed()
    }

    fn fields() -> impl Strategy<Value = Fields> {
        let kernel = || {
            mostly(
                prop::sample::select(std::vec![1u8, 3, 5]),
                std::vec![0, 2, 16, 255],
            )
        };
        let hidden = || mostly(1u16..=6, std::vec![0, 4097, u16::MAX]);
        let side = || {
            mostly(
                prop::sample::select(std::vec![2u16, 4, 6, 8, 1, 3]),
                std::vec![0, 1025, u16::MAX],
            )
        };
        (
            (
                mostly(1u8..=2, std::vec![0, 3, 255]),
                mostly(1u16..=4, std::vec![0, 65, u16::MAX]),
                side(),
                side(),
                mostly(0u8..=1, std::vec![2, 255]),
                mostly(
                    prop::collection::vec(mostly(0u8..=3, std::vec![4, 255]), 1..=4),
                    std::vec![std::vec![], std::vec![0; 33]],
                ),
            ),
            (
                [kernel(), kernel(), kernel()],
                mostly(1u8..=8, std::vec![0, 9, 255]),
                [hidden(), hidden()],
                mostly(
                    prop::sample::select(std::vec![0.05f32, 1e-3, 0.25, 0.4999]),
                    std::vec![0.0, -0.0, 0.5, -0.1, f32::NAN, f32::INFINITY],
                ),
                mostly(Just(0i8), std::vec![-1, 1]),
                prop::option::weighted(0.1, any::<prop::sample::Index>()),
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (dtype, channels, height, width, squeeze, masks),
                    (kernels, bits, hidden, alpha, count_delta, nan_at, seed),
                )| Fields {
                    dtype,
                    channels,
                    height,
                    width,
                    squeeze,
                    masks,
                    kernels,
                    bits,
                    hidden,
                    alpha,
                    count_delta,
                    nan_at,
                    seed,
                },
            )
    }

    /// Encodes `f` by the spec. Returns the bytes and whether the kernel must accept them.
    fn encode(f: &Fields) -> (Vec<u8>, bool) {
        let mut b = Vec::new();
        b.extend_from_slice(b"CLAYFLOW");
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&[f.dtype, 0]);
        for v in [f.height, f.width, f.channels, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&[f.squeeze, f.masks.len() as u8]);
        b.extend_from_slice(&[f.kernels[0], f.kernels[1], f.kernels[2], f.bits]);
        for v in [f.hidden[0], f.hidden[1], 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&f.alpha.to_le_bytes());
        let count_at = b.len();
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&f.masks);
        b.resize(b.len().div_ceil(4) * 4, 0);
        let dtype = DType::from_code(f.dtype);
        let masks: Option<Vec<Mask>> = f.masks.iter().map(|&c| Mask::from_code(c)).collect();
        let arch = match (masks, f.squeeze) {
            (Some(ms), 0 | 1) if (1..=MAX_COUPLINGS).contains(&ms.len()) => {
                let mut masks = [Mask::ChannelEven; MAX_COUPLINGS];
                masks[..ms.len()].copy_from_slice(&ms);
                Some(Arch {
                    channels: usize::from(f.channels),
                    height: usize::from(f.height),
                    width: usize::from(f.width),
                    squeeze: f.squeeze == 1,
                    levels: 1,
                    glow: false,
                    couplings: ms.len(),
                    masks,
                    kernels: f.kernels.map(usize::from),
                    bits: u32::from(f.bits),
                    hidden: f.hidden.map(usize::from),
                    logit_alpha: f.alpha,
                })
            }
            _ => None,
        };
        let mut accept = dtype.is_some() && f.count_delta == 0 && f.nan_at.is_none();
        match (arch.filter(|a| a.validate().is_ok()), dtype) {
            (Some(arch), Some(dtype)) => {
                let n = arch.param_count();
                let count = (n as i64 + i64::from(f.count_delta)) as u32;
                b[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
                let mut params = random_params(&arch, f.seed, 1.0);
                if let Some(i) = &f.nan_at {
                    params[i.index(n)] = f32::NAN;
                }
                let mut rest = &params[..];
                for &m in arch.active_masks() {
                    for kind in COUPLING_TENSORS {
                        let (t, tail) = rest.split_at(arch.tensor_len(m, kind));
                        rest = tail;
                        for &v in t {
                            match dtype {
                                DType::F32 => b.extend_from_slice(&v.to_le_bytes()),
                                DType::F16 => {
                                    b.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())
                                }
                            }
                        }
                        b.resize(b.len().div_ceil(4) * 4, 0);
                    }
                }
            }
            _ => {
                // Some invalid field: the body hardly matters, give it a little of everything.
                accept = false;
                b.extend((0..(f.seed % 300) as usize).map(|i| (i * 31) as u8));
            }
        }
        let crc = crc32(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        (b, accept)
    }

    proptest! {
        // Under Miri each case is interpreted (~1000x slower): a handful of cases still
        // walks every parser branch the generators reach, looking for UB and overflow.
        #![proptest_config(ProptestConfig {
            cases: if cfg!(miri) { 8 } else { 256 },
            failure_persistence: if cfg!(miri) { None } else { ProptestConfig::default().failure_persistence },
            ..ProptestConfig::default()
        })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse_and_sample(&bytes);
        }

        #[test]
        fn valid_header_with_arbitrary_tail_never_panics(
            tail in prop::collection::vec(any::<u8>(), 0..600),
            couplings in 0u8..40,
        ) {
            let mut b = valid(DType::F32)[..40].to_vec();
            b[21] = couplings;
            b.extend_from_slice(&tail);
            // The random tail cannot carry a matching CRC (odds 2^-32), so this never parses.
            prop_assert!(parse_and_sample(&b).is_err());
        }

        /// Single-byte mutations and truncations of a valid blob; with `fix` the CRC is
        /// recomputed so that the mutation reaches the later checks (or parses).
        #[test]
        fn mutated_blobs_never_panic(
            f16 in any::<bool>(),
            glow in any::<bool>(),
            at in any::<prop::sample::Index>(),
            value in any::<u8>(),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
            fix in any::<bool>(),
        ) {
            let dtype = if f16 { DType::F16 } else { DType::F32 };
            let mut b = if glow { valid_glow(dtype) } else { valid(dtype) };
            let original = b.clone();
            let i = at.index(b.len() - 4);
            b[i] = value;
            if fix {
                fix_crc(&mut b);
            }
            let b = if truncate { &b[..cut.index(b.len())] } else { &b[..] };
            let r = parse_and_sample(b);
            if truncate {
                prop_assert!(r.is_err(), "a strict prefix parsed");
            } else if b == &original[..] {
                prop_assert_eq!(r, Ok(()));
            } else if !fix {
                prop_assert!(r.is_err());
            }
        }

        /// Headers built by the spec from mostly valid, sometimes invalid fields: the kernel
        /// accepts exactly the valid ones, with the stated architecture, and never panics.
        #[test]
        fn structured_headers_are_judged_like_the_spec(f in fields()) {
            let (b, accept) = encode(&f);
            match Model::from_blob(&b) {
                Ok(model) => {
                    prop_assert!(accept, "accepted an invalid blob: {:?}", f);
                    prop_assert_eq!(model.arch().couplings, f.masks.len());
                    prop_assert_eq!(model.arch().hidden, f.hidden.map(usize::from));
                    prop_assert_eq!(parse_and_sample(&b), Ok(()));
                }
                Err(e) => prop_assert!(!accept, "rejected a valid blob: {:?} {:?}", e, f),
            }
        }
    }
}
