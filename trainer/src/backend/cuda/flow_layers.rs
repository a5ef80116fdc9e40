//! [`FlowLayers`] on the CUDA backend: logit, squeeze, the mask gather / scatter of split
//! and merge, coupling, ActNorm, the invertible 1x1 convolution and the per-image sums.

use super::{ew, int, per_image, CudaBackend, KernelDevice, LaunchCfg, Param, BLOCK, MAX_GRID_YZ};
use crate::backend::check::{self, check_actnorm};
use crate::backend::{BackendError, Buffer, CouplingScale, FlowLayers, LuFactors, Result, Shape4};
use clayflow_kernel::Mask;

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

impl<D: KernelDevice> CudaBackend<D> {
    /// One thread per element of the coupling network's input (`batch x cin x plane`): the
    /// mask kernels `cf_mask_gather` (`src` the state, `dst` the network's input) and
    /// `cf_mask_scatter_add` (the other way round). Operands already checked.
    fn launch_mask(
        &self,
        op: &'static str,
        kernel: &'static str,
        shape: Shape4,
        mask: Mask,
        src: &Buffer,
        dst: &mut Buffer,
    ) -> Result<()> {
        let (_, cin) = mask.split_channels(shape.channels);
        let n = shape.batch * cin * shape.plane();
        int(op, "length", shape.len())?;
        let p = [
            int(op, "batch", shape.batch)?,
            int(op, "channels", shape.channels)?,
            int(op, "height", shape.height)?,
            int(op, "width", shape.width)?,
            Param::I32(i32::from(mask as u8)),
            Param::Ptr(self.dev.ptr(src)?),
            Param::Ptr(self.dev.ptr_mut(dst)?),
        ];
        self.launch_ew(kernel, n, &p)
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
        check::mask_gather(shape, mask, x, cnn_in)?;
        self.launch_mask("mask_gather", "cf_mask_gather", shape, mask, x, cnn_in)
    }

    fn mask_scatter_add(
        &self,
        shape: Shape4,
        mask: Mask,
        d_cnn_in: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        check::mask_scatter_add(shape, mask, d_cnn_in, dx)?;
        self.launch_mask(
            "mask_scatter_add",
            "cf_mask_scatter_add",
            shape,
            mask,
            d_cnn_in,
            dx,
        )
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
            Param::F32(scale.floor()),
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
            Param::F32(scale.floor()),
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
                Param::F32(scale.floor()),
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
        check::actnorm_forward(shape, logs, bias, x, log_det)?;
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
        check::actnorm_backward(shape, logs, x, dy, d_logs, d_bias)?;
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
        check::invconv(op, c, &lu, "w", w)?;
        int(op, "length", c * c)?;
        let mut p = vec![int(op, "channels", c)?];
        p.extend(self.lu_ptrs(&lu)?);
        p.push(Param::Ptr(self.dev.ptr_mut(w)?));
        self.launch_ew("cf_invconv_weight", c * c, &p)
    }

    fn invconv_inverse(&self, c: usize, lu: LuFactors<'_>, w_inv: &mut Buffer) -> Result<()> {
        let op = "invconv_inverse";
        check::invconv(op, c, &lu, "w_inv", w_inv)?;
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
        check::invconv_backward(c, &lu, d_w, d_lower, d_upper, d_log_s)?;
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
        check::per_image_sum_squares(shape, z, acc)?;
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
