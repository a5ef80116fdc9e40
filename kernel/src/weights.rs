//! The weight blob: one versioned little-endian binary holding the architecture and every
//! parameter, f32 or f16, checked by CRC-32. `FORMAT.md` beside this file specifies it.
//!
//! Parsing is zero-copy: a [`Model`] borrows the blob and decodes weights as it reads them.

use crate::arch::{Arch, Mask, TensorKind, COUPLING_TENSORS, MAX_COUPLINGS};
use crate::error::{Buffer, Error};

/// The eight bytes every blob starts with.
pub const MAGIC: [u8; 8] = *b"CLAYFLOW";
/// The format version this kernel reads and writes.
pub const VERSION: u16 = 1;
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
}

const fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// Bytes of the header (fixed part + mask codes padded to 4): the offset of the first tensor.
pub const fn header_len(arch: &Arch) -> usize {
    align4(FIXED_HEADER + arch.couplings)
}

/// Bytes one tensor of `len` elements occupies, padded to a multiple of 4.
const fn tensor_bytes(len: usize, dtype: DType) -> usize {
    align4(len.saturating_mul(dtype.size()))
}

/// Bytes of the tensor section.
const fn tensors_len(arch: &Arch, dtype: DType) -> usize {
    let mut n = 0usize;
    let mut i = 0;
    while i < arch.couplings && i < MAX_COUPLINGS {
        let mut t = 0;
        while t < COUPLING_TENSORS.len() {
            let len = arch.tensor_len(arch.masks[i], COUPLING_TENSORS[t]);
            n = n.saturating_add(tensor_bytes(len, dtype));
            t += 1;
        }
        i += 1;
    }
    n
}

/// Total bytes of the blob for `arch` stored as `dtype` (header + tensors + 4-byte CRC).
pub const fn blob_len(arch: &Arch, dtype: DType) -> usize {
    header_len(arch)
        .saturating_add(tensors_len(arch, dtype))
        .saturating_add(4)
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32 (IEEE 802.3, the one of zlib, PNG and Python's `zlib.crc32`).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
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
        let whole = bytes.len() - bytes.len() % dtype.size();
        Tensor {
            dtype,
            bytes: bytes.get(..whole).unwrap_or(&[]),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
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

    /// Elements `start..start + len` as a tensor, or `None` when out of range.
    pub fn slice(&self, start: usize, len: usize) -> Option<Tensor<'a>> {
        let s = self.dtype.size();
        let a = start.checked_mul(s)?;
        let b = a.checked_add(len.checked_mul(s)?)?;
        Some(Tensor {
            dtype: self.dtype,
            bytes: self.bytes.get(a..b)?,
        })
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
        let n = self.bytes.len() / self.dtype.size();
        (n, Some(n))
    }
}

impl ExactSizeIterator for TensorIter<'_> {}

/// The seven tensors of one coupling.
#[derive(Clone, Copy, Debug)]
pub struct CouplingWeights<'a> {
    /// The coupling's mask.
    pub mask: Mask,
    /// Per-changed-channel scale of `tanh(s_raw)`.
    pub scale: Tensor<'a>,
    /// Conv weights `[cout][cin][k][k]`, convs 0, 1, 2.
    pub conv_w: [Tensor<'a>; 3],
    /// Conv biases `[cout]`, convs 0, 1, 2.
    pub conv_b: [Tensor<'a>; 3],
}

/// A parsed, checked model: the architecture plus a borrowed view of the weights.
#[derive(Clone, Copy, Debug)]
pub struct Model<'a> {
    arch: Arch,
    dtype: DType,
    tensors: &'a [u8],
}

fn read_u16(b: &[u8], at: usize) -> Result<u16, Error> {
    let bytes = b
        .get(at..at + 2)
        .and_then(|s| s.first_chunk::<2>())
        .ok_or(Error::Truncated {
            needed: at + 2,
            got: b.len(),
        })?;
    Ok(u16::from_le_bytes(*bytes))
}

fn read_u32(b: &[u8], at: usize) -> Result<u32, Error> {
    let bytes = b
        .get(at..at + 4)
        .and_then(|s| s.first_chunk::<4>())
        .ok_or(Error::Truncated {
            needed: at + 4,
            got: b.len(),
        })?;
    Ok(u32::from_le_bytes(*bytes))
}

fn read_u8(b: &[u8], at: usize) -> Result<u8, Error> {
    b.get(at).copied().ok_or(Error::Truncated {
        needed: at + 1,
        got: b.len(),
    })
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
        if version != VERSION {
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
        for (i, m) in masks.iter_mut().take(couplings).enumerate() {
            let code = read_u8(blob, FIXED_HEADER + i)?;
            *m = Mask::from_code(code).ok_or(Error::BadHeader("unknown mask code"))?;
        }
        let arch = Arch {
            channels: usize::from(read_u16(blob, 16)?),
            height: usize::from(read_u16(blob, 12)?),
            width: usize::from(read_u16(blob, 14)?),
            squeeze,
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
        if read_u16(blob, 18)? != 0 || read_u16(blob, 30)? != 0 {
            return Err(Error::BadHeader("reserved bytes 18-19 or 30-31 are not 0"));
        }
        arch.validate()?;
        let stated_params = read_u32(blob, 36)? as usize;
        if stated_params != arch.param_count() {
            return Err(Error::BadHeader(
                "parameter count does not match the architecture (wrong shapes)",
            ));
        }
        let expected = blob_len(&arch, dtype);
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
        let body = blob.get(..expected - 4).ok_or(Error::Truncated {
            needed: expected,
            got: blob.len(),
        })?;
        let stored = read_u32(blob, expected - 4)?;
        let computed = crc32(body);
        if stored != computed {
            return Err(Error::ChecksumMismatch { stored, computed });
        }
        let tensors = body.get(header_len(&arch)..).unwrap_or(&[]);
        let model = Model {
            arch,
            dtype,
            tensors,
        };
        // Every weight finite: then no weight can turn a finite input into NaN by itself.
        let mut index = 0usize;
        for i in 0..couplings {
            let c = model.coupling(i)?;
            let all = [
                c.scale,
                c.conv_w[0],
                c.conv_b[0],
                c.conv_w[1],
                c.conv_b[1],
                c.conv_w[2],
                c.conv_b[2],
            ];
            for t in all {
                for v in t.iter() {
                    if !v.is_finite() {
                        return Err(Error::NonFiniteWeight { index });
                    }
                    index += 1;
                }
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

    /// The weights of coupling `i` (0 is nearest the image).
    pub fn coupling(&self, i: usize) -> Result<CouplingWeights<'a>, Error> {
        let mask = *self
            .arch
            .active_masks()
            .get(i)
            .ok_or(Error::InvalidArgument("coupling index out of range"))?;
        let mut offset = 0usize;
        for j in 0..i {
            let m = self.arch.masks.get(j).copied().unwrap_or(mask);
            for kind in COUPLING_TENSORS {
                offset += tensor_bytes(self.arch.tensor_len(m, kind), self.dtype);
            }
        }
        let mut take = |kind: TensorKind| -> Result<Tensor<'a>, Error> {
            let len = self.arch.tensor_len(mask, kind);
            let bytes = self
                .tensors
                .get(offset..offset + len * self.dtype.size())
                .ok_or(Error::Truncated {
                    needed: offset + len * self.dtype.size(),
                    got: self.tensors.len(),
                })?;
            offset += tensor_bytes(len, self.dtype);
            Ok(Tensor {
                dtype: self.dtype,
                bytes,
            })
        };
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

fn put(out: &mut [u8], at: usize, bytes: &[u8]) -> Result<(), Error> {
    let len = out.len();
    out.get_mut(at..at + bytes.len())
        .ok_or(Error::BufferSize {
            buffer: Buffer::Blob,
            needed: at + bytes.len(),
            got: len,
        })?
        .copy_from_slice(bytes);
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
    put(out, 0, &MAGIC)?;
    put(out, 8, &VERSION.to_le_bytes())?;
    put(out, 10, &[dtype as u8, 0])?;
    put(out, 12, &narrow(arch.height)?.to_le_bytes())?;
    put(out, 14, &narrow(arch.width)?.to_le_bytes())?;
    put(out, 16, &narrow(arch.channels)?.to_le_bytes())?;
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
    for (i, m) in arch.active_masks().iter().enumerate() {
        put(out, FIXED_HEADER + i, &[*m as u8])?;
    }
    let mut at = header_len(arch);
    let mut index = 0usize;
    let mut rest = params;
    for &m in arch.active_masks() {
        for kind in COUPLING_TENSORS {
            let len = arch.tensor_len(m, kind);
            let (tensor, tail) = rest.split_at_checked(len).ok_or(Error::BufferSize {
                buffer: Buffer::Weights,
                needed: arch.param_count(),
                got: params.len(),
            })?;
            rest = tail;
            for (k, &v) in tensor.iter().enumerate() {
                let bad = Error::NonFiniteWeight { index: index + k };
                if !v.is_finite() {
                    return Err(bad);
                }
                match dtype {
                    DType::F32 => put(out, at + 4 * k, &v.to_le_bytes())?,
                    DType::F16 => {
                        let h = half::f16::from_f32(v);
                        if !h.is_finite() {
                            return Err(bad);
                        }
                        put(out, at + 2 * k, &h.to_le_bytes())?;
                    }
                }
            }
            index += len;
            at += tensor_bytes(len, dtype);
        }
    }
    let body_len = total - 4;
    let crc = crc32(out.get(..body_len).unwrap_or(&[]));
    put(out, body_len, &crc.to_le_bytes())?;
    Ok(total)
}

/// Rounds every parameter through f16 and back, so a caller can see exactly the values an
/// f16 blob will hold.
pub fn round_to_f16(params: &mut [f32]) {
    for v in params {
        *v = half::f16::from_f32(*v).to_f32();
    }
}
