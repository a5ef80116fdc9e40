//! `clayflow train`'s settings: the run's [`TrainConfig`] from the flags on a new run or
//! from the run folder on `--resume`, and the warnings for flags a resumed run does not
//! apply (each names the flag and the saved value used instead).

use crate::{Preset, TrainArgs};
use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::ArgMatches;
use clayflow_trainer::collective::{self, Collective};
use clayflow_trainer::config::ModelConfig;
use clayflow_trainer::train::{self, TrainConfig};
use std::path::{Path, PathBuf};

/// The ids of the arguments given on the command line (not defaulted) in `m`.
pub(crate) fn explicit_args(m: &ArgMatches) -> Vec<String> {
    m.ids()
        .map(|id| id.as_str())
        .filter(|id| m.value_source(id) == Some(ValueSource::CommandLine))
        .map(str::to_string)
        .collect()
}

/// Warnings for the flags in `explicit` (argument ids given on the command line) that a
/// resumed run does not apply because its saved settings (`run/train.json`, `cfg`) decide
/// them: each names the flag and the saved value used instead. Budget (`--epochs`,
/// `--minutes`, `--steps`, `--early-stop`), data (`--data`, `--limit`, `--val-split`,
/// `--crops-per-image`) and display (`--quiet`) flags apply on resume and are not listed.
fn resume_ignored(explicit: &[String], cfg: &TrainConfig, run: &Path) -> Vec<String> {
    let m = &cfg.model;
    let model = format!(
        "the run's saved model ({}x{}x{}, {} levels, {} couplings, hidden {},{}{})",
        m.channels,
        m.height,
        m.width,
        m.levels,
        m.masks.len(),
        m.hidden[0],
        m.hidden[1],
        match (m.glow, m.prior) {
            (true, true) => ", Glow, learned prior",
            (true, false) => ", Glow",
            _ => "",
        }
    );
    let opt = |v: Option<u64>| v.map_or("none".to_string(), |v| v.to_string());
    explicit
        .iter()
        .filter_map(|id| {
            let (flag, saved) = match id.as_str() {
                "preset" => ("--preset", model.clone()),
                "config" => ("--config", model.clone()),
                "couplings" => ("--couplings", format!("{} couplings", m.masks.len())),
                "hidden" => (
                    "--hidden",
                    format!("hidden widths {},{}", m.hidden[0], m.hidden[1]),
                ),
                "prior" | "no_prior" => (
                    if id == "prior" { "--prior" } else { "--no-prior" },
                    if m.prior { "a learned prior" } else { "no learned prior" }.to_string(),
                ),
                "batch_size" => (
                    "--batch-size",
                    format!("batch size {} per rank", cfg.batch_size),
                ),
                "lr" => ("--lr", format!("lr {}", cfg.lr)),
                "warmup" => ("--warmup", format!("warm-up {} steps", cfg.warmup_steps)),
                "clip" => ("--clip", format!("clip {}", cfg.clip_norm)),
                "seed" => ("--seed", format!("seed {}", cfg.seed)),
                "flip" => (
                    "--flip",
                    if cfg.flip { "mirroring" } else { "no mirroring" }.to_string(),
                ),
                "ema" => (
                    "--ema",
                    cfg.ema.map_or("no weight average".to_string(), |d| {
                        format!("a weight average with decay {d}")
                    }),
                ),
                "constant_lr" => (
                    "--constant-lr",
                    if cfg.cosine_decay {
                        "the cosine decay".to_string()
                    } else {
                        "a constant learning rate".to_string()
                    },
                ),
                "checkpoint_secs" => (
                    "--checkpoint-secs",
                    format!("a checkpoint every {} s", cfg.checkpoint_secs),
                ),
                "checkpoint_steps" => (
                    "--checkpoint-steps",
                    format!("checkpoint steps {}", opt(cfg.checkpoint_steps)),
                ),
                "eval_steps" => (
                    "--eval-steps",
                    format!("eval steps {}", opt(cfg.eval_steps)),
                ),
                "samples" => ("--samples", format!("{} samples", cfg.samples)),
                "temperature" => ("--temperature", format!("temperature {}", cfg.temperature)),
                "out" => ("--out", format!("the run folder {}", run.display())),
                "inject_nan_at" => ("--inject-nan-at", format!("{:?}", cfg.inject_nan_at)),
                _ => return None,
            };
            Some(format!(
                "warning: {flag} is ignored on --resume: the run keeps its saved setting, {saved} ({})",
                train::config_path(run).display()
            ))
        })
        .collect()
}

/// The run's settings (rank 0's, on every rank): from the run folder on --resume, else
/// from the flags; the run folder; whether it resumes. `on_host`: whether the backend is the
/// CPU's (it picks the default batch).
pub(crate) fn settings(
    a: &TrainArgs,
    explicit: &[String],
    comm: &dyn Collective,
    on_host: bool,
) -> Result<(TrainConfig, PathBuf, bool)> {
    let root = comm.rank() == 0;
    let (cfg, run_dir, resume) = if let Some(run) = &a.resume {
        // Rank 0 reads the run's settings (the others may not see its folder) and shares them.
        let mut cfg = if root {
            let cfg = train::read_config(run)?;
            for w in resume_ignored(explicit, &cfg, run) {
                eprintln!("{w}");
            }
            cfg
        } else {
            TrainConfig::new(ModelConfig::preset("mnist")?, String::new())
        };
        // Budget flags given on resume replace the saved ones.
        if a.epochs.is_some() || a.minutes.is_some() || a.steps.is_some() {
            cfg.epochs = a.epochs;
            cfg.minutes = a.minutes;
            cfg.max_steps = a.steps;
        }
        // So are data flags; without them the run continues on its own data.
        if a.data.data.is_some() {
            cfg.data = a.data.data.clone();
        }
        if a.limit.is_some() {
            cfg.limit = a.limit;
        }
        if let Some(v) = a.val_split {
            cfg.val_split = v;
        }
        if let Some(c) = a.data.crops_per_image {
            cfg.crops_per_image = c;
        }
        if a.early_stop.is_some() {
            cfg.early_stop = a.early_stop;
        }
        (cfg, run.clone(), true)
    } else {
        let mut model = match &a.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                serde_json::from_str::<ModelConfig>(&text)
                    .with_context(|| format!("{}: not a model configuration", p.display()))?
            }
            None => ModelConfig::preset(match a.preset {
                Preset::Mnist => "mnist",
                Preset::Color => "color",
                Preset::MnistGlow => "mnist-glow",
                Preset::ColorGlow => "color-glow",
            })?,
        };
        if let Some(n) = a.couplings {
            // `alternating_masks` has MAX_COUPLINGS entries: taking more would silently
            // give MAX_COUPLINGS couplings (as `--couplings 48` did until 2026-12-07).
            if !(1..=clayflow_kernel::MAX_COUPLINGS).contains(&n) {
                bail!(
                    "--couplings {n}: a model has 1 to {} couplings (the kernel's limit)",
                    clayflow_kernel::MAX_COUPLINGS
                );
            }
            let first = *model.masks.first().context("model has no couplings")?;
            let arch_first: clayflow_kernel::Mask = first.into();
            model.masks = clayflow_kernel::alternating_masks(arch_first)
                .iter()
                .take(n)
                .map(|&m| m.into())
                .collect();
        }
        if a.prior {
            if !model.glow {
                bail!(
                    "--prior is Glow's learned prior and needs a Glow model: use --preset \
                     mnist-glow or color-glow, or a configuration with \"glow\": true"
                );
            }
            model.prior = true;
        }
        if a.no_prior {
            model.prior = false;
        }
        if let Some(h) = &a.hidden {
            let &[h0, h1] = h.as_slice() else {
                bail!("--hidden takes two widths, e.g. --hidden 16,128 (got {h:?})");
            };
            model.hidden = [h0, h1];
        }
        model.to_arch()?;
        let mut cfg = TrainConfig::new(model, String::new());
        cfg.batch_size = a.batch_size.unwrap_or(default_batch(&cfg.model, on_host));
        cfg.lr = a.lr.unwrap_or(if cfg.model.glow { 2e-3 } else { 1e-3 });
        cfg.warmup_steps = a.warmup;
        cfg.clip_norm = a.clip;
        cfg.seed = a.seed;
        cfg.epochs = a.epochs;
        cfg.max_steps = a.steps;
        cfg.minutes = a.minutes.or(if a.epochs.is_none() && a.steps.is_none() {
            Some(10.0)
        } else {
            None
        });
        cfg.checkpoint_secs = a.checkpoint_secs;
        cfg.checkpoint_steps = a.checkpoint_steps;
        cfg.eval_steps = a.eval_steps;
        cfg.early_stop = a.early_stop;
        cfg.flip = a.flip;
        cfg.ema = a.ema;
        cfg.samples = a.samples;
        cfg.temperature = a.temperature;
        cfg.inject_nan_at = a.inject_nan_at.clone();
        cfg.cosine_decay = !a.constant_lr;
        // An absolute path, so that resuming from another folder finds the same data.
        cfg.data = a
            .data
            .data
            .as_ref()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
        cfg.limit = a.limit;
        cfg.val_split = a.val_split.unwrap_or(1000);
        cfg.crops_per_image = a.data.crops_per_image.unwrap_or(500);
        let out = a.out.clone().unwrap_or_else(|| {
            PathBuf::from("runs").join(match (&a.config, a.preset) {
                (Some(_), _) => "custom",
                (None, Preset::Mnist) => "mnist",
                (None, Preset::Color) => "color",
                (None, Preset::MnistGlow) => "mnist-glow",
                (None, Preset::ColorGlow) => "color-glow",
            })
        });
        (cfg, out, false)
    };
    Ok((collective::broadcast_json(comm, &cfg)?, run_dir, resume))
}

/// The batch of a new run without `--batch-size`: on the CPU, 8 images per step for Glow
/// models of grey images; 64 otherwise. On 2 CPU cores (`--ranks 2`), `mnist-glow` reached
/// 1.2881 bits/dim in 10 minutes at 16, 1.3423 at 32 and 1.4536 at 64; on 2 threads, batch 8
/// beat 16 by 0.030 on two seeds (`BENCHMARKS.md` section 9): smaller batches take many more
/// steps at about the same images/s. A GPU keeps 64, where a batch of 8 would leave it mostly
/// idle (not measured: no GPU here), and so do the colour and RealNVP presets, which were not
/// measured at smaller batches.
pub(crate) fn default_batch(model: &ModelConfig, on_host: bool) -> usize {
    if on_host && model.glow && model.channels == 1 {
        8
    } else {
        64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cli;
    use clap::{CommandFactory, FromArgMatches};

    fn train_matches(args: &[&str]) -> Vec<String> {
        let m = Cli::command()
            .try_get_matches_from(["clayflow", "train"].iter().chain(args))
            .unwrap();
        explicit_args(m.subcommand_matches("train").unwrap())
    }

    /// Every `train` flag either applies on `--resume` or is warned about: a new flag cannot
    /// be silently ignored.
    #[test]
    fn every_train_flag_applies_on_resume_or_is_warned_about() {
        let applies = [
            "epochs",
            "minutes",
            "steps",
            "early_stop",
            "data",
            "crops_per_image",
            "limit",
            "val_split",
            "quiet",
            "resume",
            "ranks",
            // A choice of kernels, made on every run (not saved).
            "bf16",
            // Global.
            "threads",
            "device",
            "help",
        ];
        let cfg = TrainConfig::new(ModelConfig::preset("mnist").unwrap(), String::new());
        let mut cmd = Cli::command();
        cmd.build();
        let train = cmd.find_subcommand("train").unwrap();
        let ids: Vec<String> = train
            .get_arguments()
            .map(|a| a.get_id().as_str().to_string())
            .collect();
        assert!(ids.len() > 20, "{ids:?}");
        for id in ids.iter().filter(|id| !applies.contains(&id.as_str())) {
            let w = resume_ignored(std::slice::from_ref(id), &cfg, Path::new("r"));
            assert_eq!(w.len(), 1, "--resume neither applies nor warns about {id}");
        }
    }

    #[test]
    fn grey_glow_models_train_on_batches_of_8_on_the_cpu_by_default_and_the_rest_on_64() {
        let batch = |p, on_host| default_batch(&ModelConfig::preset(p).unwrap(), on_host);
        assert_eq!(
            (batch("mnist-glow", true), batch("mnist-glow", false)),
            (8, 64)
        );
        for p in ["mnist", "color", "color-glow"] {
            assert_eq!((batch(p, true), batch(p, false)), (64, 64), "{p}");
        }
        let a = TrainArgs::from_arg_matches(
            Cli::command()
                .try_get_matches_from(["clayflow", "train"])
                .unwrap()
                .subcommand_matches("train")
                .unwrap(),
        )
        .unwrap();
        let (cfg, _, resume) = settings(&a, &[], &collective::Single, true).unwrap();
        assert_eq!((cfg.batch_size, resume), (8, false));
        let (cfg, _, _) = settings(&a, &[], &collective::Single, false).unwrap();
        assert_eq!(cfg.batch_size, 64);
    }

    /// The settings of `clayflow train ARGS` on the host.
    fn parse(args: &[&str]) -> anyhow::Result<TrainConfig> {
        let m = Cli::command()
            .try_get_matches_from([&["clayflow", "train"], args].concat())
            .unwrap();
        let a = TrainArgs::from_arg_matches(m.subcommand_matches("train").unwrap()).unwrap();
        settings(&a, &[], &collective::Single, true).map(|(cfg, _, _)| cfg)
    }

    #[test]
    fn prior_turns_on_the_learned_prior_of_a_glow_model_and_refuses_the_others() {
        assert!(!parse(&[]).unwrap().model.prior);
        let cfg = parse(&["--prior"]).unwrap();
        assert!(cfg.model.prior && cfg.model.to_arch().unwrap().prior);
        let err = parse(&["--prior", "--preset", "mnist"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a Glow model"), "{err}");
        // color-glow has it, and --no-prior takes it away.
        assert!(parse(&["--preset", "color-glow"]).unwrap().model.prior);
        let cfg = parse(&["--preset", "color-glow", "--no-prior"]).unwrap();
        assert!(!cfg.model.prior && !cfg.model.to_arch().unwrap().prior);
    }

    #[test]
    fn couplings_past_the_kernels_limit_are_refused_not_truncated() {
        assert_eq!(parse(&["--couplings", "24"]).unwrap().model.masks.len(), 24);
        for n in ["48", "0"] {
            let err = parse(&["--couplings", n]).unwrap_err().to_string();
            assert!(err.contains("1 to 32 couplings"), "{err}");
        }
    }

    #[test]
    fn resume_names_each_explicit_setting_it_ignores_with_the_saved_value() {
        let mut cfg = TrainConfig::new(ModelConfig::preset("mnist").unwrap(), String::new());
        cfg.batch_size = 16;
        cfg.lr = 1e-3;
        let run = Path::new("runs/x");
        // Defaults (seed 0, ...) given by clap are not "explicit".
        let explicit = train_matches(&["--resume", "runs/x", "--steps", "5", "--quiet"]);
        assert!(
            resume_ignored(&explicit, &cfg, run).is_empty(),
            "{explicit:?}"
        );
        // Giving a default value explicitly still counts.
        let explicit = train_matches(&[
            "--resume",
            "runs/x",
            "--batch-size",
            "64",
            "--lr",
            "0.5",
            "--hidden",
            "4,8",
            "--seed",
            "0",
            "--data",
            "d.gz",
            "--ema",
            "0.99",
            "--prior",
        ]);
        let w = resume_ignored(&explicit, &cfg, run);
        assert_eq!(w.len(), 6, "{w:?}");
        let find = |flag: &str| {
            w.iter()
                .find(|l| l.contains(&format!("{flag} is ignored on --resume")))
                .unwrap_or_else(|| panic!("no warning for {flag}: {w:?}"))
                .clone()
        };
        assert!(find("--batch-size").contains("batch size 16"));
        assert!(find("--lr").contains("lr 0.001"));
        let h = cfg.model.hidden;
        assert!(find("--hidden").contains(&format!("hidden widths {},{}", h[0], h[1])));
        assert!(find("--seed").contains("seed 0"));
        assert!(find("--ema").contains("no weight average"));
        assert!(find("--prior").contains("no learned prior"));
        assert!(w.iter().all(|l| l.contains("train.json")), "{w:?}");
    }
}
