//! Helpers shared by the weight format's unit tests: small architectures, valid blobs, an
//! independent writer that follows FORMAT.md, and offsets computed from the spec.

use super::*;
use crate::arch::{
    alternating_masks, step_tensors, Arch, Mask, TensorKind, COUPLING_TENSORS, GLOW_TENSORS,
    MAX_COUPLINGS,
};
use crate::error::Error;
use crate::testutil::{blob, random_params};
use std::vec::Vec;

/// 3x4x4 without squeeze, masks channel-even, checker-odd, channel-odd: the channel
/// split is uneven (kept 2 / changed 1, then 1 / 2), hidden widths are odd so f16 tensors
/// need padding, and three couplings leave one padding byte in the header (43 -> 44).
pub(super) fn small() -> Arch {
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
        prior: false,
        scale_floor: 0.0,
    }
}

/// 1x4x4 squeezed to 4x2x2, two channel couplings.
pub(super) fn squeezed() -> Arch {
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
        prior: false,
        scale_floor: 0.0,
    }
}

/// A version 2 model: 2x4x4 without squeeze, 2 levels (2x4x4, then 4x2x2), Glow steps,
/// a checkerboard and channel masks, odd hidden widths (f16 padding).
pub(super) fn glow_small() -> Arch {
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
        prior: false,
        scale_floor: crate::GLOW_SCALE_FLOOR,
    }
}

/// [`glow_small`] without its Glow steps: a multi-level RealNVP (version 2, no floor).
pub(super) fn multi_small() -> Arch {
    Arch {
        glow: false,
        prior: false,
        scale_floor: 0.0,
        ..glow_small()
    }
}

pub(super) fn valid_glow(dtype: DType) -> Vec<u8> {
    blob(&glow_small(), dtype, &random_params(&glow_small(), 8, 1.0))
}

/// `(byte offset, step, kind, element size)` of flat parameter `index` in a blob of
/// `arch`, from the spec (step tensors in blob order at the level's shape, Glow tensors
/// f32, each tensor padded to 4 bytes), not from the parser.
pub(super) fn locate(arch: &Arch, dtype: DType, index: usize) -> (usize, usize, TensorKind, usize) {
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

pub(super) fn valid(dtype: DType) -> Vec<u8> {
    blob(&small(), dtype, &random_params(&small(), 7, 1.0))
}

/// Recomputes the trailing CRC-32 over everything before it.
pub(super) fn fix_crc(b: &mut [u8]) {
    let n = b.len() - 4;
    let crc = crc32(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
}

pub(super) fn set_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub(super) fn err(b: &[u8]) -> Error {
    Model::from_blob(b).expect_err("blob should be rejected")
}

/// Byte offset of flat parameter `index` in a blob of `arch`, computed from the spec
/// (each tensor padded to 4 bytes), not from the parser.
pub(super) fn weight_offset(arch: &Arch, dtype: DType, index: usize) -> usize {
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
pub(super) fn tensor_of(arch: &Arch, index: usize) -> usize {
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
pub(super) fn weights(model: &Model<'_>) -> Vec<f32> {
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
pub(super) fn assert_same_arch(got: &Arch, want: &Arch) {
    assert_eq!(got.active_masks(), want.active_masks());
    let mut norm = *want;
    norm.masks = [Mask::ChannelEven; MAX_COUPLINGS];
    norm.masks[..want.couplings].copy_from_slice(want.active_masks());
    assert_eq!(*got, norm);
    assert_eq!(got.logit_alpha.to_bits(), want.logit_alpha.to_bits());
}

/// An independent writer that follows FORMAT.md byte by byte.
pub(super) fn spec_blob(arch: &Arch, dtype: DType, params: &[f32]) -> Vec<u8> {
    spec_blob_as(arch, dtype, params, false)
}

/// [`spec_blob`], or with `legacy` (a Glow `arch`) the version 2 encoding earlier kernels
/// wrote: each coupling's tensors start with a `scale` tensor (`changed` values, here
/// 0.5, unused), which the header's parameter count includes.
pub(super) fn spec_blob_as(arch: &Arch, dtype: DType, params: &[f32], legacy: bool) -> Vec<u8> {
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
        // Flags: bit 0 Glow, bit 1 the learned prior.
        b.extend_from_slice(&[
            arch.levels as u8,
            u8::from(arch.glow) | (u8::from(arch.prior) << 1),
        ]);
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
    // Bytes 30-31: version 3's scale floor as f16 (written by hand: 1/16 is 0x2c00), else 0.
    let floor: u16 = if version == 3 {
        if arch.scale_floor == 0.0 {
            0
        } else if arch.scale_floor == 0.0625 {
            0x2c00
        } else {
            half::f16::from_f32(arch.scale_floor).to_bits()
        }
    } else {
        assert_eq!(arch.scale_floor, 0.0, "only version 3 stores a scale floor");
        0
    };
    for v in [arch.hidden[0] as u16, arch.hidden[1] as u16, floor] {
        b.extend_from_slice(&v.to_le_bytes());
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
                        DType::F16 => b.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes()),
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
    // The learned prior, all f32: per split level scale [C/2], weight [C][C/2][3][3], bias
    // [C]; then the top ActNorm's logs [C_last] and bias [C_last].
    if arch.prior {
        for l in 0..arch.levels {
            let c = arch.level_shape(l).0;
            let lens = if l + 1 < arch.levels {
                std::vec![c / 2, c * (c / 2) * 9, c]
            } else {
                std::vec![c, c]
            };
            for n in lens {
                let (t, tail) = rest.split_at(n);
                rest = tail;
                for &v in t {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    assert!(rest.is_empty());
    let crc = crc32(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Every weight of a model in blob order (Glow tensors first in each step), widened.
pub(super) fn all_weights(model: &Model<'_>) -> Vec<f32> {
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
    if model.arch().prior {
        for l in 0..model.arch().levels - 1 {
            for t in model.prior(l).unwrap().in_blob_order() {
                out.extend(t.iter());
            }
        }
        for t in model.top().unwrap().in_blob_order() {
            out.extend(t.iter());
        }
    }
    out
}

/// [`glow_small`] with the learned prior (2 levels: a split prior on 2x4x4, the top prior on
/// 4x2x2).
pub(super) fn prior_small() -> Arch {
    Arch {
        prior: true,
        ..glow_small()
    }
}
