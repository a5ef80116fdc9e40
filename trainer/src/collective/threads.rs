//! In-process ranks: N ranks as N OS threads of one process, sharing memory ([`run`] starts
//! them). Data-parallel training this way beats rayon's parallelism inside each op on a few
//! cores (each op of a small model is too short for its synchronisation to pay off).
//!
//! The sums are MPI's ([`super::Mpi`]): rank `i` sums chunk `i` of every rank's vector in
//! rank order (`((b0 + b1) + b2) + ...`) and every rank copies all the chunk sums, so a run
//! is bit-identical to an MPI run with the same world size.
//!
//! Errors: a rank that fails (an error or a panic) or finishes while the others still wait
//! for it marks the world stopped; every waiting and later collective then returns
//! [`CollectiveError::RankStopped`] instead of waiting forever, and [`run`] reports the
//! first rank that stopped.

use std::ops::AddAssign;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};

use super::{pack_into, total_len, unpack, Collective, CollectiveError, Result};
use crate::backend::{Backend, Buffer};

/// Why a rank stopped before the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// It returned an error or panicked.
    Failed,
    /// It returned normally while others still called collectives.
    Finished,
}

/// The barrier's state.
#[derive(Debug, Default)]
struct Gate {
    arrived: usize,
    generation: u64,
    /// The first rank that stopped, and why.
    stopped: Option<(usize, Stop)>,
}

/// Each rank's contribution (`input`) and chunk sum (`sums`), of one element type.
#[derive(Debug)]
struct Slots<T> {
    input: Vec<RwLock<Vec<T>>>,
    sums: Vec<RwLock<Vec<T>>>,
}

impl<T> Slots<T> {
    fn new(size: usize) -> Slots<T> {
        let v = || (0..size).map(|_| RwLock::new(Vec::new())).collect();
        Slots {
            input: v(),
            sums: v(),
        }
    }
}

/// What the ranks of one world share.
#[derive(Debug)]
struct Shared {
    size: usize,
    gate: Mutex<Gate>,
    turn: Condvar,
    f32s: Slots<f32>,
    f64s: Slots<f64>,
    bytes: RwLock<Vec<u8>>,
}

/// The locks hold plain data that every operation overwrites, and [`Gate`] is consistent
/// between statements: a panic elsewhere leaves nothing half-written to refuse.
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}
type WriteGuard<'a, T> = std::sync::RwLockWriteGuard<'a, Vec<T>>;
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopped_error(&self, (rank, why): (usize, Stop)) -> CollectiveError {
        CollectiveError::RankStopped {
            rank,
            size: self.size,
            failed: why == Stop::Failed,
        }
    }

    /// Returns once every rank has called it, or with an error once a rank has stopped.
    fn barrier(&self) -> Result<()> {
        let mut g = self.gate();
        if let Some(s) = g.stopped {
            return Err(self.stopped_error(s));
        }
        g.arrived += 1;
        if g.arrived == self.size {
            g.arrived = 0;
            g.generation = g.generation.wrapping_add(1);
            self.turn.notify_all();
            return Ok(());
        }
        let generation = g.generation;
        while g.generation == generation {
            if let Some(s) = g.stopped {
                return Err(self.stopped_error(s));
            }
            g = self.turn.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        Ok(())
    }

    /// Marks `rank` stopped (the first one to stop is kept) and wakes every waiting rank.
    fn stop(&self, rank: usize, why: Stop) {
        let mut g = self.gate();
        if g.stopped.is_none() {
            g.stopped = Some((rank, why));
        }
        self.turn.notify_all();
    }

    /// The first rank that failed, if one did.
    fn failed_rank(&self) -> Option<usize> {
        match self.gate().stopped {
            Some((r, Stop::Failed)) => Some(r),
            _ => None,
        }
    }
}

/// Element range of chunk `i` of `n` of a vector of `len`.
fn chunk(len: usize, n: usize, i: usize) -> std::ops::Range<usize> {
    len * i / n..len * (i + 1) / n
}

/// One rank of a world of in-process ranks (from [`Threads::world`] or [`run`]).
#[derive(Debug)]
pub struct Threads {
    rank: usize,
    shared: Arc<Shared>,
}

impl Threads {
    /// The `size` ranks of a new world (at least one), to be moved one to a thread each.
    pub fn world(size: usize) -> Vec<Threads> {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            size,
            gate: Mutex::new(Gate::default()),
            turn: Condvar::new(),
            f32s: Slots::new(size),
            f64s: Slots::new(size),
            bytes: RwLock::new(Vec::new()),
        });
        (0..size)
            .map(|rank| Threads {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    /// Marks this rank failed, so that the others stop waiting for it.
    pub fn fail(&self) {
        self.shared.stop(self.rank, Stop::Failed);
    }

    /// Sums `data` over the ranks in rank order, in place, through `slots`.
    fn ordered_sum<T: Copy + AddAssign>(&self, slots: &Slots<T>, data: &mut [T]) -> Result<()> {
        self.publish(slots, |v| {
            v.extend_from_slice(data);
            Ok(())
        })?;
        data.copy_from_slice(&self.sum_and_gather(slots, data.len())?);
        Ok(())
    }

    /// The sum's first phase: this rank's vector (from `fill`, into an emptied vector) goes
    /// into its slot.
    fn publish<T, F>(&self, slots: &Slots<T>, fill: F) -> Result<()>
    where
        F: FnOnce(&mut Vec<T>) -> Result<()>,
    {
        let mut mine = write(&slots.input[self.rank]);
        mine.clear();
        fill(&mut mine)
    }

    /// The sum's other phases: after a barrier this rank sums its chunk of every rank's
    /// vector of `len`, in rank order; after another, it gathers every chunk sum into its
    /// slot, which it returns.
    fn sum_and_gather<'s, T>(&self, slots: &'s Slots<T>, len: usize) -> Result<WriteGuard<'s, T>>
    where
        T: Copy + AddAssign,
    {
        let (r, n) = (self.rank, self.shared.size);
        self.shared.barrier()?;
        {
            let range = chunk(len, n, r);
            let mut sum = write(&slots.sums[r]);
            sum.clear();
            sum.extend_from_slice(&read(&slots.input[0])[range.clone()]);
            for from in &slots.input[1..] {
                for (a, &b) in sum.iter_mut().zip(&read(from)[range.clone()]) {
                    *a += b;
                }
            }
        }
        self.shared.barrier()?;
        // No barrier after: the next operation writes only `input` before its own barrier,
        // and `sums` after it, when every rank has finished reading them here.
        let mut mine = write(&slots.input[r]);
        mine.clear();
        for s in &slots.sums {
            mine.extend_from_slice(&read(s));
        }
        Ok(mine)
    }
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn local_rank(&self) -> usize {
        self.rank
    }
    fn describe(&self) -> String {
        format!("{} in-process ranks", self.shared.size)
    }

    fn all_reduce_sum(&self, backend: &dyn Backend, bufs: &mut [Buffer]) -> Result<()> {
        let (len, f32s) = (total_len(bufs), &self.shared.f32s);
        self.publish(f32s, |v| pack_into(backend, bufs, len, v))?;
        let sums = self.sum_and_gather(f32s, len)?;
        unpack(backend, &sums, bufs)
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.ordered_sum(&self.shared.f64s, values)
    }

    fn broadcast(&self, backend: &dyn Backend, bufs: &mut [Buffer]) -> Result<()> {
        let root = &self.shared.f32s.input[0];
        if self.rank == 0 {
            pack_into(backend, bufs, total_len(bufs), &mut write(root))?;
        }
        self.shared.barrier()?;
        if self.rank != 0 {
            unpack(backend, &read(root), bufs)?;
        }
        // Rank 0 may not overwrite its slot before every rank has read it.
        self.shared.barrier()
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()> {
        if self.rank == 0 {
            let mut root = write(&self.shared.bytes);
            root.clear();
            root.extend_from_slice(bytes);
        }
        self.shared.barrier()?;
        if self.rank != 0 {
            bytes.clear();
            bytes.extend_from_slice(&read(&self.shared.bytes));
        }
        self.shared.barrier()
    }

    fn barrier(&self) -> Result<()> {
        self.shared.barrier()
    }

    fn abort(&self, code: i32) -> ! {
        self.fail();
        std::process::exit(code)
    }
}

mod run;
pub use run::{run, RanksError};

#[cfg(test)]
mod tests;
