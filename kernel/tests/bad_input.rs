//! The weight-blob rows of the bad-input table (RELIABILITY.md): one test per class of
//! corrupt blob, each checking the error variant *and* that its message names the problem,
//! through the public API only. (The parser's unit tests in `src/weights/read.rs` go through
//! every header field; these pin what a user sees.)

use clayflow_kernel::error::Buffer;
use clayflow_kernel::weights::{crc32, header_len};
use clayflow_kernel::{
    alternating_masks, blob_len, log_prob_u, scratch_len, write_blob, Arch, DType, Error, Mask,
    Model,
};

/// 3x4x4, two channel couplings and a checkerboard one, small odd hidden widths.
fn arch() -> Arch {
    let mut masks = alternating_masks(Mask::ChannelEven);
    masks[2] = Mask::CheckerOdd;
    Arch {
        channels: 3,
        height: 4,
        width: 4,
        squeeze: false,
        levels: 1,
        glow: false,
        couplings: 3,
        masks,
        kernels: [3, 1, 3],
        hidden: [3, 5],
        bits: 8,
        logit_alpha: 0.05,
        prior: false,
        scale_floor: 0.0,
    }
}

/// Deterministic small weights.
fn params(arch: &Arch) -> Vec<f32> {
    (0..arch.param_count())
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 0.1)
        .collect()
}

fn blob(dtype: DType) -> Vec<u8> {
    let a = arch();
    let mut b = vec![0u8; blob_len(&a, dtype)];
    write_blob(&a, dtype, &params(&a), &mut b).expect("a valid blob");
    Model::from_blob(&b).expect("the valid blob parses");
    b
}

/// Recomputes the trailing CRC-32, so a test reaches the check behind it.
fn fix_crc(b: &mut [u8]) {
    let n = b.len() - 4;
    let crc = crc32(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
}

/// The error for `b` and its message, which must contain every one of `words`.
fn rejected(b: &[u8], words: &[&str]) -> Error {
    let e = Model::from_blob(b).expect_err("the blob should be rejected");
    let msg = e.to_string();
    for w in words {
        assert!(msg.contains(w), "{w:?} not in {msg:?}");
    }
    e
}

#[test]
fn truncated_blob_is_named() {
    let good = blob(DType::F32);
    let n = good.len();
    for cut in [0, 7, 39, 40, header_len(&arch()), n / 2, n - 4, n - 1] {
        let e = rejected(&good[..cut], &["truncated", "needs", &format!("has {cut}")]);
        assert!(
            matches!(e, Error::Truncated { got, .. } if got == cut),
            "{e:?}"
        );
    }
    // The full size it needs is named once the header is there.
    let e = rejected(&good[..n - 1], &[&format!("needs {n} bytes")]);
    assert_eq!(
        e,
        Error::Truncated {
            needed: n,
            got: n - 1
        }
    );
    // One byte too many is the opposite problem, also named.
    let mut long = good.clone();
    long.push(0);
    rejected(
        &long,
        &[&format!("{} bytes", n + 1), &format!("exactly {n}")],
    );
}

#[test]
fn wrong_magic_is_named() {
    let mut b = blob(DType::F32);
    b[..8].copy_from_slice(b"CLAYFLOX");
    fix_crc(&mut b);
    assert_eq!(
        rejected(&b, &["not a clayflow weight blob", "magic"]),
        Error::BadMagic
    );
    // Some other file format entirely (a PNG signature).
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x02\0\0\0\0\0\0\0\0\0\0\0\0";
    assert_eq!(rejected(png, &["magic"]), Error::BadMagic);
}

#[test]
fn wrong_version_is_named() {
    for v in [0u16, 4, 0x0100, u16::MAX] {
        let mut b = blob(DType::F32);
        b[8..10].copy_from_slice(&v.to_le_bytes());
        fix_crc(&mut b);
        let e = rejected(&b, &[&format!("version {v}"), "not supported", "reads 1"]);
        assert_eq!(e, Error::UnsupportedVersion(v));
    }
}

#[test]
fn wrong_dtype_is_named() {
    for code in [0u8, 3, 4, 255] {
        let mut b = blob(DType::F16);
        b[10] = code;
        fix_crc(&mut b);
        let e = rejected(
            &b,
            &[&format!("dtype code {code}"), "unknown", "f32", "f16"],
        );
        assert_eq!(e, Error::UnknownDtype(code));
    }
    // An f32 blob relabelled as f16 (a valid code): its size no longer matches.
    let mut b = blob(DType::F32);
    b[10] = DType::F16 as u8;
    fix_crc(&mut b);
    let e = Model::from_blob(&b).expect_err("relabelled dtype");
    assert!(matches!(e, Error::TrailingBytes { .. }), "{e:?}");
}

#[test]
fn wrong_shape_is_named() {
    let good = blob(DType::F32);
    // The parameter count in the header disagrees with the architecture's shapes.
    let mut b = good.clone();
    let p = arch().param_count() as u32;
    b[36..40].copy_from_slice(&(p + 1).to_le_bytes());
    fix_crc(&mut b);
    rejected(&b, &["parameter count", "wrong shapes"]);
    // A hidden width changed: the stated count no longer fits the shapes either.
    let mut b = good.clone();
    b[26..28].copy_from_slice(&4u16.to_le_bytes());
    fix_crc(&mut b);
    rejected(&b, &["parameter count", "wrong shapes"]);
    // An impossible kernel size.
    let mut b = good.clone();
    b[22] = 4;
    fix_crc(&mut b);
    let e = rejected(&b, &["invalid architecture", "kernel sizes must be odd"]);
    assert_eq!(
        e,
        Error::InvalidArch(clayflow_kernel::error::ArchField::Kernel)
    );
    // A valid blob used on images of another shape: the input buffer size is named.
    let model = Model::from_blob(&good).unwrap();
    let mut scratch = vec![0.0f32; scratch_len(model.arch())];
    let wrong = vec![0.5f32; 28 * 28];
    let e = log_prob_u(&model, &wrong, &mut scratch).expect_err("wrong image size");
    assert_eq!(
        e,
        Error::BufferSize {
            buffer: Buffer::Input,
            needed: 3 * 4 * 4,
            got: 28 * 28
        }
    );
    assert!(
        e.to_string()
            .contains("input buffer has length 784, needs 48"),
        "{e}"
    );
}

#[test]
fn checksum_mismatch_is_named() {
    let good = blob(DType::F32);
    for at in [
        header_len(&arch()),
        good.len() / 2,
        good.len() - 5,
        good.len() - 1,
    ] {
        let mut b = good.clone();
        b[at] ^= 0x10;
        let e = rejected(&b, &["checksum mismatch", "stored", "computed", "corrupt"]);
        assert!(matches!(e, Error::ChecksumMismatch { .. }), "{e:?}");
    }
}

#[test]
fn non_finite_weights_are_named() {
    let a = arch();
    let last = a.param_count() - 1;
    let h = header_len(&a);
    let n = blob_len(&a, DType::F32);
    // f32: NaN in the first weight (coupling 0's scale, tensor 0), +inf and -inf in the
    // last (coupling 2's conv 2 bias, tensor 20; f32 blobs have no padding), with a correct
    // checksum, as a buggy exporter would write them.
    for (at, value, tensor, index, names) in [
        (h, f32::NAN, 0, 0, "coupling 0 scale"),
        (n - 8, f32::INFINITY, 20, last, "coupling 2 conv 2 bias"),
        (n - 8, f32::NEG_INFINITY, 20, last, "coupling 2 conv 2 bias"),
    ] {
        let mut b = blob(DType::F32);
        b[at..at + 4].copy_from_slice(&value.to_le_bytes());
        fix_crc(&mut b);
        let e = rejected(
            &b,
            &[
                &format!("weight {index} is not finite"),
                &format!("tensor {tensor}"),
                names,
            ],
        );
        assert_eq!(e, Error::NonFiniteWeight { tensor, index });
    }
    // f16: an infinity (0x7c00) and a NaN (0x7e00) in the first weight.
    for bits in [0x7c00u16, 0x7e00] {
        let mut b = blob(DType::F16);
        b[h..h + 2].copy_from_slice(&bits.to_le_bytes());
        fix_crc(&mut b);
        let e = rejected(&b, &["weight 0 is not finite", "coupling 0 scale"]);
        assert_eq!(
            e,
            Error::NonFiniteWeight {
                tensor: 0,
                index: 0
            }
        );
    }
    // The writer refuses them in the first place, naming the same place. Coupling 0 keeps
    // 2 of the 3 channels and changes 1: its scale is weight 0, its conv 0 weight (tensor
    // 1) weights 1..=54.
    let mut p = params(&a);
    p[7] = f32::NAN;
    let mut out = vec![0u8; n];
    let e = write_blob(&a, DType::F32, &p, &mut out).expect_err("NaN weight");
    assert_eq!(
        e,
        Error::NonFiniteWeight {
            tensor: 1,
            index: 7
        }
    );
    assert!(e.to_string().contains("coupling 0 conv 0 weight"), "{e}");
    // A finite f32 beyond the f16 range cannot be stored as f16.
    let mut p = params(&a);
    p[3] = 1e5;
    let mut out = vec![0u8; blob_len(&a, DType::F16)];
    assert_eq!(
        write_blob(&a, DType::F16, &p, &mut out),
        Err(Error::NonFiniteWeight {
            tensor: 1,
            index: 3
        })
    );
}
