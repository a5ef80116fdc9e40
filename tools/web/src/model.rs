//! What the page accepts: any blob the kernel reads whose model draws MNIST-shaped images
//! (1x28x28, 8-bit pixels) and whose scratch fits this module's static buffer.

use crate::text::{kernel_error, Text};
use clayflow_kernel::{scratch_len, Error, Model};

/// Image side the page draws and scores.
pub const SIDE: usize = crate::shared::SIDE;

/// Pixels per image.
pub const PIXELS: usize = SIDE * SIDE;

/// Why a blob or a request was refused.
#[derive(Clone, Copy, Debug)]
pub enum Failure {
    /// The kernel refused (its own message).
    Kernel(Error),
    /// The model is valid but not 1x28x28 with 8-bit pixels.
    Shape {
        /// Its image channels, height and width.
        chw: [usize; 3],
        /// Its pixel bit depth.
        bits: u32,
    },
    /// The model needs more scratch than the module has.
    Scratch {
        /// f32 elements the model needs.
        needed: usize,
        /// f32 elements the module has.
        have: usize,
    },
    /// The blob is larger than the module's blob buffer.
    BlobTooLarge {
        /// The blob's bytes.
        len: usize,
        /// The buffer's bytes.
        cap: usize,
    },
    /// No blob has been loaded successfully.
    NoModel,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Kernel(e)
    }
}

/// Parses `blob` with the kernel and checks that the page can use the model.
pub fn open(blob: &[u8], scratch_cap: usize) -> Result<Model<'_>, Failure> {
    let model = Model::from_blob(blob)?;
    let arch = *model.arch();
    if (arch.channels, arch.height, arch.width, arch.bits) != (1, SIDE, SIDE, 8) {
        return Err(Failure::Shape {
            chw: [arch.channels, arch.height, arch.width],
            bits: arch.bits,
        });
    }
    let needed = scratch_len(&arch);
    if needed > scratch_cap {
        return Err(Failure::Scratch {
            needed,
            have: scratch_cap,
        });
    }
    Ok(model)
}

/// Appends the message for `f`.
pub fn describe(t: &mut Text, f: &Failure) {
    let n = |n: usize| n as u64;
    match *f {
        Failure::Kernel(e) => kernel_error(t, &e),
        Failure::Shape {
            chw: [c, h, w],
            bits,
        } => {
            t.push("not an MNIST-shaped model: this page draws 1x28x28 images with 8-bit pixels, the blob's model has ");
            t.dec(n(c));
            t.push("x");
            t.dec(n(h));
            t.push("x");
            t.dec(n(w));
            t.push(" images with ");
            t.dec(u64::from(bits));
            t.push("-bit pixels");
        }
        Failure::Scratch { needed, have } => {
            t.push("the model needs ");
            t.dec(n(needed));
            t.push(" f32 of scratch, this module has ");
            t.dec(n(have));
            t.push(" (hidden widths too large for the page)");
        }
        Failure::BlobTooLarge { len, cap } => {
            t.push("the blob has ");
            t.dec(n(len));
            t.push(" bytes, this module holds at most ");
            t.dec(n(cap));
        }
        Failure::NoModel => t.push("no model loaded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clayflow_kernel::{blob_len, write_blob, Arch, DType, COLOR, MNIST, MNIST_GLOW};

    fn message(f: &Failure) -> String {
        let mut t = Text::new();
        describe(&mut t, f);
        String::from_utf8(t.as_bytes().to_vec()).unwrap()
    }

    fn zero_blob(arch: &Arch, dtype: DType) -> Vec<u8> {
        let mut out = vec![0u8; blob_len(arch, dtype)];
        let params = vec![0f32; arch.param_count()];
        write_blob(arch, dtype, &params, &mut out).unwrap();
        out
    }

    #[test]
    fn accepts_both_mnist_presets_in_both_dtypes() {
        for arch in [MNIST, MNIST_GLOW] {
            for dtype in [DType::F16, DType::F32] {
                let blob = zero_blob(&arch, dtype);
                let m = open(&blob, scratch_len(&MNIST_GLOW).max(scratch_len(&MNIST)));
                assert!(m.is_ok(), "{arch:?} {dtype:?}");
            }
        }
    }

    #[test]
    fn the_committed_glow_blob_opens() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../firmware/model-glow-f16.cfw"
        );
        let blob = std::fs::read(path).unwrap();
        let m = open(&blob, scratch_len(&MNIST_GLOW)).unwrap();
        // Exported before the Glow scale floor existed: the preset's model without a floor.
        let unfloored = clayflow_kernel::Arch {
            prior: false,
            scale_floor: 0.0,
            ..MNIST_GLOW
        };
        assert_eq!(*m.arch(), unfloored);
    }

    #[test]
    fn refuses_other_shapes_and_small_scratch_with_a_message() {
        let blob = zero_blob(&COLOR, DType::F16);
        let f = open(&blob, usize::MAX).unwrap_err();
        assert_eq!(
            message(&f),
            "not an MNIST-shaped model: this page draws 1x28x28 images with 8-bit pixels, \
             the blob's model has 3x32x32 images with 8-bit pixels"
        );
        let blob = zero_blob(&MNIST_GLOW, DType::F16);
        let f = open(&blob, 100).unwrap_err();
        assert_eq!(
            message(&f),
            format!(
                "the model needs {} f32 of scratch, this module has 100 (hidden widths too large for the page)",
                scratch_len(&MNIST_GLOW)
            )
        );
    }

    #[test]
    fn corrupt_blobs_give_the_kernels_message() {
        let mut blob = zero_blob(&MNIST, DType::F16);
        let Some(b) = blob.get_mut(1000) else {
            panic!("blob too short")
        };
        *b ^= 0x40;
        let f = open(&blob, usize::MAX).unwrap_err();
        let Failure::Kernel(e) = f else {
            panic!("{f:?}")
        };
        assert!(matches!(e, Error::ChecksumMismatch { .. }));
        assert_eq!(message(&f), e.to_string());
        let f = open(&blob[..10], usize::MAX).unwrap_err();
        assert_eq!(message(&f), "weight blob truncated: needs 40 bytes, has 10");
    }
}
