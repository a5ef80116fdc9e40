//! The kernel's error messages without `core::fmt`: a fixed-size text buffer, decimal and
//! hexadecimal integers, and [`kernel_error`], which writes the same text as the kernel's
//! `Display for Error` (the unit tests below compare the two for every variant). Leaving
//! `core::fmt` out keeps its formatting machinery out of the wasm module.

use clayflow_kernel::arch::TensorKind;
use clayflow_kernel::error::{ArchField, Buffer};
use clayflow_kernel::Error;

/// Capacity of a [`Text`] in bytes; longer text is cut at a character boundary.
pub const TEXT_CAP: usize = 512;

/// A message being built: UTF-8 bytes in a fixed array.
#[derive(Debug)]
pub struct Text {
    buf: [u8; TEXT_CAP],
    len: usize,
}

impl Default for Text {
    fn default() -> Self {
        Self::new()
    }
}

impl Text {
    /// Empty text.
    pub const fn new() -> Text {
        Text {
            buf: [0; TEXT_CAP],
            len: 0,
        }
    }

    /// Forgets the text.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The bytes written so far (always valid UTF-8).
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }

    /// Appends `s`, or as much of it as fits, cut at a character boundary.
    pub fn push(&mut self, s: &str) {
        let room = TEXT_CAP.saturating_sub(self.len);
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1; // n > 0 here: 0 is always a boundary
        }
        let src = s.as_bytes().get(..n).unwrap_or(&[]);
        if let Some(dst) = self.buf.get_mut(self.len..self.len + n) {
            dst.copy_from_slice(src);
            self.len += n;
        }
    }

    /// Appends `n` in decimal (`{}`).
    pub fn dec(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            if let Some(d) = digits.get_mut(i) {
                *d = b'0' + (n % 10) as u8;
            }
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        self.push_ascii(digits.get(i..).unwrap_or(&[]));
    }

    /// Appends `n` as `0x` and eight lowercase hexadecimal digits (`{:#010x}`).
    pub fn hex8(&mut self, n: u32) {
        let mut s = *b"0x00000000";
        for (k, c) in s.iter_mut().skip(2).enumerate() {
            let nibble = (n >> (28 - 4 * k)) & 0xf;
            *c = b"0123456789abcdef"
                .get(nibble as usize)
                .copied()
                .unwrap_or(b'?');
        }
        self.push_ascii(&s);
    }

    fn push_ascii(&mut self, bytes: &[u8]) {
        // Only ASCII digits and letters reach here, so this cannot fail.
        if let Ok(s) = core::str::from_utf8(bytes) {
            self.push(s);
        }
    }
}

/// `usize` as `u64` (lossless on every target this crate builds for).
fn wide(n: usize) -> u64 {
    n as u64
}

fn buffer_name(b: Buffer) -> &'static str {
    match b {
        Buffer::Input => "input",
        Buffer::Output => "output",
        Buffer::Scratch => "scratch",
        Buffer::Weights => "weights",
        Buffer::Blob => "blob",
        _ => "some",
    }
}

fn arch_field(f: ArchField) -> &'static str {
    match f {
        ArchField::Channels => "channels must be 1..=64",
        ArchField::Size => {
            "height and width must be 1..=1024 (and divisible by 2 for every squeeze)"
        }
        ArchField::Couplings => "couplings must be 1..=32",
        ArchField::Levels => {
            "levels must be 1..=8 and divide the couplings, with an even channel count at every split"
        }
        ArchField::Mask => "a mask needs at least 2 channels or 2 pixels to split",
        ArchField::Kernel => "kernel sizes must be odd and 1..=15",
        ArchField::Hidden => "hidden widths must be 1..=4096",
        ArchField::Bits => "pixel bits must be 1..=8",
        ArchField::LogitAlpha => "logit alpha must be finite with 0 < alpha < 0.5",
        ArchField::ScaleFloor => {
            "the scale floor must be 0, or with Glow steps a value in (0, 1/2] that f16 holds exactly"
        }
        ArchField::Prior => "the learned prior needs Glow steps",
        ArchField::TooLarge => "image or parameter count too large",
        _ => "a field this page has no text for",
    }
}

fn tensor_kind(t: &mut Text, k: TensorKind) {
    let conv = |t: &mut Text, j: usize, what: &str| {
        t.push("conv ");
        t.dec(wide(j));
        t.push(what);
    };
    match k {
        TensorKind::Scale => t.push("scale"),
        TensorKind::ConvWeight(j) => conv(t, j, " weight"),
        TensorKind::ConvBias(j) => conv(t, j, " bias"),
        TensorKind::ActNormLogs => t.push("actnorm log-scale"),
        TensorKind::ActNormBias => t.push("actnorm bias"),
        TensorKind::InvConvWeight => t.push("1x1 conv weight"),
        TensorKind::InvConvInverse => t.push("1x1 conv inverse"),
        TensorKind::InvConvLogDet => t.push("1x1 conv log-det"),
        TensorKind::PriorScale => t.push("prior scale"),
        TensorKind::PriorWeight => t.push("prior conv weight"),
        TensorKind::PriorBias => t.push("prior conv bias"),
        TensorKind::TopLogs => t.push("top prior log-scale"),
        TensorKind::TopBias => t.push("top prior bias"),
    }
}

const NOT_FINITE: &str = " is not finite (NaN, infinite, or beyond f16 range): ";

/// "weight {index} is not finite ...: {place}{n} {kind}", the Glow and prior weights' message.
fn non_finite(t: &mut Text, index: usize, place: &str, n: usize, kind: TensorKind) {
    t.push("weight ");
    t.dec(wide(index));
    t.push(NOT_FINITE);
    t.push(place);
    t.dec(wide(n));
    t.push(" ");
    tensor_kind(t, kind);
}

/// Appends the kernel's message for `e`: the text of its `Display` implementation.
pub fn kernel_error(t: &mut Text, e: &Error) {
    match *e {
        Error::BufferSize {
            buffer,
            needed,
            got,
        } => {
            t.push(buffer_name(buffer));
            t.push(" buffer has length ");
            t.dec(wide(got));
            t.push(", needs ");
            t.dec(wide(needed));
        }
        Error::InvalidArch(field) => {
            t.push("invalid architecture: ");
            t.push(arch_field(field));
        }
        Error::Truncated { needed, got } => {
            t.push("weight blob truncated: needs ");
            t.dec(wide(needed));
            t.push(" bytes, has ");
            t.dec(wide(got));
        }
        Error::TrailingBytes { expected, got } => {
            t.push("weight blob has ");
            t.dec(wide(got));
            t.push(" bytes, expected exactly ");
            t.dec(wide(expected));
        }
        Error::BadMagic => t.push("not a clayflow weight blob (magic is not CLAYFLOW)"),
        Error::UnsupportedVersion(v) => {
            t.push("weight blob version ");
            t.dec(u64::from(v));
            t.push(" is not supported (this kernel reads 1, 2 and 3)");
        }
        Error::UnknownDtype(d) => {
            t.push("weight blob dtype code ");
            t.dec(u64::from(d));
            t.push(" is unknown (1 = f32, 2 = f16)");
        }
        Error::BadHeader(what) => {
            t.push("weight blob header invalid: ");
            t.push(what);
        }
        Error::ChecksumMismatch { stored, computed } => {
            t.push("weight blob checksum mismatch: stored ");
            t.hex8(stored);
            t.push(", computed ");
            t.hex8(computed);
            t.push(" (corrupt file?)");
        }
        Error::NonFiniteWeight { tensor, index } => {
            t.push("weight ");
            t.dec(wide(index));
            t.push(NOT_FINITE);
            t.push("tensor ");
            t.dec(wide(tensor));
            t.push(", coupling ");
            t.dec(wide(tensor / 7));
            if let Some(&kind) = clayflow_kernel::arch::COUPLING_TENSORS.get(tensor % 7) {
                t.push(" ");
                tensor_kind(t, kind);
            }
        }
        Error::NonFiniteGlowWeight { step, kind, index } => {
            non_finite(t, index, "step ", step, kind);
        }
        Error::NonFinitePriorWeight { level, kind, index } => {
            non_finite(t, index, "level ", level, kind);
        }
        Error::InvalidInput { index } => {
            t.push("input element ");
            t.dec(wide(index));
            t.push(" is not finite or out of range");
        }
        Error::InvalidArgument(what) => {
            t.push("invalid argument: ");
            t.push(what);
        }
        _ => t.push("kernel error of a kind this page has no text for"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(e: &Error) -> String {
        let mut t = Text::new();
        kernel_error(&mut t, e);
        String::from_utf8(t.as_bytes().to_vec()).unwrap()
    }

    /// Every variant (and every field and tensor kind), against the kernel's `Display`.
    #[test]
    fn messages_equal_the_kernels_display() {
        let mut errors = Vec::new();
        for buffer in [
            Buffer::Input,
            Buffer::Output,
            Buffer::Scratch,
            Buffer::Weights,
            Buffer::Blob,
        ] {
            errors.push(Error::BufferSize {
                buffer,
                needed: 27048,
                got: 0,
            });
        }
        for field in [
            ArchField::Channels,
            ArchField::Size,
            ArchField::Couplings,
            ArchField::Levels,
            ArchField::Mask,
            ArchField::Kernel,
            ArchField::Hidden,
            ArchField::Bits,
            ArchField::LogitAlpha,
            ArchField::ScaleFloor,
            ArchField::Prior,
            ArchField::TooLarge,
        ] {
            errors.push(Error::InvalidArch(field));
        }
        errors.extend([
            Error::Truncated {
                needed: 614_668,
                got: 9,
            },
            Error::TrailingBytes {
                expected: 40,
                got: usize::MAX,
            },
            Error::BadMagic,
            Error::UnsupportedVersion(0),
            Error::UnsupportedVersion(u16::MAX),
            Error::UnknownDtype(7),
            Error::BadHeader("squeeze flag is not 0 or 1"),
            Error::ChecksumMismatch {
                stored: 0,
                computed: 0xdead_beef,
            },
            Error::ChecksumMismatch {
                stored: u32::MAX,
                computed: 0x0012_3abc,
            },
            Error::InvalidInput { index: 783 },
            Error::InvalidArgument("temperature must be finite and >= 0"),
        ]);
        for tensor in 0..15 {
            errors.push(Error::NonFiniteWeight {
                tensor,
                index: 1_000_000 + tensor,
            });
        }
        for kind in clayflow_kernel::arch::STEP_TENSORS {
            errors.push(Error::NonFiniteGlowWeight {
                step: 31,
                kind,
                index: 5,
            });
        }
        errors.push(Error::NonFiniteGlowWeight {
            step: 0,
            kind: TensorKind::ConvWeight(12),
            index: 0,
        });
        for kind in clayflow_kernel::arch::PRIOR_TENSORS
            .into_iter()
            .chain(clayflow_kernel::arch::TOP_TENSORS)
        {
            errors.push(Error::NonFinitePriorWeight {
                level: 2,
                kind,
                index: 303_000,
            });
        }
        for e in &errors {
            assert_eq!(render(e), e.to_string(), "{e:?}");
        }
    }

    #[test]
    fn numbers() {
        let mut t = Text::new();
        for n in [0, 9, 10, 1234567890, u64::MAX] {
            t.clear();
            t.dec(n);
            assert_eq!(t.as_bytes(), n.to_string().as_bytes());
        }
        for n in [0, 1, 0xabcdef, u32::MAX] {
            t.clear();
            t.hex8(n);
            assert_eq!(t.as_bytes(), format!("{n:#010x}").as_bytes());
        }
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        let mut t = Text::new();
        t.push(&"a".repeat(TEXT_CAP - 1));
        t.push("é"); // two bytes, one left: dropped
        assert_eq!(t.as_bytes().len(), TEXT_CAP - 1);
        t.push("bc");
        assert_eq!(t.as_bytes().len(), TEXT_CAP);
        assert!(core::str::from_utf8(t.as_bytes()).is_ok());
        t.dec(5);
        assert_eq!(t.as_bytes().len(), TEXT_CAP);
    }
}
