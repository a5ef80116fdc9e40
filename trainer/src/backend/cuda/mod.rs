//! The CUDA backend: the flow's ops as custom kernels (`cuda/kernels/*.cu`) launched on a
//! [`KernelDevice`] — the real GPU through cudarc ([`gpu::CudaDevice`]), or the host simulator
//! of the `clayflow-cuda-sim` crate in tests, which runs the very same kernel sources and this
//! very same orchestration on the CPU.
//!
//! Every launch follows `cuda/KERNELS.md` (signatures, launch geometry, scratch buffers); the
//! comments below name the kernel and the formula. Sizes are checked here, before any launch:
//! a kernel never sees a wrong length, an element count of 2^31 or more, or an empty grid.

pub mod device;
pub mod gpu;

pub use device::{KernelDevice, LaunchCfg, Param};

use super::check;
use super::{expect_len, AdamStep, Backend, BackendError, Buffer, ConvShape, Result, Shape4};
use clayflow_kernel::Mask;
use std::collections::HashMap;
use std::sync::Mutex;

/// Threads per block of the elementwise and per-image kernels.
const BLOCK: u32 = 256;

/// Largest grid y / z dimension.
const MAX_GRID_YZ: usize = 65_535;

/// [`Backend`] on a [`KernelDevice`].
#[derive(Debug)]
pub struct CudaBackend<D: KernelDevice> {
    dev: D,
    /// Scratch buffers by (purpose, exact length), reused across calls. Kernels write every
    /// element they later read, so stale contents never matter.
    scratch: Mutex<HashMap<(&'static str, usize), Buffer>>,
}

/// An `int` kernel parameter from a size, or an error when it does not fit.
fn int(op: &'static str, what: &str, v: usize) -> Result<Param> {
    i32::try_from(v).map(Param::I32).map_err(|_| {
        BackendError::Device(format!(
            "{op}: {what} = {v} is too large for the CUDA kernels (limit 2^31 - 1); use a \
             smaller batch"
        ))
    })
}

/// The "EW launch" of KERNELS.md: 256 threads, `min(ceil(n / 256), 4096)` blocks.
fn ew(n: usize) -> LaunchCfg {
    LaunchCfg {
        grid: (n.div_ceil(BLOCK as usize).min(4096) as u32, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

/// One block of 256 threads per image.
fn per_image(batch: usize) -> LaunchCfg {
    LaunchCfg {
        grid: (batch as u32, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

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

/// Sum of `(hi, lo)` float pairs in order, in f64 (see KERNELS.md: each pair is one block's
/// f64 sum split into two floats).
fn sum_hi_lo(pairs: &[f32]) -> f64 {
    pairs
        .chunks_exact(2)
        .map(|p| f64::from(p[0]) + f64::from(p[1]))
        .sum()
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
    /// A backend on `dev`.
    pub fn new(dev: D) -> Self {
        CudaBackend {
            dev,
            scratch: Mutex::new(HashMap::new()),
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// A scratch buffer of exactly `len` floats for `purpose` (contents unspecified).
    fn take_scratch(&self, purpose: &'static str, len: usize) -> Result<Buffer> {
        let cached = self
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(purpose, len));
        match cached {
            Some(b) => Ok(b),
            None => self.dev.alloc_zeros(len),
        }
    }

    fn put_scratch(&self, purpose: &'static str, buf: Buffer) {
        let len = buf.len();
        self.scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((purpose, len), buf);
    }

    /// Launches an elementwise kernel over `n` elements (skipped when `n == 0`).
    fn launch_ew(&self, name: &'static str, n: usize, params: &[Param]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.dev.launch(name, ew(n), params)
    }
}

impl<D: KernelDevice> Backend for CudaBackend<D> {
    fn name(&self) -> String {
        self.dev.name()
    }

    fn zeros(&self, len: usize) -> Result<Buffer> {
        self.dev.alloc_zeros(len)
    }

    fn upload(&self, data: &[f32]) -> Result<Buffer> {
        self.dev.upload(data)
    }

    fn download(&self, buf: &Buffer) -> Result<Vec<f32>> {
        self.dev.download(buf)
    }

    fn copy(&self, src: &Buffer, dst: &mut Buffer) -> Result<()> {
        let op = "copy";
        let n = src.len();
        expect_len(op, "dst", dst, n)?;
        let p = [
            int(op, "length", n)?,
            Param::Ptr(self.dev.ptr(src)?),
            Param::Ptr(self.dev.ptr_mut(dst)?),
        ];
        self.launch_ew("cf_copy", n, &p)
    }

    fn fill(&self, buf: &mut Buffer, value: f32) -> Result<()> {
        let n = buf.len();
        let p = [
            int("fill", "length", n)?,
            Param::F32(value),
            Param::Ptr(self.dev.ptr_mut(buf)?),
        ];
        self.launch_ew("cf_fill", n, &p)
    }

    fn axpy(&self, a: f32, x: &Buffer, y: &mut Buffer) -> Result<()> {
        let op = "axpy";
        let n = x.len();
        expect_len(op, "y", y, n)?;
        let p = [
            int(op, "length", n)?,
            Param::F32(a),
            Param::Ptr(self.dev.ptr(x)?),
            Param::Ptr(self.dev.ptr_mut(y)?),
        ];
        self.launch_ew("cf_axpy", n, &p)
    }

    fn sum_squares(&self, x: &Buffer) -> Result<f64> {
        self.sum_squares_all(std::slice::from_ref(x))
    }

    fn sum_squares_all(&self, xs: &[Buffer]) -> Result<f64> {
        let op = "sum_squares";
        // Block counts G = clamp(ceil(n / 4096), 1, 1024) per buffer; every block writes the
        // (hi, lo) pair of its f64 sum. All buffers' pairs go to one scratch buffer (each
        // launch gets the address of its own slice), so one download serves them all.
        let blocks: Vec<usize> = xs
            .iter()
            .map(|x| match x.len() {
                0 => 0,
                n => n.div_ceil(4096).clamp(1, 1024),
            })
            .collect();
        let total: usize = blocks.iter().sum();
        if total == 0 {
            return Ok(0.0);
        }
        let mut part = self.take_scratch("sum_squares", 2 * total)?;
        let r = (|| {
            let base = self.dev.ptr_mut(&mut part)?;
            let mut offset = 0u64;
            for (x, &g) in xs.iter().zip(&blocks) {
                if g == 0 {
                    continue;
                }
                let p = [
                    int(op, "length", x.len())?,
                    Param::Ptr(self.dev.ptr(x)?),
                    // 4 bytes per float: the pairs of this buffer's blocks.
                    Param::Ptr(base + offset * 4),
                ];
                let cfg = LaunchCfg {
                    grid: (g as u32, 1, 1),
                    block: (BLOCK, 1, 1),
                    shared_bytes: 0,
                };
                self.dev.launch("cf_sum_squares_partial", cfg, &p)?;
                offset += 2 * g as u64;
            }
            self.dev.download(&part)
        })();
        self.put_scratch("sum_squares", part);
        let host = r?;
        // Per buffer in order, then added in order: what the per-buffer calls would give.
        let mut total = 0.0;
        let mut at = 0;
        for g in blocks {
            total += sum_hi_lo(&host[at..at + 2 * g]);
            at += 2 * g;
        }
        Ok(total)
    }

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

    fn logit_forward(
        &self,
        shape: Shape4,
        alpha: f32,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()> {
        let op = "logit_forward";
        check::logit_forward(shape, x, log_det)?;
        int(op, "length", shape.len())?;
        if shape.is_empty() {
            return Ok(());
        }
        let p = [
            int(op, "image length", shape.image_len())?,
            Param::F32(alpha),
            Param::Ptr(self.dev.ptr_mut(x)?),
            Param::Ptr(self.dev.ptr_mut(log_det)?),
        ];
        self.dev
            .launch("cf_logit_forward", per_image(shape.batch), &p)
    }

    fn logit_inverse(&self, alpha: f32, x: &mut Buffer) -> Result<()> {
        let n = x.len();
        let p = [
            int("logit_inverse", "length", n)?,
            Param::F32(alpha),
            Param::Ptr(self.dev.ptr_mut(x)?),
        ];
        self.launch_ew("cf_logit_inverse", n, &p)
    }

    fn squeeze(&self, shape: Shape4, inverse: bool, x: &Buffer, y: &mut Buffer) -> Result<()> {
        let op = "squeeze";
        check::squeeze(shape, x, y)?;
        if !shape.height.is_multiple_of(2) || !shape.width.is_multiple_of(2) {
            return Err(BackendError::Device(format!(
                "squeeze: a {}x{} image cannot be squeezed (height and width must be even)",
                shape.height, shape.width
            )));
        }
        let n = shape.len();
        int(op, "length", n)?;
        let p = [
            int(op, "batch", shape.batch)?,
            int(op, "channels", shape.channels)?,
            int(op, "height", shape.height)?,
            int(op, "width", shape.width)?,
            Param::I32(i32::from(inverse)),
            Param::Ptr(self.dev.ptr(x)?),
            Param::Ptr(self.dev.ptr_mut(y)?),
        ];
        self.launch_ew("cf_squeeze", n, &p)
    }

    fn mask_gather(
        &self,
        shape: Shape4,
        mask: Mask,
        x: &Buffer,
        cnn_in: &mut Buffer,
    ) -> Result<()> {
        let op = "mask_gather";
        let (_, cin) = mask.split_channels(shape.channels);
        let n = shape.batch * cin * shape.plane();
        check::mask_gather(shape, mask, x, cnn_in)?;
        int(op, "length", shape.len())?;
        let p = [
            int(op, "batch", shape.batch)?,
            int(op, "channels", shape.channels)?,
            int(op, "height", shape.height)?,
            int(op, "width", shape.width)?,
            Param::I32(i32::from(mask as u8)),
            Param::Ptr(self.dev.ptr(x)?),
            Param::Ptr(self.dev.ptr_mut(cnn_in)?),
        ];
        self.launch_ew("cf_mask_gather", n, &p)
    }

    fn mask_scatter_add(
        &self,
        shape: Shape4,
        mask: Mask,
        d_cnn_in: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        let op = "mask_scatter_add";
        let (_, cin) = mask.split_channels(shape.channels);
        let n = shape.batch * cin * shape.plane();
        check::mask_scatter_add(shape, mask, d_cnn_in, dx)?;
        int(op, "length", shape.len())?;
        let p = [
            int(op, "batch", shape.batch)?,
            int(op, "channels", shape.channels)?,
            int(op, "height", shape.height)?,
            int(op, "width", shape.width)?,
            Param::I32(i32::from(mask as u8)),
            Param::Ptr(self.dev.ptr(d_cnn_in)?),
            Param::Ptr(self.dev.ptr_mut(dx)?),
        ];
        self.launch_ew("cf_mask_scatter_add", n, &p)
    }

    fn coupling_forward(
        &self,
        shape: Shape4,
        mask: Mask,
        st: &Buffer,
        scale: &Buffer,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()> {
        let op = "coupling_forward";
        let (cc, _) = mask.split_channels(shape.channels);
        let p = shape.plane();
        check::coupling(op, shape, mask, ("x", x), st, scale, Some(log_det))?;
        int(op, "length", shape.len().max(st.len()))?;
        if shape.batch == 0 || cc * p == 0 {
            // Nothing changes and the log-dets gain 0.
            return Ok(());
        }
        let params = [
            int(op, "channels", shape.channels)?,
            int(op, "height", shape.height)?,
            int(op, "width", shape.width)?,
            Param::I32(i32::from(mask as u8)),
            Param::Ptr(self.dev.ptr(st)?),
            Param::Ptr(self.dev.ptr(scale)?),
            Param::Ptr(self.dev.ptr_mut(x)?),
            Param::Ptr(self.dev.ptr_mut(log_det)?),
        ];
        self.dev
            .launch("cf_coupling_forward", per_image(shape.batch), &params)
    }

    fn coupling_inverse(
        &self,
        shape: Shape4,
        mask: Mask,
        st: &Buffer,
        scale: &Buffer,
        y: &mut Buffer,
    ) -> Result<()> {
        let op = "coupling_inverse";
        let (cc, _) = mask.split_channels(shape.channels);
        let p = shape.plane();
        check::coupling(op, shape, mask, ("y", y), st, scale, None)?;
        int(op, "length", shape.len().max(st.len()))?;
        let params = [
            int(op, "batch", shape.batch)?,
            int(op, "channels", shape.channels)?,
            int(op, "height", shape.height)?,
            int(op, "width", shape.width)?,
            Param::I32(i32::from(mask as u8)),
            Param::Ptr(self.dev.ptr(st)?),
            Param::Ptr(self.dev.ptr(scale)?),
            Param::Ptr(self.dev.ptr_mut(y)?),
        ];
        self.launch_ew("cf_coupling_inverse", shape.batch * cc * p, &params)
    }

    fn coupling_backward(
        &self,
        shape: Shape4,
        mask: Mask,
        x: &Buffer,
        st: &Buffer,
        scale: &Buffer,
        g_log_det: f32,
        dy: &mut Buffer,
        d_st: &mut Buffer,
        d_scale: &mut Buffer,
    ) -> Result<()> {
        let op = "coupling_backward";
        let (cc, _) = mask.split_channels(shape.channels);
        let p = shape.plane();
        check::coupling_backward(shape, mask, x, st, scale, dy, d_st, d_scale)?;
        int(op, "length", shape.len().max(st.len()))?;
        if shape.batch == 0 || cc * p == 0 {
            // The identity: dy passes through, d_st is empty, d_scale gains 0.
            return Ok(());
        }
        // Pass 1: dy (changed elements), all of d_st, and per-image d_scale partials.
        let mut part = self.take_scratch("coupling_backward", shape.batch * cc)?;
        let params = [
            int(op, "channels", shape.channels)?,
            int(op, "height", shape.height)?,
            int(op, "width", shape.width)?,
            Param::I32(i32::from(mask as u8)),
            Param::F32(g_log_det),
            Param::Ptr(self.dev.ptr(x)?),
            Param::Ptr(self.dev.ptr(st)?),
            Param::Ptr(self.dev.ptr(scale)?),
            Param::Ptr(self.dev.ptr_mut(dy)?),
            Param::Ptr(self.dev.ptr_mut(d_st)?),
            Param::Ptr(self.dev.ptr_mut(&mut part)?),
        ];
        let r = self
            .dev
            .launch("cf_coupling_backward", per_image(shape.batch), &params)
            .and_then(|()| {
                // Pass 2: d_scale[j] += part[0][j] + part[1][j] + ... in image order (f32),
                // exactly the CPU backend's accumulation.
                let cfg = LaunchCfg {
                    grid: (cc.div_ceil(256) as u32, 1, 1),
                    block: (BLOCK, 1, 1),
                    shared_bytes: 0,
                };
                let params = [
                    int(op, "batch", shape.batch)?,
                    int(op, "changed channels", cc)?,
                    Param::Ptr(self.dev.ptr(&part)?),
                    Param::Ptr(self.dev.ptr_mut(d_scale)?),
                ];
                self.dev.launch("cf_col_sum_add", cfg, &params)
            });
        self.put_scratch("coupling_backward", part);
        r
    }

    fn per_image_sum_squares(&self, shape: Shape4, z: &Buffer) -> Result<Vec<f64>> {
        let op = "per_image_sum_squares";
        expect_len(op, "z", z, shape.len())?;
        int(op, "length", shape.len())?;
        if shape.is_empty() {
            return Ok(vec![0.0; shape.batch]);
        }
        let mut part = self.take_scratch("per_image_sum_squares", 2 * shape.batch)?;
        let p = [
            int(op, "image length", shape.image_len())?,
            Param::Ptr(self.dev.ptr(z)?),
            Param::Ptr(self.dev.ptr_mut(&mut part)?),
        ];
        let r = self
            .dev
            .launch("cf_per_image_sum_squares", per_image(shape.batch), &p)
            .and_then(|()| self.dev.download(&part));
        self.put_scratch("per_image_sum_squares", part);
        Ok(r?.chunks_exact(2).map(sum_hi_lo).collect())
    }

    fn adam(
        &self,
        hp: &AdamStep,
        param: &mut Buffer,
        grad: &Buffer,
        m: &mut Buffer,
        v: &mut Buffer,
    ) -> Result<()> {
        let op = "adam";
        let n = param.len();
        check::adam(param, grad, m, v)?;
        // Bias corrections in f32 exactly as the CPU backend computes them.
        let t = hp.step.max(1) as i32;
        let bc1 = 1.0 - hp.beta1.powi(t);
        let bc2 = 1.0 - hp.beta2.powi(t);
        let step = hp.lr / bc1;
        let p = [
            int(op, "length", n)?,
            Param::F32(step),
            Param::F32(hp.beta1),
            Param::F32(hp.beta2),
            Param::F32(hp.eps),
            Param::F32(bc2),
            Param::F32(hp.grad_scale),
            Param::Ptr(self.dev.ptr_mut(param)?),
            Param::Ptr(self.dev.ptr(grad)?),
            Param::Ptr(self.dev.ptr_mut(m)?),
            Param::Ptr(self.dev.ptr_mut(v)?),
        ];
        self.launch_ew("cf_adam", n, &p)
    }
}
