//! What bf16 convolutions cost in bits/dim (issue 19's bf16 lever), by emulating their
//! numerics on any CPU, for every coupling convolution (`clayflow train --bf16` rounds only
//! the 1x1 ones, on AMX: BENCHMARKS section 14).
//!
//! `vdpbf16ps` and AMX's `tdpbf16ps` multiply pairs of bf16 values and accumulate in f32.
//! The product of two bf16 values (8-bit significands) is exact in f32, so rounding each
//! operand to bf16 (round to nearest even) and running the f32 kernels gives the same
//! arithmetic up to the order of the f32 additions (and the instructions' flushing of bf16
//! denormals, which the rounding here copies). This example wraps the CPU backend in
//! [`Bf16Convs`], which does exactly that for the coupling networks' convolutions (the
//! learned prior's included: the backend's `net_conv_*` calls):
//!
//! - forward: the input activations and the weights (the bias stays f32);
//! - backward-data: the output gradient and the weights;
//! - backward-weight: the input activations and the output gradient.
//!
//! The invertible 1x1 convolutions of Glow stay f32 (the model calls them through the plain
//! `conv_*` ops): their weights come from the LU factors whose `log_s` is the log-det, so
//! rounding them would make the likelihood inexact. Forward and inverse run the same
//! network on the same input, so exact invertibility holds either way; the question is only
//! what the rounding does to training.
//!
//! It trains `mnist-glow` as `clayflow train` does on the CPU (batch 16, lr 2e-3, 100
//! warm-up steps, cosine decay, clip 100, first 7,000 bundled digits), for a fixed number
//! of steps so that two runs are step-matched, and writes an ordinary run folder (score it
//! with `clayflow eval --model DIR`, sample it with `clayflow sample`). The emulation is
//! slower than f32 (the rounding copies): this measures bits/dim, not speed.
//!
//! ```text
//! cargo build --release -p clayflow-trainer --example bf16_numerics
//! target/release/examples/bf16_numerics STEPS SEED OUT [bf16|f32] [THREADS] [EMA]
//! ```

use clayflow_kernel::Mask;
use clayflow_trainer::backend::cpu::conv::round_bf16;
use clayflow_trainer::backend::cpu::CpuBackend;
use clayflow_trainer::backend::{
    AdamStep, Backend, Buffer, ConvShape, Convolution, CouplingScale, FlowLayers, LuFactors,
    Memory, Optimiser, Result, Shape4,
};
use clayflow_trainer::collective::Single;
use clayflow_trainer::config::ModelConfig;
use clayflow_trainer::data::{self, Crop};
use clayflow_trainer::train::{self, Progress, TrainConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The CPU backend with the coupling networks' convolutions on bf16 operands (see the module
/// docs); every other op is the CPU backend's.
#[derive(Debug)]
struct Bf16Convs {
    inner: CpuBackend,
    on: bool,
}

impl Bf16Convs {
    /// A copy of `b` with every value rounded to bf16.
    fn rounded(&self, b: &Buffer) -> Result<Buffer> {
        let mut v = self.inner.download(b)?;
        v.iter_mut().for_each(|x| *x = round_bf16(*x));
        self.inner.upload(&v)
    }
}

impl Convolution for Bf16Convs {
    fn conv_forward(
        &self,
        s: &ConvShape,
        x: &Buffer,
        w: &Buffer,
        b: &Buffer,
        relu: bool,
        y: &mut Buffer,
    ) -> Result<()> {
        self.inner.conv_forward(s, x, w, b, relu, y)
    }
    fn conv_backward_data(
        &self,
        s: &ConvShape,
        dy: &Buffer,
        w: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        self.inner.conv_backward_data(s, dy, w, dx)
    }
    fn conv_backward_weight(
        &self,
        s: &ConvShape,
        x: &Buffer,
        dy: &Buffer,
        dw: &mut Buffer,
        db: &mut Buffer,
    ) -> Result<()> {
        self.inner.conv_backward_weight(s, x, dy, dw, db)
    }
    fn net_conv_forward(
        &self,
        s: &ConvShape,
        x: &Buffer,
        w: &Buffer,
        b: &Buffer,
        relu: bool,
        y: &mut Buffer,
    ) -> Result<()> {
        if !self.on {
            return self.inner.conv_forward(s, x, w, b, relu, y);
        }
        let (x, w) = (self.rounded(x)?, self.rounded(w)?);
        self.inner.conv_forward(s, &x, &w, b, relu, y)
    }
    fn net_conv_backward_data(
        &self,
        s: &ConvShape,
        dy: &Buffer,
        w: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        if !self.on {
            return self.inner.conv_backward_data(s, dy, w, dx);
        }
        let (dy, w) = (self.rounded(dy)?, self.rounded(w)?);
        self.inner.conv_backward_data(s, &dy, &w, dx)
    }
    fn net_conv_backward_weight(
        &self,
        s: &ConvShape,
        x: &Buffer,
        dy: &Buffer,
        dw: &mut Buffer,
        db: &mut Buffer,
    ) -> Result<()> {
        if !self.on {
            return self.inner.conv_backward_weight(s, x, dy, dw, db);
        }
        // The bias gradient sums the f32 output gradient: only the products are bf16.
        let (xr, dyr) = (self.rounded(x)?, self.rounded(dy)?);
        let mut db_unused = self.inner.zeros(db.len())?;
        self.inner
            .conv_backward_weight(s, &xr, &dyr, dw, &mut db_unused)?;
        let mut dw_unused = self.inner.zeros(dw.len())?;
        self.inner
            .conv_backward_weight(s, x, dy, &mut dw_unused, db)
    }
    fn relu_backward(&self, y: &Buffer, dy: &mut Buffer) -> Result<()> {
        self.inner.relu_backward(y, dy)
    }
}

impl Memory for Bf16Convs {
    fn zeros(&self, len: usize) -> Result<Buffer> {
        self.inner.zeros(len)
    }
    fn upload(&self, data: &[f32]) -> Result<Buffer> {
        self.inner.upload(data)
    }
    fn upload_into(&self, data: &[f32], dst: &mut Buffer) -> Result<()> {
        self.inner.upload_into(data, dst)
    }
    fn download(&self, buf: &Buffer) -> Result<Vec<f32>> {
        self.inner.download(buf)
    }
    fn download_all(&self, bufs: &[&Buffer]) -> Result<Vec<Vec<f32>>> {
        self.inner.download_all(bufs)
    }
    fn copy(&self, src: &Buffer, dst: &mut Buffer) -> Result<()> {
        self.inner.copy(src, dst)
    }
    fn fill(&self, buf: &mut Buffer, value: f32) -> Result<()> {
        self.inner.fill(buf, value)
    }
    fn axpy(&self, a: f32, x: &Buffer, y: &mut Buffer) -> Result<()> {
        self.inner.axpy(a, x, y)
    }
    fn sum_squares(&self, x: &Buffer) -> Result<f64> {
        self.inner.sum_squares(x)
    }
    fn sum_squares_all(&self, xs: &[Buffer]) -> Result<f64> {
        self.inner.sum_squares_all(xs)
    }
}

impl FlowLayers for Bf16Convs {
    fn logit_forward(&self, sh: Shape4, alpha: f32, x: &mut Buffer, ld: &mut Buffer) -> Result<()> {
        self.inner.logit_forward(sh, alpha, x, ld)
    }
    fn logit_inverse(&self, alpha: f32, x: &mut Buffer) -> Result<()> {
        self.inner.logit_inverse(alpha, x)
    }
    fn squeeze(&self, sh: Shape4, inverse: bool, x: &Buffer, y: &mut Buffer) -> Result<()> {
        self.inner.squeeze(sh, inverse, x, y)
    }
    fn mask_gather(&self, sh: Shape4, m: Mask, x: &Buffer, cnn_in: &mut Buffer) -> Result<()> {
        self.inner.mask_gather(sh, m, x, cnn_in)
    }
    fn mask_scatter_add(&self, sh: Shape4, m: Mask, d: &Buffer, dx: &mut Buffer) -> Result<()> {
        self.inner.mask_scatter_add(sh, m, d, dx)
    }
    fn coupling_forward(
        &self,
        sh: Shape4,
        m: Mask,
        scale: CouplingScale<'_>,
        st: &Buffer,
        x: &mut Buffer,
        ld: &mut Buffer,
    ) -> Result<()> {
        self.inner.coupling_forward(sh, m, scale, st, x, ld)
    }
    fn coupling_inverse(
        &self,
        sh: Shape4,
        m: Mask,
        scale: CouplingScale<'_>,
        st: &Buffer,
        y: &mut Buffer,
    ) -> Result<()> {
        self.inner.coupling_inverse(sh, m, scale, st, y)
    }
    fn coupling_backward(
        &self,
        sh: Shape4,
        m: Mask,
        scale: CouplingScale<'_>,
        x: &Buffer,
        st: &Buffer,
        g: f32,
        dy: &mut Buffer,
        d_st: &mut Buffer,
        d_scale: &mut Buffer,
    ) -> Result<()> {
        self.inner
            .coupling_backward(sh, m, scale, x, st, g, dy, d_st, d_scale)
    }
    fn actnorm_forward(
        &self,
        sh: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        x: &mut Buffer,
        ld: &mut Buffer,
    ) -> Result<()> {
        self.inner.actnorm_forward(sh, logs, bias, x, ld)
    }
    fn actnorm_inverse(
        &self,
        sh: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        y: &mut Buffer,
    ) -> Result<()> {
        self.inner.actnorm_inverse(sh, logs, bias, y)
    }
    fn actnorm_backward(
        &self,
        sh: Shape4,
        x: &Buffer,
        logs: &Buffer,
        g: f32,
        dy: &mut Buffer,
        d_logs: &mut Buffer,
        d_bias: &mut Buffer,
    ) -> Result<()> {
        self.inner
            .actnorm_backward(sh, x, logs, g, dy, d_logs, d_bias)
    }
    fn actnorm_init(
        &self,
        sh: Shape4,
        x: &Buffer,
        logs: &mut Buffer,
        bias: &mut Buffer,
    ) -> Result<()> {
        self.inner.actnorm_init(sh, x, logs, bias)
    }
    fn invconv_weight(&self, c: usize, lu: LuFactors<'_>, w: &mut Buffer) -> Result<()> {
        self.inner.invconv_weight(c, lu, w)
    }
    fn invconv_inverse(&self, c: usize, lu: LuFactors<'_>, w_inv: &mut Buffer) -> Result<()> {
        self.inner.invconv_inverse(c, lu, w_inv)
    }
    fn invconv_backward(
        &self,
        c: usize,
        lu: LuFactors<'_>,
        d_w: &Buffer,
        g: f32,
        count: usize,
        d_lower: &mut Buffer,
        d_upper: &mut Buffer,
        d_log_s: &mut Buffer,
    ) -> Result<()> {
        self.inner
            .invconv_backward(c, lu, d_w, g, count, d_lower, d_upper, d_log_s)
    }
    fn add_log_det(&self, plane: usize, v: &Buffer, ld: &mut Buffer) -> Result<()> {
        self.inner.add_log_det(plane, v, ld)
    }
    fn per_image_sum_squares(&self, sh: Shape4, z: &Buffer, acc: &mut Buffer) -> Result<()> {
        self.inner.per_image_sum_squares(sh, z, acc)
    }
}

impl Optimiser for Bf16Convs {
    fn adam(
        &self,
        hp: &AdamStep,
        p: &mut Buffer,
        g: &Buffer,
        m: &mut Buffer,
        v: &mut Buffer,
    ) -> Result<()> {
        self.inner.adam(hp, p, g, m, v)
    }
    fn adam_all(
        &self,
        hp: &AdamStep,
        p: &mut [Buffer],
        g: &[Buffer],
        m: &mut [Buffer],
        v: &mut [Buffer],
        t: &[bool],
    ) -> Result<()> {
        self.inner.adam_all(hp, p, g, m, v, t)
    }
    fn ema_all(&self, w: f32, p: &[Buffer], avg: &mut [Buffer], t: &[bool]) -> Result<()> {
        self.inner.ema_all(w, p, avg, t)
    }
}

impl Backend for Bf16Convs {
    fn name(&self) -> String {
        format!(
            "{}{}",
            self.inner.name(),
            if self.on {
                ", convolutions on bf16 operands (emulated)"
            } else {
                ""
            }
        )
    }
}

/// Prints each validation as it comes.
struct Print;

impl Progress for Print {
    fn step(&mut self, _: &clayflow_trainer::checkpoint::TrainState, _: f64, _: f64, _: f64) {}
    fn note(&mut self, line: &str) {
        eprintln!("{line}");
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        anyhow::bail!("usage: bf16_numerics STEPS SEED OUT [bf16|f32] [THREADS] [EMA]");
    }
    let steps: u64 = args[1].parse()?;
    let seed: u64 = args[2].parse()?;
    let out = PathBuf::from(&args[3]);
    let on = match args.get(4).map_or("bf16", String::as_str) {
        "bf16" => true,
        "f32" => false,
        other => anyhow::bail!("precision {other:?}: bf16 or f32"),
    };
    let threads: usize = args.get(5).map_or(Ok(1), |s| s.parse())?;
    let ema: Option<f32> = args.get(6).map(|s| s.parse()).transpose()?;
    // As `clayflow --threads`: rayon across the batch, matrixmultiply single-threaded.
    std::env::set_var("MATMUL_NUM_THREADS", "1");
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;

    let mnist =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist8k-train-images-idx3-ubyte.gz");
    let ds = data::load_auto(&mnist, 1, 28, 28, &Crop::Center)?;
    let (train_set, val_set) = ds.split_last(1000)?;
    let model = ModelConfig::preset("mnist-glow")?;
    let mut cfg = TrainConfig::new(model, "the first 7,000 bundled MNIST digits".into());
    // `clayflow train`'s CPU defaults for a grey Glow (settings.rs).
    cfg.batch_size = 16;
    cfg.lr = 2e-3;
    cfg.minutes = None;
    cfg.max_steps = Some(steps);
    cfg.seed = seed;
    cfg.ema = ema;
    let be = Arc::new(Bf16Convs {
        inner: CpuBackend::default(),
        on,
    });
    eprintln!(
        "bf16_numerics: {} steps, seed {seed}, on {}",
        steps,
        be.name()
    );
    let outcome = train::train(
        be, &Single, &cfg, &train_set, &val_set, &out, false, &mut Print,
    )?;
    println!("{outcome:?}");
    Ok(())
}
