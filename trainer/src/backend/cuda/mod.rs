//! The CUDA backend: the flow's ops as custom kernels (`cuda/kernels/*.cu`) launched on a
//! [`KernelDevice`] — the real GPU through cudarc ([`gpu::CudaDevice`]), or the host simulator
//! of the `clayflow-cuda-sim` crate in tests, which runs the very same kernel sources and this
//! very same orchestration on the CPU.
//!
//! Every launch follows `cuda/KERNELS.md` (signatures, launch geometry, scratch buffers); the
//! comments below name the kernel and the formula. Sizes are checked here, before any launch:
//! a kernel never sees a wrong length, an element count of 2^31 or more, or an empty grid.

pub mod compile;
pub mod device;
pub mod gpu;

pub use device::{KernelDevice, LaunchCfg, Param};

use super::check::{self, check_actnorm, check_adam_all, check_lu, expect_len};
use super::{
    AdamStep, Backend, BackendError, Buffer, ConvShape, Convolution, CouplingScale, FlowLayers,
    LuFactors, Memory, Optimiser, Result, Shape4,
};
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
    /// Task tables of the multi-tensor kernels by purpose: the u64 words and the device
    /// buffer holding them. A training run passes the same parameter, gradient and moment
    /// buffers every step, so the table is uploaded once and reused.
    tables: Mutex<HashMap<&'static str, (Vec<u64>, Buffer)>>,
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

/// Blocks of the per-channel reductions (ActNorm): `(images per chunk, chunks)` so that about
/// 264 blocks of (channel, chunk of images) run, whole images per chunk; depends only on the
/// shape, so results are deterministic.
fn channel_chunks(c: usize, batch: usize) -> (usize, usize) {
    let n0 = 264usize.div_ceil(c.max(1)).clamp(1, batch.max(1));
    let per = batch.div_ceil(n0).max(1);
    (per, batch.div_ceil(per))
}

/// Largest channel count of the invertible 1x1 convolution's inverse kernel: one column's
/// f64 working vector must fit the 48 KiB of shared memory.
const MAX_INVCONV_CHANNELS: usize = 6144;

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
    /// A backend on `dev`.
    pub fn new(dev: D) -> Self {
        CudaBackend {
            dev,
            scratch: Mutex::new(HashMap::new()),
            tables: Mutex::new(HashMap::new()),
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

    /// The device address of a task table holding `words` for `purpose`: the cached one when
    /// the words are unchanged, else a new upload (u64 words as pairs of f32 bit patterns,
    /// little-endian, which no kernel treats as floats).
    fn task_table(&self, purpose: &'static str, words: Vec<u64>) -> Result<u64> {
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached, buf)) = tables.get(purpose) {
            if *cached == words {
                return self.dev.ptr(buf);
            }
        }
        let bits: Vec<f32> = words
            .iter()
            .flat_map(|&w| [f32::from_bits(w as u32), f32::from_bits((w >> 32) as u32)])
            .collect();
        let buf = self.dev.upload(&bits)?;
        let ptr = self.dev.ptr(&buf)?;
        tables.insert(purpose, (words, buf));
        Ok(ptr)
    }

    /// The `scale` pointer of a coupling kernel: the learned scale (tanh) or null (Glow's
    /// sigmoid reads none).
    fn scale_ptr(&self, scale: CouplingScale<'_>) -> Result<Param> {
        Ok(Param::Ptr(match scale {
            CouplingScale::Tanh(b) => self.dev.ptr(b)?,
            CouplingScale::Sigmoid => 0,
        }))
    }

    /// The five factor pointers, in the invconv kernels' parameter order.
    fn lu_ptrs(&self, lu: &LuFactors<'_>) -> Result<[Param; 5]> {
        Ok([
            Param::Ptr(self.dev.ptr(lu.perm)?),
            Param::Ptr(self.dev.ptr(lu.sign)?),
            Param::Ptr(self.dev.ptr(lu.lower)?),
            Param::Ptr(self.dev.ptr(lu.upper)?),
            Param::Ptr(self.dev.ptr(lu.log_s)?),
        ])
    }

    /// Runs `cf_actnorm_sums` then `cf_actnorm_finish` (KERNELS.md, glow.cu) in `mode` 0
    /// (statistics into `out0 = logs`, `out1 = bias`) or 1 (backward: `dy` scaled in place,
    /// `out0 = d_logs`, `out1 = d_bias` accumulated).
    #[allow(clippy::too_many_arguments)]
    fn actnorm_reduce(
        &self,
        op: &'static str,
        shape: Shape4,
        mode: i32,
        x: &Buffer,
        logs: Option<&Buffer>,
        dy: Option<&mut Buffer>,
        g_log_det: f32,
        out0: &mut Buffer,
        out1: &mut Buffer,
    ) -> Result<()> {
        let c = shape.channels;
        int(op, "length", shape.len())?;
        if c == 0 {
            return Ok(());
        }
        if shape.batch > MAX_GRID_YZ {
            return Err(BackendError::Device(format!(
                "{op}: batch {} exceeds the CUDA grid limit {MAX_GRID_YZ}; use a smaller batch",
                shape.batch
            )));
        }
        let count = shape.batch * shape.plane();
        let (per, nchunks) = if count == 0 {
            (1, 0)
        } else {
            channel_chunks(c, shape.batch)
        };
        let mut part = self.take_scratch("actnorm", (4 * c * nchunks).max(1))?;
        let r = (|| {
            if nchunks > 0 {
                let cfg = LaunchCfg {
                    grid: (c as u32, nchunks as u32, 1),
                    block: (BLOCK, 1, 1),
                    shared_bytes: 0,
                };
                let p = [
                    int(op, "batch", shape.batch)?,
                    int(op, "channels", c)?,
                    int(op, "plane", shape.plane())?,
                    int(op, "images per chunk", per)?,
                    Param::I32(mode),
                    Param::Ptr(self.dev.ptr(x)?),
                    Param::Ptr(match logs {
                        Some(l) => self.dev.ptr(l)?,
                        None => 0,
                    }),
                    Param::Ptr(match dy {
                        Some(d) => self.dev.ptr_mut(d)?,
                        None => 0,
                    }),
                    Param::Ptr(self.dev.ptr_mut(&mut part)?),
                ];
                self.dev.launch("cf_actnorm_sums", cfg, &p)?;
            }
            let p = [
                int(op, "channels", c)?,
                int(op, "chunks", nchunks)?,
                Param::I32(mode),
                Param::F32(g_log_det),
                int(op, "count", count)?,
                Param::Ptr(self.dev.ptr(&part)?),
                Param::Ptr(self.dev.ptr_mut(out0)?),
                Param::Ptr(self.dev.ptr_mut(out1)?),
            ];
            self.launch_ew("cf_actnorm_finish", c, &p)
        })();
        self.put_scratch("actnorm", part);
        r
    }

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
}

impl<D: KernelDevice> Memory for CudaBackend<D> {
    fn zeros(&self, len: usize) -> Result<Buffer> {
        self.dev.alloc_zeros(len)
    }

    fn upload(&self, data: &[f32]) -> Result<Buffer> {
        self.dev.upload(data)
    }

    fn upload_into(&self, data: &[f32], dst: &mut Buffer) -> Result<()> {
        expect_len("upload_into", "dst", dst, data.len())?;
        self.dev.upload_into(data, dst)
    }

    fn download(&self, buf: &Buffer) -> Result<Vec<f32>> {
        self.dev.download(buf)
    }

    fn download_all(&self, bufs: &[&Buffer]) -> Result<Vec<Vec<f32>>> {
        let op = "download_all";
        if bufs.len() == 1 {
            return Ok(vec![self.dev.download(bufs[0])?]);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(bufs.iter().map(|_| Vec::new()).collect());
        }
        int(op, "total length", total)?;
        // Gather on the device (one cf_copy per buffer into its slice of a scratch buffer),
        // then one transfer.
        let mut all = self.take_scratch(op, total)?;
        let r = (|| {
            let base = self.dev.ptr_mut(&mut all)?;
            let mut offset = 0u64;
            for b in bufs {
                let p = [
                    int(op, "length", b.len())?,
                    Param::Ptr(self.dev.ptr(b)?),
                    // 4 bytes per float.
                    Param::Ptr(base + offset * 4),
                ];
                self.launch_ew("cf_copy", b.len(), &p)?;
                offset += b.len() as u64;
            }
            self.dev.download(&all)
        })();
        self.put_scratch(op, all);
        let host = r?;
        let mut out = Vec::with_capacity(bufs.len());
        let mut at = 0;
        for b in bufs {
            out.push(host[at..at + b.len()].to_vec());
            at += b.len();
        }
        Ok(out)
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
        // One buffer: one cf_sum_squares_partial launch (the multi-tensor form's task table
        // is kept for the gradient's fixed set of buffers, not rebuilt for each lone buffer).
        let op = "sum_squares";
        let n = x.len();
        if n == 0 {
            return Ok(0.0);
        }
        let g = n.div_ceil(4096).clamp(1, 1024);
        let mut part = self.take_scratch(op, 2 * g)?;
        let r = (|| {
            let p = [
                int(op, "length", n)?,
                Param::Ptr(self.dev.ptr(x)?),
                Param::Ptr(self.dev.ptr_mut(&mut part)?),
            ];
            let cfg = LaunchCfg {
                grid: (g as u32, 1, 1),
                block: (BLOCK, 1, 1),
                shared_bytes: 0,
            };
            self.dev.launch("cf_sum_squares_partial", cfg, &p)?;
            self.dev.download(&part)
        })();
        self.put_scratch(op, part);
        Ok(sum_hi_lo(&r?))
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
        // One launch for all buffers: block b's task is (address, length, g, G) of its
        // buffer's block g of G (cf_sum_squares_multi), the same blocks as one
        // cf_sum_squares_partial launch per buffer; the pairs land in one scratch buffer in
        // buffer order, so one download serves them all.
        let mut words = Vec::with_capacity(4 * total);
        for (x, &g) in xs.iter().zip(&blocks) {
            if g > 0 {
                int(op, "length", x.len())?;
                let at = self.dev.ptr(x)?;
                for b in 0..g {
                    words.extend([at, x.len() as u64, b as u64, g as u64]);
                }
            }
        }
        int(op, "blocks", total)?;
        let tasks = self.task_table("sum_squares", words)?;
        let mut part = self.take_scratch("sum_squares", 2 * total)?;
        let r = (|| {
            let cfg = LaunchCfg {
                grid: (total as u32, 1, 1),
                block: (BLOCK, 1, 1),
                shared_bytes: 0,
            };
            let p = [Param::Ptr(tasks), Param::Ptr(self.dev.ptr_mut(&mut part)?)];
            self.dev.launch("cf_sum_squares_multi", cfg, &p)?;
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

impl<D: KernelDevice> FlowLayers for CudaBackend<D> {
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
        scale: CouplingScale<'_>,
        st: &Buffer,
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
            Param::I32(scale.code()),
            Param::Ptr(self.dev.ptr(st)?),
            self.scale_ptr(scale)?,
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
        scale: CouplingScale<'_>,
        st: &Buffer,
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
            Param::I32(scale.code()),
            Param::Ptr(self.dev.ptr(st)?),
            self.scale_ptr(scale)?,
            Param::Ptr(self.dev.ptr_mut(y)?),
        ];
        self.launch_ew("cf_coupling_inverse", shape.batch * cc * p, &params)
    }

    fn coupling_backward(
        &self,
        shape: Shape4,
        mask: Mask,
        scale: CouplingScale<'_>,
        x: &Buffer,
        st: &Buffer,
        g_log_det: f32,
        dy: &mut Buffer,
        d_st: &mut Buffer,
        d_scale: &mut Buffer,
    ) -> Result<()> {
        let op = "coupling_backward";
        let (cc, _) = mask.split_channels(shape.channels);
        let p = shape.plane();
        check::coupling_backward(shape, mask, scale, x, st, dy, d_st, d_scale)?;
        int(op, "length", shape.len().max(st.len()))?;
        if shape.batch == 0 || cc * p == 0 {
            // The identity: dy passes through, d_st is empty, d_scale gains 0.
            return Ok(());
        }
        let tanh = matches!(scale, CouplingScale::Tanh(_));
        // Pass 1: dy (changed elements), all of d_st, and (tanh) per-image d_scale partials.
        let mut part = if tanh {
            Some(self.take_scratch("coupling_backward", shape.batch * cc)?)
        } else {
            None
        };
        let r = (|| {
            let part_ptr = match part.as_mut() {
                Some(b) => self.dev.ptr_mut(b)?,
                None => 0,
            };
            let params = [
                int(op, "channels", shape.channels)?,
                int(op, "height", shape.height)?,
                int(op, "width", shape.width)?,
                Param::I32(i32::from(mask as u8)),
                Param::I32(scale.code()),
                Param::F32(g_log_det),
                Param::Ptr(self.dev.ptr(x)?),
                Param::Ptr(self.dev.ptr(st)?),
                self.scale_ptr(scale)?,
                Param::Ptr(self.dev.ptr_mut(dy)?),
                Param::Ptr(self.dev.ptr_mut(d_st)?),
                Param::Ptr(part_ptr),
            ];
            self.dev
                .launch("cf_coupling_backward", per_image(shape.batch), &params)?;
            let Some(part) = part.as_ref() else {
                return Ok(());
            };
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
                Param::Ptr(self.dev.ptr(part)?),
                Param::Ptr(self.dev.ptr_mut(d_scale)?),
            ];
            self.dev.launch("cf_col_sum_add", cfg, &params)
        })();
        if let Some(part) = part {
            self.put_scratch("coupling_backward", part);
        }
        r
    }

    fn actnorm_forward(
        &self,
        shape: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()> {
        let op = "actnorm_forward";
        check_actnorm(op, shape, logs, bias, x)?;
        expect_len(op, "log_det", log_det, shape.batch)?;
        // An empty tensor adds plane * sum(logs) = 0 or has no image: nothing to do.
        let n = shape.len();
        let p = [
            int(op, "batch", shape.batch)?,
            int(op, "channels", shape.channels)?,
            int(op, "plane", shape.plane())?,
            Param::Ptr(self.dev.ptr(logs)?),
            Param::Ptr(self.dev.ptr(bias)?),
            Param::Ptr(self.dev.ptr_mut(x)?),
            Param::Ptr(self.dev.ptr_mut(log_det)?),
        ];
        int(op, "length", n)?;
        self.launch_ew("cf_actnorm_forward", n, &p)
    }

    fn actnorm_inverse(
        &self,
        shape: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        y: &mut Buffer,
    ) -> Result<()> {
        let op = "actnorm_inverse";
        check_actnorm(op, shape, logs, bias, y)?;
        let n = shape.len();
        let p = [
            int(op, "batch", shape.batch)?,
            int(op, "channels", shape.channels)?,
            int(op, "plane", shape.plane())?,
            Param::Ptr(self.dev.ptr(logs)?),
            Param::Ptr(self.dev.ptr(bias)?),
            Param::Ptr(self.dev.ptr_mut(y)?),
        ];
        int(op, "length", n)?;
        self.launch_ew("cf_actnorm_inverse", n, &p)
    }

    fn actnorm_backward(
        &self,
        shape: Shape4,
        x: &Buffer,
        logs: &Buffer,
        g_log_det: f32,
        dy: &mut Buffer,
        d_logs: &mut Buffer,
        d_bias: &mut Buffer,
    ) -> Result<()> {
        let op = "actnorm_backward";
        check_actnorm(op, shape, logs, d_bias, x)?;
        expect_len(op, "dy", dy, shape.len())?;
        expect_len(op, "d_logs", d_logs, shape.channels)?;
        self.actnorm_reduce(
            op,
            shape,
            1,
            x,
            Some(logs),
            Some(dy),
            g_log_det,
            d_logs,
            d_bias,
        )
    }

    fn actnorm_init(
        &self,
        shape: Shape4,
        x: &Buffer,
        logs: &mut Buffer,
        bias: &mut Buffer,
    ) -> Result<()> {
        let op = "actnorm_init";
        check_actnorm(op, shape, logs, bias, x)?;
        self.actnorm_reduce(op, shape, 0, x, None, None, 0.0, logs, bias)
    }

    fn invconv_weight(&self, c: usize, lu: LuFactors<'_>, w: &mut Buffer) -> Result<()> {
        let op = "invconv_weight";
        check_lu(op, c, &lu)?;
        expect_len(op, "w", w, c * c)?;
        int(op, "length", c * c)?;
        let mut p = vec![int(op, "channels", c)?];
        p.extend(self.lu_ptrs(&lu)?);
        p.push(Param::Ptr(self.dev.ptr_mut(w)?));
        self.launch_ew("cf_invconv_weight", c * c, &p)
    }

    fn invconv_inverse(&self, c: usize, lu: LuFactors<'_>, w_inv: &mut Buffer) -> Result<()> {
        let op = "invconv_inverse";
        check_lu(op, c, &lu)?;
        expect_len(op, "w_inv", w_inv, c * c)?;
        if c > MAX_INVCONV_CHANNELS {
            return Err(BackendError::Device(format!(
                "{op}: {c} channels is more than the CUDA kernel's {MAX_INVCONV_CHANNELS}"
            )));
        }
        if c == 0 {
            return Ok(());
        }
        let mut p = vec![int(op, "channels", c)?];
        p.extend(self.lu_ptrs(&lu)?);
        p.push(Param::Ptr(self.dev.ptr_mut(w_inv)?));
        let cfg = LaunchCfg {
            grid: (c as u32, 1, 1),
            block: (1, 1, 1),
            shared_bytes: (8 * c) as u32,
        };
        self.dev.launch("cf_invconv_inverse", cfg, &p)
    }

    fn invconv_backward(
        &self,
        c: usize,
        lu: LuFactors<'_>,
        d_w: &Buffer,
        g_log_det: f32,
        count: usize,
        d_lower: &mut Buffer,
        d_upper: &mut Buffer,
        d_log_s: &mut Buffer,
    ) -> Result<()> {
        let op = "invconv_backward";
        check_lu(op, c, &lu)?;
        expect_len(op, "d_w", d_w, c * c)?;
        expect_len(op, "d_lower", d_lower, c * c)?;
        expect_len(op, "d_upper", d_upper, c * c)?;
        expect_len(op, "d_log_s", d_log_s, c)?;
        if c > MAX_INVCONV_CHANNELS {
            return Err(BackendError::Device(format!(
                "{op}: {c} channels is more than the CUDA kernel's {MAX_INVCONV_CHANNELS}"
            )));
        }
        if c == 0 {
            return Ok(());
        }
        let mut p = vec![
            int(op, "channels", c)?,
            Param::F32(g_log_det),
            int(op, "count", count)?,
        ];
        p.extend(self.lu_ptrs(&lu)?);
        p.extend([
            Param::Ptr(self.dev.ptr(d_w)?),
            Param::Ptr(self.dev.ptr_mut(d_lower)?),
            Param::Ptr(self.dev.ptr_mut(d_upper)?),
            Param::Ptr(self.dev.ptr_mut(d_log_s)?),
        ]);
        let cfg = LaunchCfg {
            shared_bytes: (4 * c) as u32,
            ..ew(c * c)
        };
        self.dev.launch("cf_invconv_backward", cfg, &p)
    }

    fn add_log_det(&self, plane: usize, v: &Buffer, log_det: &mut Buffer) -> Result<()> {
        let op = "add_log_det";
        let batch = log_det.len();
        let p = [
            int(op, "batch", batch)?,
            int(op, "length", v.len())?,
            int(op, "plane", plane)?,
            Param::Ptr(self.dev.ptr(v)?),
            Param::Ptr(self.dev.ptr_mut(log_det)?),
        ];
        self.launch_ew("cf_add_log_det", batch, &p)
    }

    fn per_image_sum_squares(&self, shape: Shape4, z: &Buffer, acc: &mut Buffer) -> Result<()> {
        let op = "per_image_sum_squares";
        expect_len(op, "z", z, shape.len())?;
        expect_len(op, "acc", acc, 2 * shape.batch)?;
        int(op, "length", shape.len())?;
        if shape.is_empty() {
            // Every image adds 0.
            return Ok(());
        }
        let p = [
            int(op, "image length", shape.image_len())?,
            Param::Ptr(self.dev.ptr(z)?),
            Param::Ptr(self.dev.ptr_mut(acc)?),
        ];
        self.dev
            .launch("cf_per_image_sum_squares", per_image(shape.batch), &p)
    }
}

impl<D: KernelDevice> Optimiser for CudaBackend<D> {
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

    fn adam_all(
        &self,
        hp: &AdamStep,
        params: &mut [Buffer],
        grads: &[Buffer],
        m: &mut [Buffer],
        v: &mut [Buffer],
        trainable: &[bool],
    ) -> Result<()> {
        let op = "adam";
        check_adam_all(params, grads, m, v, trainable)?;
        // One launch: block b's task is (param, grad, m, v, length, g, G, 0) for block g of
        // the G = min(ceil(n / 256), 4096) blocks cf_adam would use on that tensor.
        let mut words = Vec::new();
        for ((((p, g), m), v), _) in params
            .iter_mut()
            .zip(grads)
            .zip(m.iter_mut())
            .zip(v.iter_mut())
            .zip(trainable)
            .filter(|t| *t.1)
        {
            check::adam(p, g, m, v)?;
            let n = p.len();
            if n == 0 {
                continue;
            }
            int(op, "length", n)?;
            let blocks = n.div_ceil(BLOCK as usize).min(4096) as u64;
            let addrs = [
                self.dev.ptr_mut(p)?,
                self.dev.ptr(g)?,
                self.dev.ptr_mut(m)?,
                self.dev.ptr_mut(v)?,
            ];
            for b in 0..blocks {
                words.extend(addrs);
                words.extend([n as u64, b, blocks, 0]);
            }
        }
        let total = words.len() / 8;
        if total == 0 {
            return Ok(());
        }
        int(op, "blocks", total)?;
        let tasks = self.task_table("adam", words)?;
        // Bias corrections in f32 exactly as the CPU backend computes them.
        let t = hp.step.max(1) as i32;
        let bc1 = 1.0 - hp.beta1.powi(t);
        let bc2 = 1.0 - hp.beta2.powi(t);
        let p = [
            Param::F32(hp.lr / bc1),
            Param::F32(hp.beta1),
            Param::F32(hp.beta2),
            Param::F32(hp.eps),
            Param::F32(bc2),
            Param::F32(hp.grad_scale),
            Param::Ptr(tasks),
        ];
        let cfg = LaunchCfg {
            grid: (total as u32, 1, 1),
            block: (BLOCK, 1, 1),
            shared_bytes: 0,
        };
        self.dev.launch("cf_adam_multi", cfg, &p)
    }
}
