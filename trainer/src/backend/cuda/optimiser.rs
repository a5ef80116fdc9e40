//! [`Optimiser`] on the CUDA backend: Adam, per tensor and multi-tensor.

use super::{int, CudaBackend, KernelDevice, LaunchCfg, Param, BLOCK};
use crate::backend::check::{self, check_adam_all, check_ema_all};
use crate::backend::{AdamStep, Buffer, Optimiser, Result};

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

    fn ema_all(
        &self,
        weight: f32,
        params: &[Buffer],
        avg: &mut [Buffer],
        trainable: &[bool],
    ) -> Result<()> {
        let op = "ema_all";
        check_ema_all(params, avg, trainable)?;
        // One launch, with cf_adam_multi's task layout: (param, avg, 0, 0, n, g, G, 0).
        let mut words = Vec::new();
        for ((p, a), _) in params
            .iter()
            .zip(avg.iter_mut())
            .zip(trainable)
            .filter(|t| *t.1)
        {
            let n = p.len();
            if n == 0 {
                continue;
            }
            int(op, "length", n)?;
            let blocks = n.div_ceil(BLOCK as usize).min(4096) as u64;
            let addrs = [self.dev.ptr(p)?, self.dev.ptr_mut(a)?];
            for b in 0..blocks {
                words.extend(addrs);
                words.extend([0, 0, n as u64, b, blocks, 0]);
            }
        }
        let total = words.len() / 8;
        if total == 0 {
            return Ok(());
        }
        int(op, "blocks", total)?;
        let tasks = self.task_table("ema", words)?;
        let p = [Param::F32(weight), Param::Ptr(tasks)];
        let cfg = LaunchCfg {
            grid: (total as u32, 1, 1),
            block: (BLOCK, 1, 1),
            shared_bytes: 0,
        };
        self.dev.launch("cf_ema_multi", cfg, &p)
    }
}
