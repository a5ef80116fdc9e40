//! [`run`]: the ranks of an in-process world, one OS thread each, each with its own rayon
//! pool, and the first failure among them as the job's error.

use std::any::Any;
use std::sync::Arc;
use std::thread;

use super::{Shared, Stop, Threads};

/// Why an in-process job failed: the first rank that stopped, and its error.
#[derive(Debug, thiserror::Error)]
pub enum RanksError<E> {
    /// The rank's work returned an error.
    #[error("Error on rank {rank} of {size}: {error:#}")]
    Failed {
        /// The rank.
        rank: usize,
        /// The number of ranks.
        size: usize,
        /// Its error.
        error: E,
    },
    /// The rank panicked.
    #[error("Error on rank {rank} of {size}: it panicked: {message}")]
    Panicked {
        /// The rank.
        rank: usize,
        /// The number of ranks.
        size: usize,
        /// The panic's message.
        message: String,
    },
    /// The rank's thread or its rayon pool could not be started.
    #[error("Error on rank {rank} of {size}: cannot start its thread: {message}")]
    Start {
        /// The rank.
        rank: usize,
        /// The number of ranks.
        size: usize,
        /// Why.
        message: String,
    },
}

/// How one rank ended.
enum Outcome<T, E> {
    Done(T),
    Error(E),
    Panic(String),
    Start(String),
}

/// Marks its rank stopped when dropped: failed, unless it finished (also when unwinding
/// from a panic, so that no rank waits for a dead one).
struct OnExit<'a> {
    shared: &'a Shared,
    rank: usize,
    why: Stop,
}

impl Drop for OnExit<'_> {
    fn drop(&mut self) {
        self.shared.stop(self.rank, self.why);
    }
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// One rank's thread: `f` in a rayon pool of `threads` threads.
fn rank_main<T, E, F>(comm: Threads, threads: usize, f: &F) -> Outcome<T, E>
where
    T: Send,
    E: Send,
    F: Fn(&Threads) -> Result<T, E> + Sync,
{
    let shared = Arc::clone(&comm.shared);
    let mut exit = OnExit {
        shared: &shared,
        rank: comm.rank,
        why: Stop::Failed,
    };
    // This thread is the pool's first worker: `install` runs `f` here.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .use_current_thread()
        .thread_name(move |i| format!("clayflow rank {} worker {i}", comm.rank))
        .build();
    let pool = match pool {
        Ok(p) => p,
        Err(e) => return Outcome::Start(format!("its rayon pool: {e}")),
    };
    match pool.install(|| f(&comm)) {
        Ok(v) => {
            exit.why = Stop::Finished;
            Outcome::Done(v)
        }
        Err(e) => Outcome::Error(e),
    }
}

/// Runs `f` as each of `size` in-process ranks (at least one), each on its own thread with
/// a rayon pool of `threads_per_rank` threads, and returns their values in rank order.
/// When a rank fails (returns an error, panics or cannot start), the others' collectives
/// return [`super::CollectiveError::RankStopped`] instead of waiting for it, and the error
/// is the first failed rank's.
pub fn run<T, E, F>(size: usize, threads_per_rank: usize, f: F) -> Result<Vec<T>, RanksError<E>>
where
    T: Send,
    E: Send,
    F: Fn(&Threads) -> Result<T, E> + Sync,
{
    let world = Threads::world(size);
    let size = world.len();
    let shared = Arc::clone(&world[0].shared);
    let outcomes: Vec<Outcome<T, E>> = thread::scope(|s| {
        let mut started = Vec::with_capacity(size);
        for comm in world {
            let rank = comm.rank;
            let f = &f;
            let spawned = thread::Builder::new()
                .name(format!("clayflow rank {rank}"))
                .spawn_scoped(s, move || rank_main(comm, threads_per_rank, f));
            started.push(spawned.map_err(|e| {
                shared.stop(rank, Stop::Failed);
                e.to_string()
            }));
        }
        started
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|p| Outcome::Panic(panic_message(p.as_ref()))),
                Err(e) => Outcome::Start(e),
            })
            .collect()
    });
    if outcomes.iter().all(|o| matches!(o, Outcome::Done(_))) {
        return Ok(outcomes
            .into_iter()
            .filter_map(|o| match o {
                Outcome::Done(v) => Some(v),
                _ => None,
            })
            .collect());
    }
    // The first rank that failed caused the others' errors; without one (a rank that
    // finished early), the first rank that did not finish.
    let not_done = |r: &usize| !matches!(outcomes[*r], Outcome::Done(_));
    let culprit = shared
        .failed_rank()
        .filter(not_done)
        .or_else(|| (0..size).find(not_done))
        .unwrap_or(0);
    let rank = culprit;
    Err(match outcomes.into_iter().nth(culprit) {
        Some(Outcome::Error(error)) => RanksError::Failed { rank, size, error },
        Some(Outcome::Panic(message)) => RanksError::Panicked {
            rank,
            size,
            message,
        },
        Some(Outcome::Start(message)) => RanksError::Start {
            rank,
            size,
            message,
        },
        // Unreachable: the culprit did not finish.
        Some(Outcome::Done(_)) | None => RanksError::Start {
            rank,
            size,
            message: "no outcome".to_string(),
        },
    })
}
