//! Stubs for targets without the x86-64 kernels: the direct and AVX-512 paths are never
//! selected there.

/// Stub for targets without the x86-64 kernels: the direct path is never selected.
pub(super) mod avx2 {
    pub(in super::super) const MAX_ROWS: usize = 6;

    #[derive(Clone, Copy, Debug)]
    #[allow(dead_code)]
    pub(in super::super) struct Taps {
        pub(in super::super) cin: usize,
        pub(in super::super) k: usize,
        pub(in super::super) plane: usize,
        pub(in super::super) wp: usize,
    }

    pub(in super::super) fn available() -> bool {
        false
    }

    pub(in super::super) fn fwd_rows(
        _: usize,
        _: &[f32],
        _: Taps,
        _: &[f32],
        _: &mut [f32],
        _: usize,
    ) {
        unreachable!("direct conv kernel is only built for x86-64")
    }

    pub(in super::super) fn wgrad_rows(
        _: usize,
        _: &[f32],
        _: Taps,
        _: &[f32],
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("direct conv kernel is only built for x86-64")
    }
}

/// Stub for targets without the x86-64 kernels: the AVX-512 path is never selected.
pub(super) mod avx512 {
    use super::avx2::Taps;
    pub(in super::super) const L: usize = 16;
    pub(in super::super) const FWD_ROWS: usize = 8;
    pub(in super::super) const WG_ROWS: usize = 3;
    pub(in super::super) const CI_ROWS: usize = 4;
    pub(in super::super) const MAX_K: usize = 7;
    pub(in super::super) const SLACK: usize = L;

    pub(in super::super) fn available() -> bool {
        false
    }

    pub(in super::super) fn pad_channels_last(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("AVX-512 conv kernel is only built for x86-64")
    }

    #[allow(clippy::too_many_arguments)]
    pub(in super::super) fn wgrad_ci(
        _: usize,
        _: usize,
        _: usize,
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &[f32],
        _: &mut [f32],
    ) {
        unreachable!("AVX-512 conv kernel is only built for x86-64")
    }

    #[allow(clippy::too_many_arguments)]
    pub(in super::super) fn fwd_rows(
        _: usize,
        _: &[f32],
        _: Taps,
        _: usize,
        _: usize,
        _: &[f32],
        _: &[f32],
        _: bool,
        _: &mut [f32],
    ) {
        unreachable!("AVX-512 conv kernel is only built for x86-64")
    }

    pub(in super::super) fn wgrad_cols(
        _: &[f32],
        _: Taps,
        _: usize,
        _: usize,
        _: &[f32],
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("AVX-512 conv kernel is only built for x86-64")
    }

    #[allow(clippy::too_many_arguments)]
    pub(in super::super) fn wgrad_rows(
        _: usize,
        _: usize,
        _: &[f32],
        _: usize,
        _: Taps,
        _: usize,
        _: &[f32],
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("AVX-512 conv kernel is only built for x86-64")
    }
}

/// Stub for targets without the x86-64 kernels: no bf16 conversions.
pub(super) mod bf16 {
    /// As the x86-64 module's: round to nearest even, subnormals to zero.
    pub(crate) fn round(x: f32) -> f32 {
        if x.is_subnormal() {
            return 0.0f32.copysign(x);
        }
        half::bf16::from_f32(x).to_f32()
    }
}

/// Stub for targets without the x86-64 kernels: no AMX.
pub(super) mod amx {
    pub(in super::super) fn available() -> bool {
        false
    }
}

/// Stub for targets without the x86-64 kernels: the AMX path is never selected.
pub(super) mod amx_conv {
    use super::super::ConvShape;

    pub(in super::super) fn takes(_: &ConvShape) -> bool {
        false
    }

    pub(in super::super) fn forward(
        _: &ConvShape,
        _: &[f32],
        _: &[f32],
        _: &[f32],
        _: bool,
        _: &mut [f32],
    ) {
        unreachable!("AMX conv kernel is only built for x86-64")
    }

    pub(in super::super) fn backward_data(_: &ConvShape, _: &[f32], _: &[f32], _: &mut [f32]) {
        unreachable!("AMX conv kernel is only built for x86-64")
    }

    #[rustfmt::skip]
    pub(in super::super) fn backward_weight(_: &ConvShape, _: &[f32], _: &[f32], _: &mut [f32], _: &mut [f32]) {
        unreachable!("AMX conv kernel is only built for x86-64")
    }
}
