//! Reading a blob: [`Model::from_blob`] parses and checks it, and the model hands out
//! zero-copy views of its tensors.

use crate::arch::{
    step_tensors, Arch, Mask, TensorKind, GLOW_TENSORS, MAX_COUPLINGS, PRIOR_TENSORS, TOP_TENSORS,
};
use crate::error::Error;

use super::format::{
    align4, legacy_scale_params, non_finite, priors_bytes, steps_bytes, stored_len, tensor_bytes,
    FIXED_HEADER,
};
use super::{
    blob_version, crc32, header_len, stored_dtype, CouplingWeights, DType, GlowWeights,
    PriorWeights, Tensor, TopWeights,
};
use super::{FLAG_GLOW, FLAG_PRIOR, MAGIC, VERSION, VERSION_2, VERSION_3};

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
        // Version 3 stores the Glow scale floor in bytes 30-31 (f16); earlier versions
        // reserve them.
        let scale_floor = if version == VERSION_3 {
            crate::conv::f16_to_f32(read_u16(blob, 30)?)
        } else {
            0.0
        };
        let (levels, glow, prior) = if version == VERSION {
            if read_u16(blob, 18)? != 0 || read_u16(blob, 30)? != 0 {
                return Err(Error::BadHeader("reserved bytes 18-19 or 30-31 are not 0"));
            }
            (1, false, false)
        } else {
            if version == VERSION_2 && read_u16(blob, 30)? != 0 {
                return Err(Error::BadHeader("reserved bytes 30-31 are not 0"));
            }
            let flags = read_u8(blob, 19)?;
            // Version 2 knows only the Glow flag; version 3 also the learned prior's.
            if version == VERSION_2 && flags & !FLAG_GLOW != 0 {
                return Err(Error::BadHeader(
                    "unknown flag bits in byte 19 (version 2 defines only bit 0, Glow)",
                ));
            }
            if flags & !(FLAG_GLOW | FLAG_PRIOR) != 0 {
                return Err(Error::BadHeader(
                    "unknown flag bits in byte 19 (version 3 defines only bits 0, Glow, and 1, prior)",
                ));
            }
            (
                usize::from(read_u8(blob, 18)?),
                flags & FLAG_GLOW != 0,
                flags & FLAG_PRIOR != 0,
            )
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
            prior,
            scale_floor,
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
        // The learned prior's tensors follow every step's, level by level (none without it).
        let mut offset = model.prior_start();
        for l in 0..arch.levels {
            let view = arch.level(l);
            for &kind in arch.prior_tensors(l) {
                let t = model.take(&view, Mask::ChannelEven, kind, &mut offset)?;
                if let Some(k) = t.first_non_finite() {
                    let index = first.saturating_add(k);
                    return Err(Error::NonFinitePriorWeight {
                        level: l,
                        kind,
                        index,
                    });
                }
                first = first.saturating_add(t.len());
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

    /// Byte offset of the learned prior's first tensor in the tensor section (after every
    /// flow step's tensors).
    fn prior_start(&self) -> usize {
        steps_bytes(&self.arch, self.dtype, self.arch.couplings, self.legacy)
    }

    /// The learned prior's split coupling at level `l` ([`Arch::prior`]; `l < levels - 1`,
    /// the levels that split), at the level's shape. An error when the architecture has no
    /// prior or `l` is not a splitting level.
    pub fn prior(&self, l: usize) -> Result<PriorWeights<'a>, Error> {
        if !self.arch.prior {
            return Err(Error::InvalidArgument(
                "the architecture has no learned prior",
            ));
        }
        if l.saturating_add(1) >= self.arch.levels {
            return Err(Error::InvalidArgument(
                "prior level out of range (levels but the last have a split prior)",
            ));
        }
        let mut offset = self
            .prior_start()
            .saturating_add(priors_bytes(&self.arch, self.dtype, l));
        let view = self.arch.level(l);
        let [scale, w, b] = PRIOR_TENSORS;
        let mut take = |kind| self.take(&view, Mask::ChannelEven, kind, &mut offset);
        Ok(PriorWeights {
            scale: take(scale)?,
            w: take(w)?,
            b: take(b)?,
        })
    }

    /// The learned prior's top ActNorm after the last level ([`Arch::prior`]), at the last
    /// level's shape. An error when the architecture has no prior.
    pub fn top(&self) -> Result<TopWeights<'a>, Error> {
        if !self.arch.prior {
            return Err(Error::InvalidArgument(
                "the architecture has no learned prior",
            ));
        }
        let last = self.arch.levels.saturating_sub(1);
        let mut offset = self
            .prior_start()
            .saturating_add(priors_bytes(&self.arch, self.dtype, last));
        let view = self.arch.level(last);
        let [logs, bias] = TOP_TENSORS;
        let mut take = |kind| self.take(&view, Mask::ChannelEven, kind, &mut offset);
        Ok(TopWeights {
            logs: take(logs)?,
            bias: take(bias)?,
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

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{blob_len, write_blob};
    use super::*;
    use crate::arch::COUPLING_TENSORS;
    use crate::error::ArchField;

    const GLOW_AND_PRIOR: u8 = FLAG_GLOW | FLAG_PRIOR;
    use crate::flow::sample;
    use crate::scratch_len;
    use crate::testutil::{blob, random_params};
    use proptest::prelude::*;
    use std::string::ToString;
    use std::vec::Vec;

    /// A version 2 Glow blob (what earlier kernels wrote: an unused `scale` tensor per
    /// coupling) still loads, with exactly the weights and results of the version 3 blob of
    /// the same parameters; its own corruptions are still caught.
    #[test]
    fn version_2_glow_blobs_still_load() {
        // Written before the scale floor existed: no floor (and a version 3 blob of the same
        // model has zeros in bytes 30-31, as version 3 blobs of that time had).
        let arch = Arch {
            prior: false,
            scale_floor: 0.0,
            ..glow_small()
        };
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
        for flags in [4u8, 5, 0x80, 0xFF] {
            let mut m = b.clone();
            m[19] = flags;
            assert_eq!(
                err(&m),
                Error::BadHeader(
                    "unknown flag bits in byte 19 (version 3 defines only bits 0, Glow, and 1, prior)"
                ),
                "flags {flags:#x}"
            );
        }
        // The prior flag on a model without its tensors: the parameter count is wrong.
        let mut m = b.clone();
        m[19] = 3;
        assert!(matches!(err(&m), Error::BadHeader(s) if s.contains("parameter count")));
        // Bytes 30-31 of version 3: the scale floor (f16), 0 or in (0, 1/2].
        for bits in [0x8000u16, 0x7e00, 0x7c00, 0x3a00, 0xbc00] {
            let mut m = b.clone();
            set_u16(&mut m, 30, bits);
            assert_eq!(
                err(&m),
                Error::InvalidArch(ArchField::ScaleFloor),
                "floor bits {bits:#x}"
            );
        }
        // A version 2 (multi-level RealNVP) blob still reserves them.
        let mut m = blob(
            &multi_small(),
            DType::F32,
            &random_params(&multi_small(), 8, 1.0),
        );
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
        // (With the floor left in bytes 30-31 the floor is what is wrong: only Glow has one.)
        let mut m = b.clone();
        m[19] = 0;
        assert_eq!(err(&m), Error::InvalidArch(ArchField::ScaleFloor));
        set_u16(&mut m, 30, 0);
        assert_eq!(
            err(&m),
            Error::BadHeader("version 3 blob without the Glow flag (must be version 1 or 2)")
        );
        // Relabelled version 2 (the older Glow encoding): its parameter count includes the
        // `scale` tensors, so this header's does not match.
        // (A floor in bytes 30-31 is already wrong there: version 2 reserves them.)
        let mut m = b.clone();
        m[8] = 2;
        assert_eq!(err(&m), Error::BadHeader("reserved bytes 30-31 are not 0"));
        set_u16(&mut m, 30, 0);
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

    /// A prior model's blob: the spec's bytes, flag bit 1, the prior's tensors f32 after every
    /// step's (in an f16 blob too), read back exactly; its length formula.
    #[test]
    fn prior_blobs_round_trip() {
        let arch = prior_small();
        let bare = glow_small();
        // Level 0 (2x4x4): scale 1, weight 2*1*9, bias 2; level 1 (4x2x2): logs 4, bias 4.
        let extra = 1 + 18 + 2 + 4 + 4;
        assert_eq!(arch.param_count(), bare.param_count() + extra);
        assert_eq!(arch.prior_offset(0), bare.param_count());
        assert_eq!(arch.prior_params(0), 21);
        assert_eq!(arch.prior_params(1), 8);
        let params = random_params(&arch, 5, 1.0);
        for dtype in [DType::F32, DType::F16] {
            assert_eq!(blob_len(&arch, dtype), blob_len(&bare, dtype) + 4 * extra);
            let b = blob(&arch, dtype, &params);
            assert_eq!(b.len(), blob_len(&arch, dtype));
            assert!(b == spec_blob(&arch, dtype, &params), "{dtype:?}");
            assert_eq!((b[8], b[18], b[19]), (3, 2, GLOW_AND_PRIOR));
            let model = Model::from_blob(&b).unwrap();
            assert_eq!(model.version(), VERSION_3);
            assert_same_arch(model.arch(), &arch);
            assert!(model.arch().prior);
            let mut want = params.clone();
            if dtype == DType::F16 {
                super::super::round_to_f16_for(&arch, &mut want).unwrap();
                // The prior's tensors are not rounded.
                let start = arch.prior_offset(0);
                assert!(want[start..]
                    .iter()
                    .zip(&params[start..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
                assert!(want[..start] != params[..start]);
            }
            let got = all_weights(&model);
            assert_eq!(got.len(), arch.param_count());
            assert!(got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            let p = model.prior(0).unwrap();
            assert_eq!((p.scale.len(), p.w.len(), p.b.len()), (1, 18, 2));
            assert_eq!(p.w.iter().next(), Some(params[arch.prior_offset(0) + 1]));
            let t = model.top().unwrap();
            assert_eq!((t.logs.len(), t.bias.len()), (4, 4));
            assert_eq!(t.bias.iter().last(), params.last().copied());
            assert!(model.prior(1).is_err() && model.prior(7).is_err());
            // Models without the prior have neither.
            let g = valid_glow(dtype);
            let m0 = Model::from_blob(&g).unwrap();
            assert!(m0.prior(0).is_err() && m0.top().is_err());
            assert!(!m0.arch().prior);
        }
        // One level: only the top prior.
        let one = Arch {
            levels: 1,
            couplings: 2,
            ..arch
        };
        let p1 = random_params(&one, 6, 1.0);
        let b1 = blob(&one, DType::F16, &p1);
        assert!(b1 == spec_blob(&one, DType::F16, &p1));
        let m1 = Model::from_blob(&b1).unwrap();
        assert_eq!(m1.top().unwrap().logs.len(), 2);
        assert!(m1.prior(0).is_err());
    }

    /// The prior flag needs the Glow flag and version 3; a non-finite prior weight is an
    /// error naming its level and tensor, when reading and when writing.
    #[test]
    fn prior_blob_corruptions_are_rejected() {
        let arch = prior_small();
        let params = random_params(&arch, 5, 1.0);
        let b = blob(&arch, DType::F32, &params);
        // Prior without Glow: with Glow's floor still in bytes 30-31 the floor is wrong first,
        // without it the prior.
        let mut m = b.clone();
        m[19] = FLAG_PRIOR;
        assert_eq!(err(&m), Error::InvalidArch(ArchField::ScaleFloor));
        set_u16(&mut m, 30, 0);
        assert_eq!(err(&m), Error::InvalidArch(ArchField::Prior));
        // Version 2 defines only the Glow flag.
        let mut m = blob(
            &multi_small(),
            DType::F32,
            &random_params(&multi_small(), 8, 1.0),
        );
        for flags in [2u8, 3] {
            m[19] = flags;
            assert_eq!(
                err(&m),
                Error::BadHeader(
                    "unknown flag bits in byte 19 (version 2 defines only bit 0, Glow)"
                )
            );
        }
        // The prior flag cleared: the parameter count (which includes the prior) is wrong.
        let mut m = b.clone();
        m[19] = FLAG_GLOW;
        assert!(matches!(err(&m), Error::BadHeader(s) if s.contains("parameter count")));
        // A non-finite weight in each prior tensor, f32 and f16 blobs (all f32 in both: the
        // prior's tensors end the tensor section, so flat index i is 4 bytes per element
        // before the CRC).
        let o0 = arch.prior_offset(0);
        let o1 = arch.prior_offset(1);
        let targets = [
            (o0, 0, TensorKind::PriorScale),
            (o0 + 1 + 17, 0, TensorKind::PriorWeight),
            (o0 + 1 + 18 + 1, 0, TensorKind::PriorBias),
            (o1 + 2, 1, TensorKind::TopLogs),
            (o1 + 4 + 3, 1, TensorKind::TopBias),
        ];
        for dtype in [DType::F32, DType::F16] {
            let b = blob(&arch, dtype, &params);
            for &(index, level, kind) in &targets {
                let at = b.len() - 4 - 4 * (arch.param_count() - index);
                // Under Miri (a parse with its CRC is slow there): NaN only.
                let bads: &[f32] = if cfg!(miri) {
                    &[f32::NAN]
                } else {
                    &[f32::NAN, f32::INFINITY]
                };
                for &bad in bads {
                    let mut m = b.clone();
                    m[at..at + 4].copy_from_slice(&bad.to_le_bytes());
                    fix_crc(&mut m);
                    let want = Error::NonFinitePriorWeight { level, kind, index };
                    let got = err(&m);
                    assert_eq!(got, want, "{dtype:?} {kind}");
                    assert!(got
                        .to_string()
                        .ends_with(&std::format!("level {level} {kind}")));
                    let mut p = params.clone();
                    p[index] = bad;
                    let mut out = std::vec![0u8; blob_len(&arch, dtype)];
                    assert_eq!(write_blob(&arch, dtype, &p, &mut out), Err(want));
                }
            }
            // Beyond f16's range is fine for a prior weight, even in an f16 blob.
            let mut p = params.clone();
            p[o0 + 3] = 1e6;
            let b = blob(&arch, dtype, &p);
            let model = Model::from_blob(&b).unwrap();
            assert_eq!(model.prior(0).unwrap().w.iter().nth(2), Some(1e6));
        }
        assert_eq!(
            Error::NonFinitePriorWeight {
                level: 0,
                kind: TensorKind::PriorScale,
                index: 3
            }
            .to_string(),
            "weight 3 is not finite (NaN, infinite, or beyond f16 range): level 0 prior scale"
        );
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
                    prior: false,
                    scale_floor: 0.0,
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
