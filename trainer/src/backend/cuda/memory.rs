//! [`Memory`] on the CUDA backend: allocation, transfers, copy, fill, axpy and the sums of
//! squares read back to the host.

use super::{int, CudaBackend, KernelDevice, LaunchCfg, Param, BLOCK};
use crate::backend::check::expect_len;
use crate::backend::{hi_lo, Buffer, Memory, Result};

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
        Ok(hi_lo(&r?).iter().sum::<f64>())
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
            total += hi_lo(&host[at..at + 2 * g]).iter().sum::<f64>();
            at += 2 * g;
        }
        Ok(total)
    }
}
