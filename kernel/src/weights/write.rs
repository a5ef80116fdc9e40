//! Writing a blob ([`write_blob`]) and rounding parameters to the values an f16 blob holds.

use crate::arch::{step_tensors, Arch, Mask, TensorKind};
use crate::error::{Buffer, Error};

use super::format::{non_finite, tensor_bytes, FIXED_HEADER};
use super::{blob_len, blob_version, crc32, header_len, stored_dtype, DType};
use super::{FLAG_GLOW, FLAG_PRIOR, MAGIC, VERSION, VERSION_3};

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
        let glow = if arch.glow { FLAG_GLOW } else { 0 };
        let prior = if arch.prior { FLAG_PRIOR } else { 0 };
        let flags = glow | prior;
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
    if version == VERSION_3 {
        // Exact: a valid arch's floor is an f16 value.
        let floor = half::f16::from_f32(arch.scale_floor).to_bits();
        put(out, 30, &floor.to_le_bytes())?;
    }
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
    // Every flow step's tensors, then the learned prior's, level by level.
    let steps = arch.active_masks().iter().enumerate().flat_map(|(i, &m)| {
        let view = arch.step_arch(i);
        step_tensors(arch.glow).iter().map(move |&kind| {
            let bad = Bad::Step {
                glow: arch.glow,
                step: i,
            };
            (view.tensor_len(m, kind), kind, bad)
        })
    });
    let priors = (0..arch.levels).flat_map(|l| {
        let view = arch.level(l);
        arch.prior_tensors(l).iter().map(move |&kind| {
            (
                view.tensor_len(Mask::ChannelEven, kind),
                kind,
                Bad::Prior { level: l },
            )
        })
    });
    for (len, kind, who) in steps.chain(priors) {
        let dtype = stored_dtype(kind, dtype);
        let (values, tail) = rest.split_at_checked(len).ok_or(Error::BufferSize {
            buffer: Buffer::Weights,
            needed: arch.param_count(),
            got: params.len(),
        })?;
        rest = tail;
        let dst = region(out, at, len.saturating_mul(dtype.size()))?;
        let bad = |k: usize| who.error(tensor, kind, first.saturating_add(k));
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
    let (body, crc) = out.split_last_chunk_mut::<4>().ok_or(Error::BufferSize {
        buffer: Buffer::Blob,
        needed: total,
        got: 0,
    })?;
    *crc = crc32(body).to_le_bytes();
    Ok(total)
}

/// Whose tensor a non-finite weight is in, for its error.
#[derive(Clone, Copy)]
enum Bad {
    /// A flow step's (Glow and coupling tensors).
    Step { glow: bool, step: usize },
    /// The learned prior's at a level.
    Prior { level: usize },
}

impl Bad {
    fn error(self, tensor: usize, kind: TensorKind, index: usize) -> Error {
        match self {
            Bad::Step { glow, step } => non_finite(glow, tensor, step, kind, index),
            Bad::Prior { level } => Error::NonFinitePriorWeight { level, kind, index },
        }
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
/// (the coupling tensors), leaving the Glow and prior tensors (stored as f32,
/// [`TensorKind::is_f32`]) untouched; so an f16
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
            if !kind.is_f32() {
                round_to_f16(values);
            }
        }
    }
    // What is left are the learned prior's tensors, all stored as f32: untouched.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::Model;
    use super::*;
    use crate::arch::MNIST;
    use crate::error::ArchField;
    use crate::testutil::{blob, random_params, MNIST_OR_MINI};
    use std::vec::Vec;

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
        let multi = multi_small();
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
}
