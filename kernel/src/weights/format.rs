//! The blob's format constants, its storage types and the size arithmetic of its header and
//! tensors (saturating `const fn`s of the architecture).

use crate::arch::{step_tensors, Arch, Mask, TensorKind, MAX_LEVELS};
use crate::error::Error;

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
/// Flag bit of header byte 19 (version 3 only): Glow's learned prior ([`Arch::prior`]), whose
/// tensors follow every flow step's. Needs [`FLAG_GLOW`].
pub const FLAG_PRIOR: u8 = 2;
/// Bytes of the fixed header before the mask codes.
pub(super) const FIXED_HEADER: usize = 40;

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
    pub(super) const fn elements(self, bytes: usize) -> usize {
        match self {
            DType::F32 => bytes / 4,
            DType::F16 => bytes / 2,
        }
    }
}

pub(super) const fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

/// The format version [`write_blob`](super::write_blob) uses for `arch`: [`VERSION`] (1)
/// for one level without Glow steps, so seed blobs stay byte-identical, [`VERSION_3`] for
/// Glow steps, else [`VERSION_2`].
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
/// (always, so that `W` and `W^-1` stay exact inverses) and the prior's
/// ([`TensorKind::is_f32`]), `dtype` for the coupling tensors.
pub const fn stored_dtype(kind: TensorKind, dtype: DType) -> DType {
    if kind.is_f32() {
        DType::F32
    } else {
        dtype
    }
}

/// Bytes one tensor of `len` elements occupies, padded to a multiple of 4.
pub(super) const fn tensor_bytes(len: usize, dtype: DType) -> usize {
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
pub(super) const fn steps_bytes(arch: &Arch, dtype: DType, count: usize, legacy: bool) -> usize {
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

/// Bytes of the learned prior's tensors of the first `count` levels (f32 whatever the
/// dtype): their offset after the flow steps' tensors.
pub(super) const fn priors_bytes(arch: &Arch, dtype: DType, count: usize) -> usize {
    let mut n = 0usize;
    if !arch.prior {
        return n;
    }
    let mut l = 0usize;
    // MAX_LEVELS bounds the loop for unvalidated architectures (levels up to usize::MAX).
    while l < count && l < arch.levels && l < MAX_LEVELS {
        let view = arch.level(l);
        let mut kinds = arch.prior_tensors(l);
        while let [kind, rest @ ..] = kinds {
            kinds = rest;
            let len = view.tensor_len(Mask::ChannelEven, *kind);
            n = n.saturating_add(tensor_bytes(len, stored_dtype(*kind, dtype)));
        }
        l = l.saturating_add(1);
    }
    n
}

/// Bytes of the tensor section: the flow steps', then the prior's.
const fn tensors_len(arch: &Arch, dtype: DType, legacy: bool) -> usize {
    steps_bytes(arch, dtype, arch.couplings, legacy).saturating_add(priors_bytes(
        arch,
        dtype,
        arch.levels,
    ))
}

/// Elements of the unused `scale` tensors a version 2 Glow blob stores (`changed` per step),
/// which its header's parameter count includes.
pub(super) const fn legacy_scale_params(arch: &Arch) -> usize {
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
/// the version [`write_blob`](super::write_blob) writes ([`blob_version`]).
pub const fn blob_len(arch: &Arch, dtype: DType) -> usize {
    stored_len(arch, dtype, false)
}

/// [`blob_len`], or with `legacy` the length of a version 2 Glow blob (with `scale` tensors).
pub(super) const fn stored_len(arch: &Arch, dtype: DType, legacy: bool) -> usize {
    header_len(arch)
        .saturating_add(tensors_len(arch, dtype, legacy))
        .saturating_add(4)
}

/// The non-finite-weight error for tensor number `tensor` (blob order), the `kind` tensor
/// of step `step`, at flat parameter `index`: [`Error::NonFiniteWeight`] for architectures
/// without Glow steps (seven tensors per step), [`Error::NonFiniteGlowWeight`] with them.
pub(super) fn non_finite(
    glow: bool,
    tensor: usize,
    step: usize,
    kind: TensorKind,
    index: usize,
) -> Error {
    if glow {
        Error::NonFiniteGlowWeight { step, kind, index }
    } else {
        Error::NonFiniteWeight { tensor, index }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::arch::{COLOR, COLOR_GLOW, MNIST, MNIST_GLOW};
    use crate::testutil::{blob, random_params};

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
        assert_eq!(b[30..32], [0x00, 0x2c]); // scale floor 1/16 as f16
        assert_eq!(b[40..44], [0, 3, 1, 2]);
        // Levels without Glow: flags 0.
        let multi = blob(
            &multi_small(),
            DType::F32,
            &random_params(&multi_small(), 1, 1.0),
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
        assert_eq!(blob_version(&multi_small()), VERSION_2);
        assert_eq!(blob_version(&MNIST), VERSION);
    }
}
