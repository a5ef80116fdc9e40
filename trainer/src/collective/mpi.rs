//! MPI (cargo feature `mpi`): the ranks `mpirun` / `mpiexec` / `srun` started, reducing host
//! copies of the buffers. The sums are an all-to-all (rank `i` gets chunk `i` of every rank's
//! vector), a sum of the chunks in rank order, and an all-gather of the sums: the bandwidth
//! of a ring all-reduce, with a fixed summation order that `MPI_Allreduce` does not promise.
//!
//! Errors: MPI's default handler (`MPI_ERRORS_ARE_FATAL`) ends the whole job when a
//! collective fails or a rank dies; the launcher names the rank.

use std::cell::RefCell;
use std::ops::AddAssign;

use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use mpi::Threading;

use super::{pack_into, total_len, unpack, Collective, CollectiveError, Result};
use crate::backend::{Backend, Buffer};

/// The ranks of an MPI job, on `MPI_COMM_WORLD`.
pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    library: String,
    /// The send and receive vectors of the f32 sums, kept between steps: a training run sums
    /// the same gradients every step, and fresh pages would cost more than the copy.
    scratch: RefCell<(Vec<f32>, Vec<f32>)>,
    // Last: MPI_Finalize runs when it drops, after the communicators.
    _universe: Universe,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("local_rank", &self.local_rank)
            .field("library", &self.library)
            .finish()
    }
}

impl Mpi {
    /// Initialises MPI. Only the calling thread makes MPI calls (the compute threads never
    /// do), so `MPI_THREAD_FUNNELED` is requested.
    pub fn init() -> Result<Mpi> {
        let (universe, _) =
            mpi::initialize_with_threading(Threading::Funneled).ok_or_else(|| {
                CollectiveError::Init("MPI was already initialised in this process".into())
            })?;
        let world = universe.world();
        let rank = usize::try_from(world.rank()).unwrap_or(0);
        let size = usize::try_from(world.size()).unwrap_or(1);
        let local_rank = usize::try_from(world.split_shared(0).rank()).unwrap_or(0);
        let library = mpi::environment::library_version()
            .map(|v| {
                let first = v.lines().next().unwrap_or("").trim();
                first.split(',').next().unwrap_or(first).trim().to_string()
            })
            .unwrap_or_else(|_| "MPI".to_string());
        Ok(Mpi {
            world,
            rank,
            size,
            local_rank,
            library,
            scratch: RefCell::new((Vec::new(), Vec::new())),
            _universe: universe,
        })
    }

    /// Sums `data` over the ranks in rank order, in place (`data.len()` a multiple of the
    /// world size), with `recv` as the receive vector.
    fn ordered_sum<T>(&self, data: &mut [T], recv: &mut Vec<T>)
    where
        T: Equivalence + Copy + Default + AddAssign,
    {
        let chunk = data.len() / self.size;
        if chunk == 0 {
            return;
        }
        recv.resize(data.len(), T::default());
        self.world.all_to_all_into(&*data, &mut recv[..]);
        let (mine, rest) = recv.split_at_mut(chunk);
        for from in rest.chunks_exact(chunk) {
            for (a, &b) in mine.iter_mut().zip(from) {
                *a += b;
            }
        }
        self.world.all_gather_into(&*mine, data);
    }

    /// `len` rounded up to a multiple of the world size.
    fn padded(&self, len: usize) -> usize {
        len.div_ceil(self.size) * self.size
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn describe(&self) -> String {
        format!("{} ({} ranks)", self.library, self.size)
    }

    fn all_reduce_sum(&self, backend: &dyn Backend, bufs: &mut [Buffer]) -> Result<()> {
        let n = total_len(bufs);
        let mut scratch = self.scratch.borrow_mut();
        let (flat, recv) = &mut *scratch;
        pack_into(backend, bufs, self.padded(n), flat)?;
        self.ordered_sum(flat, recv);
        unpack(backend, flat, bufs)
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let mut flat = values.to_vec();
        flat.resize(self.padded(values.len()), 0.0);
        self.ordered_sum(&mut flat, &mut Vec::new());
        values.copy_from_slice(&flat[..values.len()]);
        Ok(())
    }

    fn broadcast(&self, backend: &dyn Backend, bufs: &mut [Buffer]) -> Result<()> {
        let n = total_len(bufs);
        let mut flat = Vec::new();
        pack_into(backend, bufs, n, &mut flat)?;
        self.world.process_at_rank(0).broadcast_into(&mut flat[..]);
        if self.rank != 0 {
            unpack(backend, &flat, bufs)?;
        }
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(usize::try_from(len).unwrap_or(0), 0);
        root.broadcast_into(&mut bytes[..]);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
