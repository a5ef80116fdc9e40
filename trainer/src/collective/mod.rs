//! The collectives of data-parallel training: the seam beside [`Backend`] that the training
//! loop calls to agree with the other ranks. Implementations:
//!
//! - [`Single`]: one process; every operation is the identity.
//! - [`Threads`]: N ranks as N threads of one process ([`threads::run`] starts them), for
//!   data-parallel training on the CPU without MPI.
//! - `Mpi` (cargo feature `mpi`): ranks started by `mpirun`/`srun`, reducing host copies of
//!   the buffers with MPI (the CPU backend, and a GPU backend without NCCL).
//! - `nccl::Nccl` (cargo feature `nccl`, part of `mpi`): the device buffers of a GPU run
//!   summed in place by NCCL; everything else through the host collective it wraps.
//!   [`for_backend`] picks it once the backend is open.
//!
//! [`open`] picks one from how the process was launched ([`launch`]). Every implementation
//! passes the same checks ([`conformance::check`]).
//!
//! Sums are taken **in rank order** (`((b0 + b1) + b2) + ...`), computed once per element
//! and handed to every rank, so all ranks hold bit-identical parameters and a run is
//! repeatable for a given world size.

use crate::backend::{Backend, BackendError, Buffer, Storage};

pub mod conformance;
pub mod launch;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
mod single;
pub mod threads;

#[cfg(feature = "mpi")]
pub use self::mpi::Mpi;
pub use single::Single;
pub use threads::Threads;

/// A failed collective operation or launch.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Started as one of several ranks by an MPI launcher, but built without MPI.
    #[error(
        "this process was started by {launcher} as one of {size} ranks, but this clayflow was \
         built without MPI: rebuild it with `cargo build --release -p clayflow-trainer \
         --features mpi` (needs an MPI library and clang, e.g. `apt-get install \
         libopenmpi-dev openmpi-bin libclang-dev`), or run one process without {launcher}"
    )]
    NotBuiltWithMpi {
        /// The launcher the environment names.
        launcher: &'static str,
        /// The number of ranks it started.
        size: usize,
    },
    /// MPI could not be initialised.
    #[error("MPI could not be initialised: {0}")]
    Init(String),
    /// The ranks disagree about something they must share (their data's shape, say).
    #[error("rank {rank} differs from rank 0: {detail}")]
    Mismatch {
        /// The first rank that differs.
        rank: usize,
        /// What differs, with both values.
        detail: String,
    },
    /// Another in-process rank stopped (failed, or finished early), so this one cannot go
    /// on: the job ends with that rank's error.
    #[error(
        "rank {rank} of {size} {}, so the other ranks stopped",
        if *failed { "failed" } else { "finished while the others still waited for it" }
    )]
    RankStopped {
        /// The first rank that stopped.
        rank: usize,
        /// The number of ranks.
        size: usize,
        /// Whether it failed (an error or a panic) rather than finished.
        failed: bool,
    },
    /// The buffers could not be read or written on their device.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Result of a collective operation.
pub type Result<T> = std::result::Result<T, CollectiveError>;

/// The operations data-parallel training needs from the other ranks. Every rank calls the
/// same operations in the same order with buffers of the same lengths.
pub trait Collective: std::fmt::Debug {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks (the world size).
    fn size(&self) -> usize;
    /// This rank's index among the ranks on its machine (picks its GPU).
    fn local_rank(&self) -> usize;
    /// What carries the collectives, for the run's summary ("single process", "Open MPI
    /// v4.1.4, ...").
    fn describe(&self) -> String;
    /// Replaces every buffer by its sum over all ranks, in rank order.
    fn all_reduce_sum(&self, backend: &dyn Backend, bufs: &mut [Buffer]) -> Result<()>;
    /// Replaces every value by its sum over all ranks, in rank order (losses, counts,
    /// clocks: small host vectors).
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Replaces every buffer by rank 0's.
    fn broadcast(&self, backend: &dyn Backend, bufs: &mut [Buffer]) -> Result<()>;
    /// Replaces `bytes` (any length) by rank 0's.
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job with exit status `code` (after an error on one rank, so
    /// that the others do not wait for it forever).
    fn abort(&self, code: i32) -> !;
}

/// Opens the collective this process was launched for: [`Single`] when no MPI launcher
/// started it (or started just one rank), MPI when one did and this build has the `mpi`
/// feature, and [`CollectiveError::NotBuiltWithMpi`] when it started several ranks of a
/// build without it.
pub fn open() -> Result<Box<dyn Collective>> {
    match launch::detect(|k| std::env::var(k).ok()) {
        None => Ok(Box::new(Single)),
        Some(l) => open_launched(l),
    }
}

#[cfg(feature = "mpi")]
fn open_launched(_: launch::Launch) -> Result<Box<dyn Collective>> {
    Ok(Box::new(Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn open_launched(l: launch::Launch) -> Result<Box<dyn Collective>> {
    if l.size > 1 {
        return Err(CollectiveError::NotBuiltWithMpi {
            launcher: l.launcher,
            size: l.size,
        });
    }
    Ok(Box::new(Single))
}

/// The collective for a run on `backend`: with the `nccl` feature, NCCL over `comm` when
/// every rank runs on a GPU and has NCCL (`Some`), else `None` (use `comm`). The second value
/// says why a GPU run keeps the host path. Every rank calls this together.
pub fn for_backend<'a>(
    comm: &'a dyn Collective,
    backend: &dyn Backend,
) -> (Option<Box<dyn Collective + 'a>>, Option<String>) {
    #[cfg(feature = "nccl")]
    {
        if comm.size() > 1 {
            return nccl::with_device(comm, backend);
        }
    }
    let _ = (comm, backend);
    (None, None)
}

/// Rank 0's value of `value`, on every rank (through JSON).
pub fn broadcast_json<T>(comm: &dyn Collective, value: &T) -> anyhow::Result<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let mut bytes = serde_json::to_vec(value)?;
    comm.broadcast_bytes(&mut bytes)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Checks that every rank has the same `values` as rank 0 (data shapes, lengths), naming
/// the first rank that differs; every rank returns the same result.
pub fn check_same(comm: &dyn Collective, what: &str, values: &[u64]) -> Result<()> {
    let (k, n) = (values.len(), comm.size());
    let mut all = vec![0.0f64; k * n];
    for (slot, &v) in all[comm.rank() * k..].iter_mut().zip(values) {
        // Exact: the values are sizes, far below 2^53.
        *slot = v as f64;
    }
    comm.all_reduce_sum_f64(&mut all)?;
    let ours = &all[..k];
    for r in 1..n {
        let theirs = &all[r * k..(r + 1) * k];
        if theirs != ours {
            return Err(CollectiveError::Mismatch {
                rank: r,
                detail: format!("{what} {theirs:?} against rank 0's {ours:?}"),
            });
        }
    }
    Ok(())
}

/// The buffers' elements, concatenated into `flat` (cleared first), then zeros up to `len`
/// (at least their total).
pub(crate) fn pack_into(
    backend: &dyn Backend,
    bufs: &[Buffer],
    len: usize,
    flat: &mut Vec<f32>,
) -> Result<()> {
    flat.clear();
    for b in bufs {
        match &b.storage {
            Storage::Host(v) => flat.extend_from_slice(v),
            _ => flat.extend_from_slice(&backend.download(b)?),
        }
    }
    flat.resize(len.max(flat.len()), 0.0);
    Ok(())
}

/// Writes `flat` (as [`pack_into`] laid it out) back into the buffers.
pub(crate) fn unpack(backend: &dyn Backend, flat: &[f32], bufs: &mut [Buffer]) -> Result<()> {
    let mut at = 0;
    for b in bufs.iter_mut() {
        let n = b.len();
        let src = flat.get(at..at + n).ok_or(BackendError::Size {
            op: "collective unpack",
            what: "flat buffer",
            expected: at + n,
            got: flat.len(),
        })?;
        match &mut b.storage {
            Storage::Host(v) => v.copy_from_slice(src),
            _ => {
                let up = backend.upload(src)?;
                backend.copy(&up, b)?;
            }
        }
        at += n;
    }
    Ok(())
}

/// Total elements of `bufs`.
pub(crate) fn total_len(bufs: &[Buffer]) -> usize {
    bufs.iter().map(Buffer::len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Memory;

    #[test]
    fn single_passes_the_conformance_checks() {
        conformance::check(&Single, &CpuBackend::default()).unwrap();
    }

    #[test]
    fn check_same_accepts_equal_values_on_one_rank() {
        check_same(&Single, "data shape", &[1, 28, 28, 7000]).unwrap();
    }

    #[test]
    fn pack_and_unpack_round_trip_with_padding() {
        let be = CpuBackend::default();
        let mut bufs = vec![be.upload(&[1.0, 2.0]).unwrap(), be.upload(&[3.0]).unwrap()];
        let mut flat = vec![9.0; 7];
        pack_into(&be, &bufs, 5, &mut flat).unwrap();
        assert_eq!(flat, [1.0, 2.0, 3.0, 0.0, 0.0]);
        unpack(&be, &[7.0, 8.0, 9.0, 0.0], &mut bufs).unwrap();
        assert_eq!(be.download(&bufs[0]).unwrap(), [7.0, 8.0]);
        assert_eq!(be.download(&bufs[1]).unwrap(), [9.0]);
        assert!(matches!(
            unpack(&be, &[1.0], &mut bufs),
            Err(CollectiveError::Backend(BackendError::Size { .. }))
        ));
    }

    #[test]
    fn broadcast_json_round_trips() {
        let v: Vec<u32> = broadcast_json(&Single, &vec![1u32, 2, 3]).unwrap();
        assert_eq!(v, [1, 2, 3]);
    }
}
