//! [`Convolution`] on the CUDA backend: the tiled and implicit-GEMM conv kernels, and the
//! conv-only launch helpers.

use super::{int, CudaBackend, KernelDevice, LaunchCfg, Param, BLOCK, MAX_GRID_YZ};
use crate::backend::check::{self, expect_len};
use crate::backend::{BackendError, Buffer, ConvShape, Convolution, Memory, Result};

/// Output channels per conv block for an op whose output has `m` channels.
fn tco(m: usize) -> usize {
    match m {
        0..=4 => 4,
        5..=8 => 8,
        _ => 16,
    }
}

fn conv_name(kind: &str, t: usize) -> &'static str {
    match (kind, t) {
        ("fwd", 4) => "cf_conv_fwd_c4",
        ("fwd", 8) => "cf_conv_fwd_c8",
        ("fwd", _) => "cf_conv_fwd_c16",
        ("bwd_data", 4) => "cf_conv_bwd_data_c4",
        ("bwd_data", 8) => "cf_conv_bwd_data_c8",
        ("bwd_data", _) => "cf_conv_bwd_data_c16",
        (_, 4) => "cf_conv_bwd_weight_c4",
        (_, 8) => "cf_conv_bwd_weight_c8",
        _ => "cf_conv_bwd_weight_c16",
    }
}

/// The six shape arguments every conv kernel takes first: batch, cin, cout, height, width,
/// kernel (each checked to fit an `int`).
fn conv_dims(op: &'static str, s: &ConvShape) -> Result<[Param; 6]> {
    Ok([
        int(op, "batch", s.batch)?,
        int(op, "cin", s.cin)?,
        int(op, "cout", s.cout)?,
        int(op, "height", s.height)?,
        int(op, "width", s.width)?,
        int(op, "kernel", s.kernel)?,
    ])
}

/// Launch shape of the tiled conv body (forward, and backward-data with the roles of cin and
/// cout swapped): one block per 16x16 output tile, per `t` of the `outs` output channels and
/// per image. Returns the config and `cic`, the input channels staged in shared memory per
/// step: each needs a (15+k)^2 input patch plus its k*k*t weights, in 12288 floats (48 KiB).
fn tile_launch(s: &ConvShape, outs: usize, t: usize) -> (LaunchCfg, usize) {
    let k = s.kernel;
    let per_ci = (15 + k) * (15 + k) + k * k * t;
    let cic = (12288 / per_ci).min(8);
    let tiles = s.width.div_ceil(16) * s.height.div_ceil(16);
    let cfg = LaunchCfg {
        grid: (tiles as u32, outs.div_ceil(t) as u32, s.batch as u32),
        block: (16, 8, 1),
        shared_bytes: (4 * cic * per_ci) as u32,
    };
    (cfg, cic)
}

/// Images of at most this many pixels run as implicit GEMMs: a 16x16 tile would leave at least
/// 75% of its threads idle (7x7: 81%, 4x4: 94%).
const GEMM_MAX_PLANE: usize = 64;

/// Whether the forward / backward-data convolution runs as an implicit GEMM over the batch's
/// pixels (`cf_conv_gemm_m*`) rather than in 16x16 tiles: every 1x1 convolution, and small
/// images.
fn conv_as_gemm(s: &ConvShape) -> bool {
    s.kernel == 1 || s.height * s.width <= GEMM_MAX_PLANE
}

/// Whether the weight gradient runs as a GEMM (`cf_conv_gemm_wgrad`): as above, and whenever
/// the tiled kernel would keep fewer than half of its 256 threads busy (one thread per
/// (input channel, tap) of a block's `min(cin, 16, 256 / k^2)` channels).
fn wgrad_as_gemm(s: &ConvShape) -> bool {
    let kk = s.kernel * s.kernel;
    conv_as_gemm(s) || s.cin.min(16).min(256 / kk).max(1) * kk < 128
}

/// Launch of an implicit-GEMM convolution with `m` output rows over the `batch * plane`
/// pixels: the kernel name and its configuration.
fn gemm_launch(s: &ConvShape, m: usize) -> (&'static str, LaunchCfg) {
    let (name, tm) = if m <= 16 {
        ("cf_conv_gemm_m16", 16)
    } else {
        ("cf_conv_gemm_m64", 64)
    };
    let pixels = s.batch * s.height * s.width;
    let cfg = LaunchCfg {
        grid: (pixels.div_ceil(4096 / tm) as u32, m.div_ceil(tm) as u32, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    };
    (name, cfg)
}

/// Checks a conv shape against the kernels' limits.
fn check_conv(op: &'static str, s: &ConvShape) -> Result<()> {
    if s.kernel.is_multiple_of(2) || !(1..=15).contains(&s.kernel) {
        return Err(BackendError::Device(format!(
            "{op}: kernel size {} is not supported by the CUDA kernels (odd sizes 1..=15)",
            s.kernel
        )));
    }
    if s.batch > MAX_GRID_YZ || s.cout.max(s.cin).div_ceil(4) > MAX_GRID_YZ {
        return Err(BackendError::Device(format!(
            "{op}: batch {} or {} channels exceed the CUDA grid limit {MAX_GRID_YZ}; use a \
             smaller batch",
            s.batch,
            s.cout.max(s.cin)
        )));
    }
    for (what, v) in [
        ("input length", s.input_len()),
        ("output length", s.output_len()),
        ("weight length", s.weight_len()),
    ] {
        int(op, what, v)?;
    }
    Ok(())
}

impl<D: KernelDevice> CudaBackend<D> {
    /// `conv_backward_weight` (checked, non-empty) as a GEMM over the batch's pixels in
    /// 64 x 64 output tiles of `cout x (cin * k * k)`, the pixels split into chunks so that
    /// about 264 blocks run, then the chunks summed in order (`cf_conv_gemm_wgrad`,
    /// `cf_conv_bwd_weight_reduce`).
    fn gemm_backward_weight(
        &self,
        s: &ConvShape,
        x: &Buffer,
        dy: &Buffer,
        dw: &mut Buffer,
        db: &mut Buffer,
    ) -> Result<()> {
        let op = "conv_backward_weight";
        let pixels = s.batch * s.height * s.width;
        let (gx, gy) = (
            s.cout.div_ceil(64),
            (s.cin * s.kernel * s.kernel).div_ceil(64),
        );
        let n0 = 264usize
            .div_ceil(gx * gy)
            .clamp(1, pixels.div_ceil(64).max(1))
            .min(MAX_GRID_YZ);
        let per_chunk = pixels.div_ceil(n0);
        let nchunks = pixels.div_ceil(per_chunk);
        let wlen = s.weight_len();
        let part_len = nchunks * (wlen + s.cout);
        int(op, "partial length", part_len)?;
        let mut part = self.take_scratch("conv_backward_weight", part_len)?;
        let r = (|| {
            let cfg = LaunchCfg {
                grid: (gx as u32, gy as u32, nchunks as u32),
                block: (BLOCK, 1, 1),
                shared_bytes: 0,
            };
            let mut p = conv_dims(op, s)?.to_vec();
            p.extend([
                int(op, "pixels per chunk", per_chunk)?,
                Param::Ptr(self.dev.ptr(x)?),
                Param::Ptr(self.dev.ptr(dy)?),
                Param::Ptr(self.dev.ptr_mut(&mut part)?),
            ]);
            self.dev.launch("cf_conv_gemm_wgrad", cfg, &p)?;
            let cfg = LaunchCfg {
                grid: ((wlen + s.cout).div_ceil(256) as u32, 1, 1),
                block: (BLOCK, 1, 1),
                shared_bytes: 0,
            };
            let p = [
                int(op, "chunks", nchunks)?,
                int(op, "weight length", wlen)?,
                int(op, "cout", s.cout)?,
                Param::Ptr(self.dev.ptr(&part)?),
                Param::Ptr(self.dev.ptr_mut(dw)?),
                Param::Ptr(self.dev.ptr_mut(db)?),
            ];
            self.dev.launch("cf_conv_bwd_weight_reduce", cfg, &p)
        })();
        self.put_scratch("conv_backward_weight", part);
        r
    }
}

impl<D: KernelDevice> Convolution for CudaBackend<D> {
    fn conv_forward(
        &self,
        s: &ConvShape,
        x: &Buffer,
        w: &Buffer,
        b: &Buffer,
        relu: bool,
        y: &mut Buffer,
    ) -> Result<()> {
        let op = "conv_forward";
        check::conv_forward(s, x, w, b, y)?;
        check_conv(op, s)?;
        if s.output_len() == 0 {
            return Ok(());
        }
        if conv_as_gemm(s) {
            // A GEMM over the batch's pixels: no tile straddles an image border.
            let (name, cfg) = gemm_launch(s, s.cout);
            let mut p = conv_dims(op, s)?.to_vec();
            p.extend([
                Param::I32(0),
                Param::Ptr(self.dev.ptr(x)?),
                Param::Ptr(self.dev.ptr(w)?),
                Param::Ptr(self.dev.ptr(b)?),
                Param::I32(i32::from(relu)),
                Param::Ptr(self.dev.ptr_mut(y)?),
            ]);
            return self.dev.launch(name, cfg, &p);
        }
        let t = tco(s.cout);
        let (cfg, cic) = tile_launch(s, s.cout, t);
        let mut p = conv_dims(op, s)?.to_vec();
        p.extend([
            int(op, "cic", cic)?,
            Param::Ptr(self.dev.ptr(x)?),
            Param::Ptr(self.dev.ptr(w)?),
            Param::Ptr(self.dev.ptr(b)?),
            Param::I32(i32::from(relu)),
            Param::Ptr(self.dev.ptr_mut(y)?),
        ]);
        self.dev.launch(conv_name("fwd", t), cfg, &p)
    }

    fn conv_backward_data(
        &self,
        s: &ConvShape,
        dy: &Buffer,
        w: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        let op = "conv_backward_data";
        check::conv_backward_data(s, dy, w, dx)?;
        check_conv(op, s)?;
        if s.input_len() == 0 {
            return Ok(());
        }
        if s.cout == 0 {
            // No output channels: nothing flows back.
            return self.fill(dx, 0.0);
        }
        if conv_as_gemm(s) {
            // dx = the GEMM with the weights flipped and transposed.
            let (name, cfg) = gemm_launch(s, s.cin);
            let mut p = conv_dims(op, s)?.to_vec();
            p.extend([
                Param::I32(1),
                Param::Ptr(self.dev.ptr(dy)?),
                Param::Ptr(self.dev.ptr(w)?),
                Param::Ptr(0),
                Param::I32(0),
                Param::Ptr(self.dev.ptr_mut(dx)?),
            ]);
            return self.dev.launch(name, cfg, &p);
        }
        // The forward kernel's body with flipped, transposed weights: TCO by cin, reducing
        // over cout.
        let t = tco(s.cin);
        let (cfg, cic) = tile_launch(s, s.cin, t);
        let mut p = conv_dims(op, s)?.to_vec();
        p.extend([
            int(op, "cic", cic)?,
            Param::Ptr(self.dev.ptr(dy)?),
            Param::Ptr(self.dev.ptr(w)?),
            Param::Ptr(self.dev.ptr_mut(dx)?),
        ]);
        self.dev.launch(conv_name("bwd_data", t), cfg, &p)
    }

    fn conv_backward_weight(
        &self,
        s: &ConvShape,
        x: &Buffer,
        dy: &Buffer,
        dw: &mut Buffer,
        db: &mut Buffer,
    ) -> Result<()> {
        let op = "conv_backward_weight";
        check::conv_backward_weight(s, x, dy, dw, db)?;
        check_conv(op, s)?;
        if s.cout == 0 {
            return Ok(());
        }
        if s.batch == 0 || s.height * s.width == 0 {
            // Empty sums: both gradients are zero (they are overwritten).
            self.fill(dw, 0.0)?;
            return self.fill(db, 0.0);
        }
        if s.cin == 0 {
            return Err(BackendError::Device(format!(
                "{op}: a convolution with 0 input channels is not supported by the CUDA kernels"
            )));
        }
        if wgrad_as_gemm(s) {
            return self.gemm_backward_weight(s, x, dy, dw, db);
        }
        let (k, t) = (s.kernel, tco(s.cout));
        let cit = s.cin.min(16).min(256 / (k * k)).max(1);
        // Deterministic chunking of the batch: about 264 blocks in all, whole images per chunk.
        let gx = s.cin.div_ceil(cit);
        let gy = s.cout.div_ceil(t);
        let n0 = 264usize.div_ceil(gx * gy).clamp(1, s.batch);
        let imgs_per_chunk = s.batch.div_ceil(n0);
        let nchunks = s.batch.div_ceil(imgs_per_chunk);
        let wlen = s.weight_len();
        let part_len = nchunks * (wlen + s.cout);
        int(op, "partial length", part_len)?;
        let mut part = self.take_scratch("conv_backward_weight", part_len)?;
        let cfg = LaunchCfg {
            grid: (gx as u32, gy as u32, nchunks as u32),
            block: (BLOCK, 1, 1),
            shared_bytes: (4 * (cit * (15 + k) * (15 + k) + 256 * t)) as u32,
        };
        let mut p = conv_dims(op, s)?.to_vec();
        p.extend([
            int(op, "cit", cit)?,
            int(op, "images per chunk", imgs_per_chunk)?,
            Param::Ptr(self.dev.ptr(x)?),
            Param::Ptr(self.dev.ptr(dy)?),
            Param::Ptr(self.dev.ptr_mut(&mut part)?),
        ]);
        let r = self.dev.launch(conv_name("bwd_weight", t), cfg, &p);
        let r = r.and_then(|()| {
            let cfg = LaunchCfg {
                grid: ((wlen + s.cout).div_ceil(256) as u32, 1, 1),
                block: (BLOCK, 1, 1),
                shared_bytes: 0,
            };
            let p = [
                int(op, "chunks", nchunks)?,
                int(op, "weight length", wlen)?,
                int(op, "cout", s.cout)?,
                Param::Ptr(self.dev.ptr(&part)?),
                Param::Ptr(self.dev.ptr_mut(dw)?),
                Param::Ptr(self.dev.ptr_mut(db)?),
            ];
            self.dev.launch("cf_conv_bwd_weight_reduce", cfg, &p)
        });
        self.put_scratch("conv_backward_weight", part);
        r
    }

    fn relu_backward(&self, y: &Buffer, dy: &mut Buffer) -> Result<()> {
        let op = "relu_backward";
        let n = y.len();
        expect_len(op, "dy", dy, n)?;
        let p = [
            int(op, "length", n)?,
            Param::Ptr(self.dev.ptr(y)?),
            Param::Ptr(self.dev.ptr_mut(dy)?),
        ];
        self.launch_ew("cf_relu_backward", n, &p)
    }
}
