//! `clayflow train` in one process (part of the binary, not the library): as one rank, or
//! (`--ranks N`, by default on the CPU as many as the threads allow) as N in-process ranks ([`collective::threads`]) that split the
//! batch, each a thread with its own share of the rayon threads.
//!
//! The settings and the data are read once and shared by the ranks; rank 0 alone writes the
//! run folder and prints, as under MPI.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use clayflow_trainer::backend::select::DeviceChoice;
use clayflow_trainer::backend::{Backend, Storage};
use clayflow_trainer::checkpoint;
use clayflow_trainer::collective::threads::RanksError;
use clayflow_trainer::collective::{self, Single};

use super::{describe, settings, train_backend, train_on, training_data, TrainArgs};

/// Trains in this process (no MPI launcher started it).
pub(super) fn train(a: TrainArgs, device: DeviceChoice, explicit: &[String]) -> Result<()> {
    // The device first: a missing GPU fails before the data is loaded, and the default
    // batch depends on it.
    let be = train_backend(&a, device, 0)?;
    let host = on_host(be.as_ref())?;
    let (mut cfg, run_dir, resume) = settings(&a, explicit, &Single, host)?;
    // The global pool's size: --threads, else RAYON_NUM_THREADS or the cores.
    let threads = rayon::current_num_threads();
    let saved_world = if resume {
        // Unreadable: `train::train` reports why, with its advice.
        checkpoint::load(&run_dir)
            .ok()
            .map(|(c, _)| c.state.world_size)
    } else {
        None
    };
    let plan = Plan {
        asked: a.ranks,
        on_host: host,
        batch: cfg.batch_size,
        threads,
        saved_world,
    };
    let ranks = plan.ranks()?;
    if !resume {
        // The saved batch (train.json) is per rank, as under MPI.
        cfg.batch_size /= ranks;
    }
    let (cfg, train_set, val_set) = training_data(cfg, resume)?;
    if ranks == 1 {
        return train_on(
            &a, be, &Single, &cfg, &run_dir, resume, &train_set, &val_set,
        );
    }
    let per_rank = (threads / ranks).max(1);
    collective::threads::run(ranks, per_rank, |comm| {
        train_on(
            &a,
            Arc::clone(&be),
            comm,
            &cfg,
            &run_dir,
            resume,
            &train_set,
            &val_set,
        )
    })
    .map_err(|e| match e {
        // The rank's causes as `describe` joins them: `RanksError`'s `{:#}` would print a
        // cause twice where an error type holds its source in its own message.
        RanksError::Failed { rank, size, error } => {
            anyhow!("Error on rank {rank} of {size}: {}", describe(&error))
        }
        other => other.into(),
    })?;
    Ok(())
}

/// Whether `be` keeps its buffers in host memory (the CPU backend).
pub(super) fn on_host(be: &dyn Backend) -> Result<bool> {
    Ok(matches!(be.upload(&[0.0])?.storage, Storage::Host(_)))
}

/// What decides the number of in-process ranks.
#[derive(Debug)]
struct Plan {
    /// `--ranks`.
    asked: Option<usize>,
    /// Whether the backend is the CPU's.
    on_host: bool,
    /// `--batch-size` (of a new run).
    batch: usize,
    /// The threads the ranks share.
    threads: usize,
    /// The world size of the checkpoint a resumed run continues from.
    saved_world: Option<usize>,
}

impl Plan {
    /// The number of ranks, or why the flags do not allow one.
    fn ranks(&self) -> Result<usize> {
        match self.asked {
            Some(0) => bail!("--ranks must be at least 1"),
            Some(n) if n > 1 && !self.on_host => bail!(
                "--ranks {n}: in-process ranks are for the CPU backend; a GPU trains as one \
                 rank (for several GPUs, start one process per GPU with mpirun)"
            ),
            _ if !self.on_host => return Ok(1),
            _ => {}
        }
        if let Some(w) = self.saved_world {
            // A resumed run keeps its per-rank batch: its own rank count keeps the run as
            // it was.
            return Ok(self.asked.unwrap_or(w).max(1));
        }
        let n = self
            .asked
            .unwrap_or_else(|| auto_ranks(self.batch, self.threads));
        if !self.batch.is_multiple_of(n) || self.batch < n {
            bail!(
                "--batch-size {} does not split evenly among {n} ranks: give a batch that is \
                 a multiple of --ranks",
                self.batch
            );
        }
        Ok(n)
    }
}

/// Fewest images a rank gets from [`auto_ranks`]: the smallest share measured (2 ranks of 4).
const MIN_IMAGES_PER_RANK: usize = 4;

/// The ranks of a new CPU run without `--ranks`: the most, up to one per thread, that split
/// `batch` evenly with at least [`MIN_IMAGES_PER_RANK`] images each (1 if none does). On
/// this project's 2 cores, 2 ranks beat rayon inside each op at every batch measured:
/// 1.8x the images/s at batch 8 (462 against 257, 1.2382 against 1.2788 bits/dim in 10
/// minutes), 1.35x at 16, 1.2x at 64, and the same speed on a busy machine (README,
/// "Data-parallel training in one process"). More than 2 ranks were not measured.
fn auto_ranks(batch: usize, threads: usize) -> usize {
    (1..=threads.min(batch / MIN_IMAGES_PER_RANK))
        .rev()
        .find(|&n| batch.is_multiple_of(n))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(asked: Option<usize>, on_host: bool, batch: usize) -> Plan {
        Plan {
            asked,
            on_host,
            batch,
            threads: 2,
            saved_world: None,
        }
    }

    #[test]
    fn a_new_cpu_run_takes_a_rank_per_thread_that_leaves_four_images_each_unless_asked() {
        assert_eq!(plan(None, true, 8).ranks().unwrap(), 2);
        assert_eq!(plan(None, true, 64).ranks().unwrap(), 2);
        assert_eq!(plan(Some(1), true, 64).ranks().unwrap(), 1);
        assert_eq!(plan(Some(16), true, 64).ranks().unwrap(), 16);
        // Too small a batch to split, or an odd one: one rank.
        assert_eq!(plan(None, true, 7).ranks().unwrap(), 1);
        assert_eq!(plan(None, true, 6).ranks().unwrap(), 1);
        assert_eq!(plan(None, true, 1).ranks().unwrap(), 1);
        let mut p = plan(None, true, 8);
        p.threads = 1;
        assert_eq!(p.ranks().unwrap(), 1);
        // The most ranks that split the batch evenly, up to one per thread.
        for (batch, threads, want) in [
            (8, 16, 2),
            (64, 16, 16),
            (64, 12, 8),
            (48, 5, 4),
            (12, 4, 3),
        ] {
            p.batch = batch;
            p.threads = threads;
            assert_eq!(p.ranks().unwrap(), want, "batch {batch}, {threads} threads");
        }
    }

    #[test]
    fn a_gpu_trains_as_one_rank_and_refuses_more() {
        assert_eq!(plan(None, false, 64).ranks().unwrap(), 1);
        assert_eq!(plan(Some(1), false, 64).ranks().unwrap(), 1);
        let e = plan(Some(2), false, 64).ranks().unwrap_err().to_string();
        assert!(e.contains("CPU backend"), "{e}");
    }

    #[test]
    fn asked_ranks_must_split_the_batch() {
        assert_eq!(plan(Some(4), true, 64).ranks().unwrap(), 4);
        let e = plan(Some(3), true, 64).ranks().unwrap_err().to_string();
        assert!(
            e.contains("--batch-size 64 does not split evenly among 3"),
            "{e}"
        );
        assert!(plan(Some(0), true, 64).ranks().is_err());
        assert!(plan(Some(8), true, 4).ranks().is_err());
    }

    #[test]
    fn a_resumed_run_keeps_its_rank_count_unless_asked() {
        let mut p = plan(None, true, 64);
        p.saved_world = Some(3);
        assert_eq!(p.ranks().unwrap(), 3);
        p.asked = Some(1);
        assert_eq!(p.ranks().unwrap(), 1);
        p.on_host = false;
        p.asked = None;
        assert_eq!(p.ranks().unwrap(), 1);
    }
}
