//! `clayflow`: train, evaluate, sample from and export RealNVP normalizing flows.

use anyhow::{bail, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use clayflow_kernel::DType;
use clayflow_trainer::backend::cpu::CpuBackend;
use clayflow_trainer::backend::select::{self, DeviceChoice};
use clayflow_trainer::backend::Backend;
use clayflow_trainer::collective::{self, Collective};
use clayflow_trainer::data::{self, Crop, Dataset};
use clayflow_trainer::export;
use clayflow_trainer::sample;
use clayflow_trainer::source::{self, Pick, Source};
use clayflow_trainer::train::{self, Progress, TrainConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod in_process;
mod settings;

use settings::{explicit_args, settings};

#[derive(Parser, Debug)]
#[command(
    name = "clayflow",
    version,
    about = "RealNVP normalizing flows: train on images, score them, sample them, export to the no_std kernel"
)]
struct Cli {
    /// Worker threads (default: all cores); a training run's in-process ranks share them.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Compute device: auto (the GPU when one is usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, global = true, default_value = "auto")]
    device: DeviceChoice,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a flow (with no arguments: the mnist-glow preset on the bundled 8,000 digits).
    Train(Box<TrainArgs>),
    /// Bits/dim of a run, checkpoint or exported blob on a data set.
    Eval(EvalArgs),
    /// Draw a PNG grid of samples from a run, checkpoint or exported blob.
    Sample(SampleArgs),
    /// Export a checkpoint to the kernel's weight blob, verified before it is written.
    Export(ExportArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Preset {
    /// The seed's RealNVP for 28x28 digits (one scale, channel and checkerboard couplings).
    Mnist,
    /// The seed's RealNVP for 32x32 colour images.
    Color,
    /// Glow for digits: 2 levels x 16 steps (ActNorm, 1x1 convolution, coupling), ~300k parameters.
    MnistGlow,
    /// Glow for 32x32 colour images: 3 levels x 8 steps, ~3.3M parameters.
    ColorGlow,
}

#[derive(clap::Args, Debug)]
struct DataArgs {
    /// Data: an IDX file (gz or raw), a CIFAR-10 folder or .bin file, or a folder of PNG/JPEG
    /// images. Default: the bundled MNIST digits, or the bundled photos for colour models.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Random crops per picture when the data is an image folder (0: one centre crop each;
    /// default 500, or the run's setting on --resume).
    #[arg(long)]
    crops_per_image: Option<usize>,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Model preset.
    #[arg(long, value_enum, default_value_t = Preset::MnistGlow)]
    preset: Preset,
    /// Model configuration file (JSON, the `model` object of a run's train.json); overrides --preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the number of couplings (masks keep alternating).
    #[arg(long)]
    couplings: Option<usize>,
    /// Override the two hidden widths, e.g. 16,128 (or 16 128).
    #[arg(long, value_delimiter = ',', num_args = 1..=2)]
    hidden: Option<Vec<usize>>,
    /// Glow's learned prior: a 3x3 convolution of the channels a split keeps gives the mean
    /// and scale of those that leave, and a learned per-channel top prior (Glow models only;
    /// `color-glow` has it already).
    #[arg(long, conflicts_with = "no_prior")]
    prior: bool,
    /// Without the learned prior (for a preset that has it: `color-glow`).
    #[arg(long)]
    no_prior: bool,
    #[command(flatten)]
    data: DataArgs,
    /// Images held out (the last ones) for validation (default 1000, at most a fifth of the
    /// data; on --resume the run's setting).
    #[arg(long)]
    val_split: Option<usize>,
    /// Use only the first N training images (quick runs).
    #[arg(long)]
    limit: Option<usize>,
    /// Stop after this many epochs.
    #[arg(long)]
    epochs: Option<u64>,
    /// Stop after this many minutes of training (default 10 when no other limit is given).
    #[arg(long)]
    minutes: Option<f64>,
    /// Stop after this many steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Images per step of this process, split evenly among its --ranks; under `mpirun -np N`
    /// (a build with `--features mpi`) each process is one rank and the global batch is N
    /// times this. Default: 8 for Glow models of grey images on the CPU (mnist-glow after
    /// 10 minutes on 2 cores: 1.2788 bits/dim at 8, 1.3131 at 16, 1.4536 at 64 on 2
    /// ranks), 64 otherwise.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Data-parallel ranks inside this process (CPU backend only): N threads, each training
    /// on batch-size/N images with its share of --threads, the gradients summed in rank
    /// order (bit-identical to `mpirun -np N` with batch-size/N per process). Default on the
    /// CPU: as many ranks as --threads allows with at least 4 images each (2 ranks of 4 on 2
    /// cores at batch 8: 1.8x the images/s of one rank); 1 gives rayon inside each op, and
    /// results that do not depend on --threads. On --resume: the run's own rank count (the
    /// saved batch is per rank, so another count changes the global batch, with a warning).
    /// Refused on a GPU and under mpirun.
    #[arg(long, value_name = "N")]
    ranks: Option<usize>,
    /// Peak learning rate (Adam); default 2e-3 for the Glow presets (measured: 1.4457 against
    /// 1.5234 bits/dim after 10 minutes of mnist-glow at 1e-3), 1e-3 otherwise.
    #[arg(long)]
    lr: Option<f32>,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Gradient-norm clipping threshold.
    #[arg(long, default_value_t = 100.0)]
    clip: f32,
    /// Seed (initialisation, shuffling, noise): the same seed gives the same run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run folder (checkpoints, metrics.jsonl, samples.png, loss.svg); default `runs/PRESET`
    /// (`runs/custom` with --config).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint, with its saved settings:
    /// budget, data and --early-stop flags apply; a model or optimiser flag given with it
    /// is not applied, and a warning names it and the saved value.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Seconds between checkpoints.
    #[arg(long, default_value_t = 60.0)]
    checkpoint_secs: f64,
    /// Also checkpoint every N steps.
    #[arg(long)]
    checkpoint_steps: Option<u64>,
    /// Validate every N steps (besides every epoch end).
    #[arg(long)]
    eval_steps: Option<u64>,
    /// Stop once N validations in a row have not improved on the best (the best checkpoint
    /// is kept either way; applies on --resume too).
    #[arg(long, value_name = "N")]
    early_stop: Option<u64>,
    /// Mirror each training image left to right with probability 1/2: cheap augmentation
    /// for photos and small data (digits are not mirror-symmetric; validation images are
    /// never mirrored).
    #[arg(long)]
    flip: bool,
    /// Keep an exponential moving average of the weights with this decay (Polyak
    /// averaging, e.g. 0.999): validation, the best checkpoint, the samples and the saved
    /// model (eval, sample, export) use the average, and the trained weights are scored
    /// beside it.
    #[arg(long, value_name = "DECAY")]
    ema: Option<f32>,
    /// Samples in the final grid.
    #[arg(long, default_value_t = 64)]
    samples: usize,
    /// Sampling temperature of the final grid.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep the learning rate constant after warm-up (default: cosine decay to 5% by the end).
    #[arg(long)]
    constant_lr: bool,
    /// Train the coupling networks' 1x1 convolutions with bf16 operands and f32 sums on AMX
    /// (CPU backend; Intel Xeon 4th generation, Sapphire Rapids, or later, Linux 5.16+):
    /// mnist-glow's step 1.18x faster on one core (BENCHMARKS section 14). Validation during
    /// the run uses the same networks; `clayflow eval` scores in f32, and the saved model,
    /// sampling and export are f32 as always. Not a saved setting: give it on --resume too.
    #[arg(long)]
    bf16: bool,
    /// No progress bar (log lines only).
    #[arg(long)]
    quiet: bool,
    /// Testing hook: poison the batch at these steps with a NaN.
    #[arg(long, hide = true, value_delimiter = ',')]
    inject_nan_at: Vec<u64>,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// A run folder (its best-validation checkpoint), a checkpoint folder, or an exported
    /// blob.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Score only the last N images, at most a fifth of the data (how training holds out its
    /// validation split); 0 = all. Default: all images of a --data file; without --data, the
    /// bundled data's validation split (the last 1000).
    #[arg(long)]
    last: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Of a run folder, use the latest checkpoint instead of the best-validation one.
    #[arg(long)]
    latest: bool,
}

#[derive(clap::Args, Debug)]
struct SampleArgs {
    /// A run folder (its best-validation checkpoint), a checkpoint folder, or an exported
    /// blob (sampled with the kernel).
    #[arg(long)]
    model: PathBuf,
    /// Of a run folder, use the latest checkpoint instead of the best-validation one.
    #[arg(long)]
    latest: bool,
    /// Number of images.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// Temperature (standard deviation of the latent).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Seed of the latents.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output PNG.
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F16,
    F32,
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    /// A run folder (its best-validation checkpoint) or a checkpoint folder.
    #[arg(long)]
    model: PathBuf,
    /// Of a run folder, export the latest checkpoint instead of the best-validation one.
    #[arg(long)]
    latest: bool,
    /// Output blob.
    #[arg(long)]
    out: PathBuf,
    /// Weight storage type.
    #[arg(long, value_enum, default_value_t = Dtype::F16)]
    dtype: Dtype,
    #[command(flatten)]
    data: DataArgs,
}

fn data_dir() -> PathBuf {
    let local = PathBuf::from("data");
    if local.join("mnist8k-train-images-idx3-ubyte.gz").exists() {
        local
    } else {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../data"))
    }
}

/// Loads the data a model of shape `(c, h, w)` trains on.
fn load_data(args: &DataArgs, c: usize, h: usize, w: usize) -> Result<(Dataset, String)> {
    let path = match &args.data {
        Some(p) => p.clone(),
        None if c == 1 && h == 28 && w == 28 => {
            data_dir().join("mnist8k-train-images-idx3-ubyte.gz")
        }
        None if c == 3 => data_dir().join("photos"),
        None => bail!("no bundled data fits a {c}x{h}x{w} model; pass --data"),
    };
    let crops_per_image = args.crops_per_image.unwrap_or(500);
    let crop = if crops_per_image == 0 {
        Crop::Center
    } else {
        Crop::Random {
            per_image: crops_per_image,
            scale_to: (2 * h.max(w)).max(64) as u32,
            seed: 7,
        }
    };
    let ds = data::load_auto(&path, c, h, w, &crop)?;
    let desc = format!(
        "{} ({} images of {}x{}x{})",
        path.display(),
        ds.len(),
        c,
        h,
        w
    );
    Ok((ds, desc))
}

struct Bar {
    bar: Option<ProgressBar>,
    /// Ranks of a data-parallel run (the images/s are over all of them).
    ranks: usize,
    /// Only rank 0 talks.
    quiet: bool,
}

impl Progress for Bar {
    fn step(
        &mut self,
        state: &clayflow_trainer::checkpoint::TrainState,
        running_bpd: f64,
        ips: f64,
        frac: f64,
    ) {
        if let Some(b) = &self.bar {
            let ranks = if self.ranks > 1 {
                format!(" on {} ranks", self.ranks)
            } else {
                String::new()
            };
            b.set_position((frac * 1000.0) as u64);
            b.set_message(format!(
                "step {} epoch {} | train {:.3} bits/dim | {:.0} img/s{ranks}",
                state.step,
                state.epoch + 1,
                running_bpd,
                ips
            ));
        }
    }

    fn note(&mut self, line: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
}

/// The backend for `--device`; prints the one-line notice when `auto` falls back to the CPU.
fn backend(device: DeviceChoice) -> Result<Arc<dyn Backend>> {
    backend_of_rank(device, 0)
}

/// The backend for `--device` of a rank whose index on its machine is `local_rank`: `auto`
/// picks that GPU.
fn backend_of_rank(device: DeviceChoice, local_rank: usize) -> Result<Arc<dyn Backend>> {
    let opened = select::open_local(device, local_rank)?;
    if let Some(n) = &opened.notice {
        eprintln!("{n}");
    }
    Ok(opened.backend)
}

/// The training backend of a rank: `--device`'s, with bf16 networks when `--bf16` asks
/// (CPU only).
fn train_backend(
    a: &TrainArgs,
    device: DeviceChoice,
    local_rank: usize,
) -> Result<Arc<dyn Backend>> {
    let be = backend_of_rank(device, local_rank)?;
    if !a.bf16 {
        return Ok(be);
    }
    if !in_process::on_host(be.as_ref())? {
        bail!(
            "--bf16: bf16 networks are built for the CPU backend only (AMX), and this run is on \
             {}; leave out --bf16 (the GPU trains in f32), or add --device cpu",
            be.name()
        );
    }
    match CpuBackend::with_bf16_networks() {
        Some(cpu) => Ok(Arc::new(cpu)),
        None => bail!(
            "--bf16 needs AMX-BF16 (Intel Xeon 4th generation, Sapphire Rapids, or later) and a \
             Linux kernel that grants its tile state (5.16 or later); this machine has no such \
             CPU or kernel: leave out --bf16"
        ),
    }
}

fn cmd_train(a: TrainArgs, device: DeviceChoice, explicit: &[String]) -> Result<()> {
    let comm = collective::open()?;
    if comm.size() == 1 {
        return in_process::train(a, device, explicit);
    }
    if let Some(n) = a.ranks.filter(|&n| n > 1) {
        bail!(
            "--ranks {n} runs ranks inside one process, but {} already started this process as \
             one of {} ranks: leave out --ranks (or run one process with it, without mpirun)",
            comm.describe(),
            comm.size()
        );
    }
    let result = train_as_rank(a, device, explicit, comm.as_ref());
    if let Err(e) = &result {
        if comm.size() > 1 {
            // The other ranks would wait for this one forever: end the whole job. The line
            // goes out in one write: `eprintln!` writes each formatted piece separately,
            // and mpirun's own abort notice then lands in the middle of it.
            let line = format!(
                "Error on rank {} of {}: {}\n",
                comm.rank(),
                comm.size(),
                describe(e)
            );
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(line.as_bytes()).and_then(|()| err.flush());
            drop(err);
            comm.abort(1);
        }
    }
    result
}

/// `clayflow train` as one rank of an MPI job's `comm`.
fn train_as_rank(
    a: TrainArgs,
    device: DeviceChoice,
    explicit: &[String],
    comm: &dyn Collective,
) -> Result<()> {
    // The device first: a missing GPU fails before the data is loaded, and the default
    // batch depends on it.
    let be = train_backend(&a, device, comm.local_rank())?;
    let (cfg, run_dir, resume) = settings(&a, explicit, comm, in_process::on_host(be.as_ref())?)?;
    // On GPUs with NCCL, the gradients are summed on the device.
    let (on_device, why_host) = collective::for_backend(comm, be.as_ref());
    let comm: &dyn Collective = on_device.as_deref().unwrap_or(comm);
    if let (Some(why), 0) = (why_host, comm.rank()) {
        eprintln!("{why}");
    }
    let (cfg, train_set, val_set) = training_data(cfg, resume)?;
    train_on(&a, be, comm, &cfg, &run_dir, resume, &train_set, &val_set)
}

/// The training and validation sets of `cfg` (with the data's description on a new run).
fn training_data(mut cfg: TrainConfig, resume: bool) -> Result<(TrainConfig, Dataset, Dataset)> {
    let arch = cfg.model.to_arch()?;
    let data_args = DataArgs {
        data: cfg.data.clone(),
        crops_per_image: Some(cfg.crops_per_image),
    };
    let (ds, desc) = load_data(&data_args, arch.channels, arch.height, arch.width)?;
    // Hold out the last `val_split` images, but never more than a fifth of a small set.
    let val_n = cfg.val_split.min(ds.len() / 5).max(1);
    let (mut train_set, val_set) = ds.split_last(val_n)?;
    if let Some(n) = cfg.limit {
        train_set.truncate(n);
    }
    if !resume {
        cfg.dataset = desc;
    }
    Ok((cfg, train_set, val_set))
}

/// Trains as one rank of `comm` (every rank calls this with the same settings and data);
/// rank 0 prints the summary and the report.
#[allow(clippy::too_many_arguments)]
fn train_on(
    a: &TrainArgs,
    be: Arc<dyn Backend>,
    comm: &dyn Collective,
    cfg: &TrainConfig,
    run_dir: &Path,
    resume: bool,
    train_set: &Dataset,
    val_set: &Dataset,
) -> Result<()> {
    let root = comm.rank() == 0;
    let arch = cfg.model.to_arch()?;
    let ranks = comm.size();
    if root {
        let batch = if ranks > 1 {
            format!(
                "batch {} x {ranks} ranks = {} ({})",
                cfg.batch_size,
                cfg.batch_size * ranks,
                comm.describe()
            )
        } else {
            format!("batch {}", cfg.batch_size)
        };
        eprintln!(
            "clayflow: {} parameters, {} training / {} validation images{}, {batch}, on {}{}",
            clayflow_trainer::config::trainable_params(&arch),
            train_set.len(),
            val_set.len(),
            if cfg.flip {
                " (mirrored at random)"
            } else {
                ""
            },
            be.name(),
            if ranks > 1 { " per rank" } else { "" }
        );
        if let Some(d) = cfg.ema {
            eprintln!(
                "weight average (decay {d}): validation, the best checkpoint, the samples \
                 and the saved model use it"
            );
        }
        eprintln!("run folder: {}", run_dir.display());
    }
    let bar = if a.quiet || !root || !console_is_tty() {
        None
    } else {
        let b = ProgressBar::new(1000);
        b.set_style(
            ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30} {percent:>3}% ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(500));
        Some(b)
    };
    let mut progress = Bar {
        bar,
        ranks,
        quiet: !root,
    };
    let outcome = train::train(
        be,
        comm,
        cfg,
        train_set,
        val_set,
        run_dir,
        resume,
        &mut progress,
    )?;
    if let Some(b) = &progress.bar {
        b.finish_and_clear();
    }
    if !root {
        return Ok(());
    }
    let ranks = if outcome.world_size > 1 {
        format!(
            " on {} ranks (global batch {})",
            outcome.world_size, outcome.global_batch
        )
    } else {
        String::new()
    };
    let trained = train::trained_note(outcome.val_trained_bpd);
    println!(
        "trained {} steps in {:.1} min{ranks} ({:.0} images/s); validation {:.4} bits/dim on {} held-out images{trained}",
        outcome.steps,
        outcome.elapsed_secs / 60.0,
        outcome.images_per_sec,
        outcome.val_bpd,
        outcome.val_images
    );
    if let Some(why) = &outcome.early_stop {
        println!("stopped before the budget: {why}");
    }
    match &outcome.best {
        Some(b) => println!(
            "best checkpoint: {} (step {}, validation {:.4} bits/dim); eval, sample and export use it unless given --latest",
            b.dir.display(),
            b.step,
            b.val_bpd
        ),
        None => println!("best checkpoint: none marked (eval, sample and export use the latest)"),
    }
    if outcome.nonfinite_samples > 0 {
        println!(
            "{} of the {} samples had non-finite pixels (see metrics.jsonl)",
            outcome.nonfinite_samples, cfg.samples
        );
    }
    if outcome.nonfinite_skips > 0 {
        println!(
            "{} non-finite steps were skipped (see metrics.jsonl)",
            outcome.nonfinite_skips
        );
    }
    println!("samples: {}", outcome.samples_png.display());
    println!("loss curve: {}", run_dir.join("loss.svg").display());
    println!("checkpoints: {}", run_dir.join("checkpoints").display());
    Ok(())
}

fn console_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// The checkpoint choice of `--latest`.
fn pick(latest: bool) -> Pick {
    if latest {
        Pick::Latest
    } else {
        Pick::Best
    }
}

/// Opens `--model` for `eval` and `sample`, telling the user (stderr) which checkpoint of a
/// run is used and any fallback taken.
fn open_model(path: &Path, latest: bool) -> Result<Source> {
    let (src, origin) = Source::open_pick(path, pick(latest))?;
    if let Some(o) = origin {
        tell_origin(&o);
    }
    Ok(src)
}

fn tell_origin(o: &source::Origin) {
    for n in &o.notes {
        eprintln!("warning: {n}");
    }
    eprintln!("model: {}", o.what);
}

fn cmd_eval(a: EvalArgs, device: DeviceChoice) -> Result<()> {
    let src = open_model(&a.model, a.latest)?;
    let arch = src.arch()?;
    let (ds, desc) = load_data(&a.data, arch.channels, arch.height, arch.width)?;
    let total = ds.len();
    let (ds, which) = match eval_last(a.last, a.data.data.is_some(), total) {
        Some(k) => {
            let which = format!(
                "the last {k} of {total} (indices {}..{}){}",
                total - k,
                total - 1,
                if a.last.is_none() {
                    ", the validation split of the bundled data; --last 0 scores all"
                } else {
                    ""
                }
            );
            (ds.split_last(k)?.1, which)
        }
        None => (ds, format!("all {total}")),
    };
    let v = src.evaluate(backend(device)?, &ds, a.batch_size.max(1))?;
    let kind = match src {
        Source::Checkpoint(_) => "checkpoint (trainer)",
        Source::Blob(_) => "blob (kernel)",
    };
    println!(
        "{v:.4} bits/dim on {} images of {desc}: {which} [{kind}; fixed uniform dequantization noise]",
        ds.len()
    );
    Ok(())
}

/// How many of the last images `eval` scores (`None`: all of them). `--last N` (`last`)
/// takes the last N, at most a fifth of the data, as training holds out its validation
/// split; `--last 0` takes all. Without `--last`, a `--data` file is scored whole and the
/// bundled data by its validation split (the last 1000).
fn eval_last(last: Option<usize>, data_given: bool, total: usize) -> Option<usize> {
    let n = match last {
        Some(0) => return None,
        Some(n) => n,
        None if data_given => return None,
        None => 1000,
    };
    Some(n.min(total / 5).max(1).min(total))
}

fn cmd_sample(a: SampleArgs, device: DeviceChoice) -> Result<()> {
    let src = open_model(&a.model, a.latest)?;
    let arch = src.arch()?;
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    let samples = src.sample(backend(device)?, a.n, a.temperature, a.seed)?;
    sample::write_grid(&a.out, &samples.pixels, a.n, &arch)?;
    println!(
        "wrote {} samples (temperature {}, seed {}) to {}",
        a.n,
        a.temperature,
        a.seed,
        a.out.display()
    );
    if let Some(note) = samples.nonfinite_note(a.n) {
        println!("{note}");
    }
    Ok(())
}

fn cmd_export(a: ExportArgs, device: DeviceChoice) -> Result<()> {
    let dtype = match a.dtype {
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
    };
    let (ckpt, origin) = source::open_checkpoint(&a.model, pick(a.latest))?;
    tell_origin(&origin);
    let arch = ckpt.model.to_arch()?;
    let (ds, _) = load_data(&a.data, arch.channels, arch.height, arch.width)?;
    let k = 64.min(ds.len());
    let check = ds.split_last(k)?.1;
    let ag =
        export::export_checkpoint(backend(device)?, &ckpt, &origin.dir, &a.out, dtype, &check)?;
    let size = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({} bytes, {:?} weights); kernel vs trainer on {} images: max |bits/dim diff| {:.2e}, max |sample diff| {:.2e} ({} of {} sample pixels differ); kernel bits/dim {:.4}",
        a.out.display(),
        size,
        dtype,
        ag.images,
        ag.max_bpd_diff,
        ag.max_sample_diff,
        ag.pixels_differing,
        16.min(ag.images) * arch.dim(),
        ag.kernel_bpd
    );
    Ok(())
}

/// The error and its chain of causes joined by `: ` (like anyhow's `{:#}`), leaving out a
/// cause whose text the message already holds: several error types here put their source
/// into their own message, which `{:#}` would print twice.
fn describe(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

fn main() {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let train_explicit = matches
        .subcommand_matches("train")
        .map(explicit_args)
        .unwrap_or_default();
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        // rayon parallelises across the batch; matrixmultiply's own threads would fight it.
        std::env::set_var("MATMUL_NUM_THREADS", "1");
    }
    if let Some(t) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build_global()
        {
            eprintln!("error: cannot set up {t} threads: {e}");
            std::process::exit(2);
        }
    }
    let device = cli.device;
    let result = match cli.command {
        Some(Command::Train(a)) => cmd_train(*a, device, &train_explicit),
        Some(Command::Eval(a)) => cmd_eval(a, device),
        Some(Command::Sample(a)) => cmd_sample(a, device),
        Some(Command::Export(a)) => cmd_export(a, device),
        None => match Cli::try_parse_from(["clayflow", "train"]) {
            Ok(Cli {
                command: Some(Command::Train(a)),
                ..
            }) => cmd_train(*a, device, &[]),
            _ => Err(anyhow::anyhow!(
                "internal: default train arguments do not parse"
            )),
        },
    };
    if let Err(e) = result {
        eprintln!("error: {}", describe(&e));
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_scores_a_data_file_whole_and_the_bundled_data_by_its_split() {
        // A --data file: all of it, unless --last says otherwise.
        assert_eq!(eval_last(None, true, 2000), None);
        assert_eq!(eval_last(Some(0), true, 2000), None);
        assert_eq!(eval_last(Some(64), true, 2000), Some(64));
        // --last N keeps training's rule: at most a fifth of the data.
        assert_eq!(eval_last(Some(1500), true, 2000), Some(400));
        // The bundled data: its validation split by default.
        assert_eq!(eval_last(None, false, 8000), Some(1000));
        assert_eq!(eval_last(Some(0), false, 8000), None);
        // Tiny sets never panic and score at least one image.
        assert_eq!(eval_last(None, false, 3), Some(1));
        assert_eq!(eval_last(Some(5), true, 0), Some(0));
    }
}
