//! CUDA-vs-CPU parity on a real NVIDIA GPU: `CudaBackend<CudaDevice>` against `CpuBackend`.
//!
//! Every test here needs a GPU, the NVIDIA driver and NVRTC, so all are `#[ignore]`d and run
//! by `tools/gpu-check.sh` (`cargo test --release -p clayflow-trainer --test gpu -- --ignored
//! gpu_`). Run without a GPU they fail (they do not skip): the first line of the failure says
//! why the GPU could not be opened. On every CI run, without a GPU, the same orchestration
//! and the same kernel sources are checked against the CPU through the host simulator
//! (`tests/cuda_parity.rs`, `tests/cuda_resume.rs` in the root suite).
//!
//! Tolerance: relative error `||gpu - cpu|| / ||cpu||` (2-norm over the tensor) <= 1e-4 for
//! every output, the loss and every gradient tensor. A norm-wise error is used because
//! element-wise relative errors are meaningless where a value is near zero; f32 kernels that
//! only reorder sums and fuse multiply-adds land around 1e-6.

use clayflow_kernel::{Mask, Pcg32, Rng};
use clayflow_trainer::backend::cpu::CpuBackend;
use clayflow_trainer::backend::prelude::*;
use clayflow_trainer::backend::select;
use clayflow_trainer::backend::{
    hi_lo, AdamStep, Backend, Buffer, ConvShape, CouplingScale, Shape4,
};
use clayflow_trainer::config::{tensor_specs, ModelConfig};
use clayflow_trainer::model::{init_params, Flow};
use std::sync::Arc;

const TOL: f64 = 1e-4;

fn gpu() -> Arc<dyn Backend> {
    match select::open_cuda(0) {
        Ok(b) => {
            // The label names the kernels in use (NVRTC's CUBIN or the shipped PTX).
            println!("device {}", b.name());
            Arc::new(b)
        }
        Err(e) => panic!("these tests need an NVIDIA GPU (cuda:0): {e}"),
    }
}

struct Gen(Pcg32);

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen(Pcg32::with_stream(seed, 77))
    }
    /// Uniform in [lo, hi).
    fn uni(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.0.next_u32() >> 8) as f32 / 16_777_216.0)
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uni(lo, hi)).collect()
    }
}

/// `||a - b|| / max(||b||, tiny)`.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (f64::from(x) - f64::from(y)).powi(2);
        n += f64::from(y).powi(2);
    }
    d.sqrt() / n.sqrt().max(1e-30)
}

fn close(what: &str, a: &[f32], b: &[f32]) {
    assert!(
        a.iter().all(|v| v.is_finite()),
        "{what}: the GPU produced a non-finite value"
    );
    let r = rel(a, b);
    assert!(r <= TOL, "{what}: relative error {r:.3e} > {TOL:.0e}");
}

/// The same op on both backends, from the same host inputs.
struct Pair {
    g: Arc<dyn Backend>,
    c: CpuBackend,
}

impl Pair {
    fn up(&self, v: &[f32]) -> (Buffer, Buffer) {
        (self.g.upload(v).unwrap(), self.c.upload(v).unwrap())
    }
    fn check(&self, what: &str, g: &Buffer, c: &Buffer) {
        close(
            what,
            &self.g.download(g).unwrap(),
            &self.c.download(c).unwrap(),
        );
    }
}

fn masks() -> [Mask; 4] {
    [
        Mask::ChannelEven,
        Mask::ChannelOdd,
        Mask::CheckerEven,
        Mask::CheckerOdd,
    ]
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by tools/gpu-check.sh"]
fn gpu_elementwise_and_reductions_match_cpu() {
    let p = Pair {
        g: gpu(),
        c: CpuBackend::default(),
    };
    let mut r = Gen::new(1);
    for n in [1usize, 255, 256, 257, 4097, 1 << 20] {
        let x = r.vec(n, -2.0, 2.0);
        let y = r.vec(n, -2.0, 2.0);
        let (xg, xc) = p.up(&x);
        let (mut yg, mut yc) = p.up(&y);
        p.g.axpy(0.3, &xg, &mut yg).unwrap();
        p.c.axpy(0.3, &xc, &mut yc).unwrap();
        p.check(&format!("axpy n={n}"), &yg, &yc);
        p.g.relu_backward(&xg, &mut yg).unwrap();
        p.c.relu_backward(&xc, &mut yc).unwrap();
        p.check(&format!("relu_backward n={n}"), &yg, &yc);
        p.g.copy(&xg, &mut yg).unwrap();
        p.check(&format!("copy n={n}"), &yg, &xc);
        p.g.fill(&mut yg, 1.5).unwrap();
        assert!(p.g.download(&yg).unwrap().iter().all(|&v| v == 1.5));
        let (sg, sc) = (p.g.sum_squares(&xg).unwrap(), p.c.sum_squares(&xc).unwrap());
        assert!(
            ((sg - sc) / sc).abs() < 1e-9,
            "sum_squares n={n}: {sg} vs {sc}"
        );
        let u = r.vec(n, 0.0, 1.0);
        let (mut ug, mut uc) = p.up(&u);
        p.g.logit_inverse(0.05, &mut ug).unwrap();
        p.c.logit_inverse(0.05, &mut uc).unwrap();
        p.check(&format!("logit_inverse n={n}"), &ug, &uc);
        // Adam, twice (bias corrections at steps 1 and 2).
        let (mut pg, mut pc) = p.up(&r.vec(n, -1.0, 1.0));
        let (mut mg, mut mc) = p.up(&vec![0.0; n]);
        let (mut vg, mut vc) = p.up(&vec![0.0; n]);
        for step in 1..=2 {
            let hp = AdamStep {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                step,
                grad_scale: 0.7,
            };
            p.g.adam(&hp, &mut pg, &xg, &mut mg, &mut vg).unwrap();
            p.c.adam(&hp, &mut pc, &xc, &mut mc, &mut vc).unwrap();
        }
        p.check(&format!("adam param n={n}"), &pg, &pc);
        p.check(&format!("adam m n={n}"), &mg, &mc);
        p.check(&format!("adam v n={n}"), &vg, &vc);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by tools/gpu-check.sh"]
fn gpu_flow_ops_match_cpu() {
    let p = Pair {
        g: gpu(),
        c: CpuBackend::default(),
    };
    let mut r = Gen::new(2);
    for (batch, c, h, w) in [(1, 1, 2, 2), (3, 4, 6, 10), (2, 12, 16, 16), (5, 3, 14, 14)] {
        let s = Shape4 {
            batch,
            channels: c,
            height: h,
            width: w,
        };
        let n = s.len();
        // logit forward with log-det, squeeze both ways, per-image sums of squares.
        let u = r.vec(n, 0.0, 1.0);
        let (mut ug, mut uc) = p.up(&u);
        let (mut lg, mut lc) = p.up(&vec![0.0; batch]);
        p.g.logit_forward(s, 0.05, &mut ug, &mut lg).unwrap();
        p.c.logit_forward(s, 0.05, &mut uc, &mut lc).unwrap();
        p.check(&format!("logit_forward {s:?}"), &ug, &uc);
        p.check(&format!("logit log-det {s:?}"), &lg, &lc);
        for inverse in [false, true] {
            let (mut yg, mut yc) = p.up(&vec![0.0; n]);
            p.g.squeeze(s, inverse, &ug, &mut yg).unwrap();
            p.c.squeeze(s, inverse, &uc, &mut yc).unwrap();
            p.check(&format!("squeeze inverse={inverse} {s:?}"), &yg, &yc);
        }
        let (mut ag, mut ac) = p.up(&vec![0.0; 2 * batch]);
        p.g.per_image_sum_squares(s, &ug, &mut ag).unwrap();
        p.c.per_image_sum_squares(s, &uc, &mut ac).unwrap();
        let (a, b) = (
            hi_lo(&p.g.download(&ag).unwrap()),
            hi_lo(&p.c.download(&ac).unwrap()),
        );
        for (x, y) in a.iter().zip(&b) {
            assert!(
                ((x - y) / y).abs() < 1e-9,
                "per_image_sum_squares {s:?}: {x} vs {y}"
            );
        }
        // Every mask: gather, scatter-add, coupling forward / inverse / backward.
        for m in masks() {
            if m.is_channel() && c < 2 {
                continue;
            }
            let (cc, cin) = m.split_channels(c);
            let p_len = h * w;
            let x = r.vec(n, -2.0, 2.0);
            let (xg, xc) = p.up(&x);
            let (mut ig, mut ic) = p.up(&vec![0.0; batch * cin * p_len]);
            p.g.mask_gather(s, m, &xg, &mut ig).unwrap();
            p.c.mask_gather(s, m, &xc, &mut ic).unwrap();
            p.check(&format!("mask_gather {m:?} {s:?}"), &ig, &ic);
            let (mut dg, mut dc) = p.up(&r.vec(n, -1.0, 1.0));
            p.g.mask_scatter_add(s, m, &ig, &mut dg).unwrap();
            p.c.mask_scatter_add(s, m, &ic, &mut dc).unwrap();
            p.check(&format!("mask_scatter_add {m:?} {s:?}"), &dg, &dc);
            let st = r.vec(batch * 2 * cc * p_len, -1.5, 1.5);
            let scale = r.vec(cc, 0.5, 1.5);
            let (stg, stc) = p.up(&st);
            let (scg, scc) = p.up(&scale);
            for tanh in [true, false] {
                let (fg, fc) = if tanh {
                    (CouplingScale::Tanh(&scg), CouplingScale::Tanh(&scc))
                } else {
                    // The presets' floor; in [-1.5, 1.5] it changes every scale.
                    let floor = clayflow_kernel::GLOW_SCALE_FLOOR;
                    (
                        CouplingScale::Sigmoid { floor },
                        CouplingScale::Sigmoid { floor },
                    )
                };
                let what = format!("{m:?} {s:?} tanh={tanh}");
                let (mut yg, mut yc) = p.up(&x);
                let (mut lg, mut lc) = p.up(&r.vec(batch, -1.0, 1.0));
                p.g.coupling_forward(s, m, fg, &stg, &mut yg, &mut lg)
                    .unwrap();
                p.c.coupling_forward(s, m, fc, &stc, &mut yc, &mut lc)
                    .unwrap();
                p.check(&format!("coupling_forward {what}"), &yg, &yc);
                p.check(&format!("coupling log-det {what}"), &lg, &lc);
                p.g.coupling_inverse(s, m, fg, &stg, &mut yg).unwrap();
                p.c.coupling_inverse(s, m, fc, &stc, &mut yc).unwrap();
                p.check(&format!("coupling_inverse {what}"), &yg, &yc);
                let (mut dyg, mut dyc) = p.up(&r.vec(n, -1.0, 1.0));
                let (mut dsg, mut dsc) = p.up(&vec![0.0; st.len()]);
                let (mut dscg, mut dscc) = p.up(&r.vec(cc, -1.0, 1.0));
                p.g.coupling_backward(s, m, fg, &xg, &stg, 0.01, &mut dyg, &mut dsg, &mut dscg)
                    .unwrap();
                p.c.coupling_backward(s, m, fc, &xc, &stc, 0.01, &mut dyc, &mut dsc, &mut dscc)
                    .unwrap();
                p.check(&format!("coupling_backward dy {what}"), &dyg, &dyc);
                p.check(&format!("coupling_backward d_st {what}"), &dsg, &dsc);
                p.check(&format!("coupling_backward d_scale {what}"), &dscg, &dscc);
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by tools/gpu-check.sh"]
fn gpu_convolutions_match_cpu() {
    let p = Pair {
        g: gpu(),
        c: CpuBackend::default(),
    };
    let mut r = Gen::new(3);
    // Odd sizes that cut 16x16 tiles, channel counts around every TCO variant (4, 8, 16),
    // and the presets' own convolutions.
    let shapes = [
        (1, 1, 1, 3, 3, 1),
        (2, 3, 5, 7, 9, 3),
        (3, 8, 9, 17, 15, 5),
        (2, 17, 4, 14, 14, 7),
        (2, 2, 8, 14, 14, 5),
        (2, 8, 64, 14, 14, 7),
        (2, 64, 4, 14, 14, 3),
        (2, 6, 24, 16, 16, 5),
        (1, 24, 192, 16, 16, 7),
        (1, 192, 12, 16, 16, 3),
        (1, 2, 3, 20, 33, 15),
    ];
    for (batch, cin, cout, height, width, kernel) in shapes {
        let s = ConvShape {
            batch,
            cin,
            cout,
            height,
            width,
            kernel,
        };
        let (xg, xc) = p.up(&r.vec(s.input_len(), -1.0, 1.0));
        let (wg, wc) = p.up(&r.vec(s.weight_len(), -0.3, 0.3));
        let (bg, bc) = p.up(&r.vec(cout, -0.5, 0.5));
        for relu in [false, true] {
            let (mut yg, mut yc) = p.up(&vec![0.0; s.output_len()]);
            p.g.conv_forward(&s, &xg, &wg, &bg, relu, &mut yg).unwrap();
            p.c.conv_forward(&s, &xc, &wc, &bc, relu, &mut yc).unwrap();
            p.check(&format!("conv_forward relu={relu} {s:?}"), &yg, &yc);
        }
        let (dyg, dyc) = p.up(&r.vec(s.output_len(), -1.0, 1.0));
        let (mut dxg, mut dxc) = p.up(&vec![7.0; s.input_len()]);
        p.g.conv_backward_data(&s, &dyg, &wg, &mut dxg).unwrap();
        p.c.conv_backward_data(&s, &dyc, &wc, &mut dxc).unwrap();
        p.check(&format!("conv_backward_data {s:?}"), &dxg, &dxc);
        let (mut dwg, mut dwc) = p.up(&vec![7.0; s.weight_len()]);
        let (mut dbg, mut dbc) = p.up(&vec![7.0; cout]);
        p.g.conv_backward_weight(&s, &xg, &dyg, &mut dwg, &mut dbg)
            .unwrap();
        p.c.conv_backward_weight(&s, &xc, &dyc, &mut dwc, &mut dbc)
            .unwrap();
        p.check(&format!("conv_backward_weight dw {s:?}"), &dwg, &dwc);
        p.check(&format!("conv_backward_weight db {s:?}"), &dbg, &dbc);
    }
}

/// Parameters with every tensor random (the init's zero last convs would make most
/// gradients exactly zero and the comparison toothless).
fn random_params(cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    let arch = cfg.to_arch().unwrap();
    let mut r = Gen::new(seed);
    let mut params = init_params(&arch, seed);
    for (spec, p) in tensor_specs(&arch).iter().zip(&mut params) {
        if spec.name.contains(".conv2.") {
            *p = r.vec(p.len(), -0.02, 0.02);
        }
    }
    params
}

/// Loss and every gradient of one training step of `preset` at `batch`, on both backends.
fn step_parity(preset: &str, batch: usize) {
    let cfg = ModelConfig::preset(preset).unwrap();
    let arch = cfg.to_arch().unwrap();
    let params = random_params(&cfg, 5);
    let mut r = Gen::new(6);
    let u = r.vec(batch * arch.dim(), 0.002, 0.998);
    let z = r.vec(batch * arch.dim(), -2.0, 2.0);
    let run = |be: Arc<dyn Backend>| {
        let mut flow = Flow::new(be.clone(), arch, &params).unwrap();
        if arch.glow {
            // ActNorm's data-dependent initialisation, on each backend's own device.
            flow.data_init(&u, batch).unwrap();
        }
        let stats = flow.forward(&u, batch).unwrap();
        let mut grads = flow.zeros_like_params().unwrap();
        flow.backward(&mut grads).unwrap();
        let host: Vec<Vec<f32>> = grads.iter().map(|g| be.download(g).unwrap()).collect();
        // Sampling: the inverse of the same (data-initialised) flow.
        let x = flow.inverse(&z, batch).unwrap();
        (stats, host, x)
    };
    let (sg, gg, xg) = run(gpu());
    let (sc, gc, xc) = run(Arc::new(CpuBackend::default()));
    let loss_rel = ((sg.mean_bpd - sc.mean_bpd) / sc.mean_bpd).abs();
    println!(
        "{preset} batch {batch}: loss GPU {:.9} CPU {:.9} (rel {loss_rel:.2e})",
        sg.mean_bpd, sc.mean_bpd
    );
    assert!(
        loss_rel <= TOL,
        "{preset}: loss relative error {loss_rel:.3e}"
    );
    let mut worst = (0.0f64, String::new());
    for ((spec, a), b) in tensor_specs(&arch).iter().zip(&gg).zip(&gc) {
        let e = rel(a, b);
        if e > worst.0 {
            worst = (e, spec.name.clone());
        }
        close(&format!("{preset} gradient {}", spec.name), a, b);
    }
    println!(
        "{preset} batch {batch}: {} gradient tensors, worst relative error {:.2e} ({})",
        gg.len(),
        worst.0,
        worst.1
    );
    close(&format!("{preset} inverse"), &xg, &xc);
    // One line per preset for tools/gpu-check.sh's table.
    println!(
        "parity {preset} batch={batch} loss_rel={loss_rel:.2e} grads={} worst_grad_rel={:.2e} \
         inverse_rel={:.2e}",
        gg.len(),
        worst.0,
        rel(&xg, &xc)
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by tools/gpu-check.sh"]
fn gpu_mnist_training_step_matches_cpu() {
    step_parity("mnist", 32);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by tools/gpu-check.sh"]
fn gpu_color_training_step_matches_cpu() {
    step_parity("color", 8);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by tools/gpu-check.sh"]
fn gpu_mnist_glow_training_step_matches_cpu() {
    step_parity("mnist-glow", 32);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by tools/gpu-check.sh"]
fn gpu_color_glow_training_step_matches_cpu() {
    step_parity("color-glow", 8);
}

/// NCCL through its whole path on one GPU: a communicator of size 1 (init), the collective's
/// conformance checks on device buffers (all-reduce, broadcast, in NCCL groups), and its
/// destruction. Run by `tools/gpu-check.sh` where libnccl.so.2 is on the loader path.
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs an NVIDIA GPU and NCCL; run by tools/gpu-check.sh"]
fn nccl_communicator_of_one_gpu_passes_the_conformance_checks() {
    use clayflow_trainer::collective::{conformance, nccl, Single};
    if !nccl::nccl_present() {
        panic!("libnccl.so.2 was not found: pip install nvidia-nccl-cu12 and put its lib folder on LD_LIBRARY_PATH");
    }
    let be = gpu();
    let nccl = nccl::Nccl::new(&Single, 0).expect("an NCCL communicator of one GPU");
    conformance::check(&nccl, be.as_ref()).unwrap();
    drop(nccl);
}
