//! NCCL on device buffers (cargo feature `nccl`, which `mpi` includes): the gradients of a
//! run on GPUs are summed where they are, in place, with no host copy. [`Nccl`] borrows the
//! host collective (MPI, or [`Single`](super::Single) for a one-GPU communicator) and
//! sends it everything that is not device memory: the small host vectors, the bytes, the
//! barrier, and the NCCL unique id, which rank 0 makes and broadcasts.
//!
//! The library is loaded at run time like the driver (`libnccl.so.2`, e.g. from the
//! `nvidia-nccl-cu12` wheel or the CUDA repository's `libnccl2`); without it, or when any
//! rank cannot use it, [`with_device`] keeps the host collective, and says why.
//!
//! NCCL launches on the context's default stream, which is the stream every kernel of the
//! CUDA backend runs on, so the sums are ordered after the backward pass and before Adam
//! without a synchronisation. Summation order: NCCL's ring or tree, fixed for a given
//! world size and machine and the same on every rank; for two ranks every order gives the
//! same bits as the rank-order sum.
//!
//! Not run on a GPU yet: this machine has none (see the closing notes of issue 18). The GPU
//! check (`tools/gpu-check.sh`) runs the conformance checks on a one-GPU communicator.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{group_end, group_start, Comm, Id, ReduceOp};

use super::{Collective, CollectiveError, Result};
use crate::backend::{Backend, Buffer, Storage};

/// A collective whose device buffers go through NCCL.
pub struct Nccl<'a> {
    host: &'a dyn Collective,
    comm: Comm,
    ordinal: usize,
    _stream: Arc<CudaStream>,
}

impl std::fmt::Debug for Nccl<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("host", &self.host)
            .field("ordinal", &self.ordinal)
            .finish()
    }
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Init(format!("NCCL {what} failed: {e:?}"))
}

/// The GPU `backend` keeps its buffers on, or `None` for a host backend.
fn device_of(backend: &dyn Backend) -> Option<usize> {
    let probe = backend.upload(&[0.0]).ok()?;
    match &probe.storage {
        Storage::Cuda(m) => Some(m.ordinal()),
        Storage::Host(_) => None,
    }
}

/// Whether `libnccl` loads in this process.
pub fn nccl_present() -> bool {
    // SAFETY: loading a shared library runs its initialisers; NCCL's have no preconditions.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// The communicator of `host`'s ranks on GPU `ordinal`: rank 0 makes the unique id and
/// `host` broadcasts it. Every rank calls this together.
fn communicator(host: &dyn Collective, ordinal: usize) -> Result<(Comm, Arc<CudaStream>)> {
    let mut id_bytes = vec![0u8; 128];
    if host.rank() == 0 {
        let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
        for (b, c) in id_bytes.iter_mut().zip(id.internal()) {
            *b = *c as u8;
        }
    }
    host.broadcast_bytes(&mut id_bytes)?;
    let mut internal = [0 as std::ffi::c_char; 128];
    for (c, b) in internal.iter_mut().zip(&id_bytes) {
        *c = *b as std::ffi::c_char;
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| nccl_err("context", e))?;
    let stream = ctx.default_stream();
    let comm = Comm::from_rank(
        stream.clone(),
        host.rank(),
        host.size(),
        Id::uninit(internal),
    )
    .map_err(|e| nccl_err("communicator initialisation", e))?;
    Ok((comm, stream))
}

impl<'a> Nccl<'a> {
    /// `host`'s ranks with a communicator on GPU `ordinal` (every rank calls this
    /// together).
    pub fn new(host: &'a dyn Collective, ordinal: usize) -> Result<Nccl<'a>> {
        let made =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| communicator(host, ordinal)));
        match made {
            Ok(Ok((comm, stream))) => Ok(Nccl {
                host,
                comm,
                ordinal,
                _stream: stream,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CollectiveError::Init(
                "NCCL panicked during initialisation".into(),
            )),
        }
    }

    /// Sums (`broadcast == false`) or broadcasts from rank 0 the device buffers in place, in
    /// one NCCL group; host buffers go to the host collective.
    fn device_op(&self, backend: &dyn Backend, bufs: &mut [Buffer], broadcast: bool) -> Result<()> {
        if bufs.iter().any(|b| matches!(b.storage, Storage::Host(_))) {
            return if broadcast {
                self.host.broadcast(backend, bufs)
            } else {
                self.host.all_reduce_sum(backend, bufs)
            };
        }
        group_start().map_err(|e| nccl_err("group start", e))?;
        let mut result = Ok(());
        for b in bufs.iter_mut() {
            let Storage::Cuda(m) = &mut b.storage else {
                continue;
            };
            if m.ordinal() != self.ordinal {
                result = Err(CollectiveError::Init(format!(
                    "a buffer on cuda:{} given to the NCCL communicator of cuda:{}",
                    m.ordinal(),
                    self.ordinal
                )));
                break;
            }
            let Some(slice) = m.slice_mut() else { continue };
            let r = if broadcast {
                self.comm.broadcast_in_place(slice, 0)
            } else {
                self.comm.all_reduce_in_place(slice, &ReduceOp::Sum)
            };
            if let Err(e) = r {
                result = Err(nccl_err(
                    if broadcast { "broadcast" } else { "all-reduce" },
                    e,
                ));
                break;
            }
        }
        // Always close the group, also after an error, so NCCL is left in a sane state.
        let end = group_end().map_err(|e| nccl_err("group end", e));
        result.and(end.map(|_| ()))
    }
}

impl Collective for Nccl<'_> {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn size(&self) -> usize {
        self.host.size()
    }
    fn local_rank(&self) -> usize {
        self.host.local_rank()
    }
    fn describe(&self) -> String {
        format!(
            "NCCL on cuda:{}, over {}",
            self.ordinal,
            self.host.describe()
        )
    }
    fn all_reduce_sum(&self, backend: &dyn Backend, bufs: &mut [Buffer]) -> Result<()> {
        self.device_op(backend, bufs, false)
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.host.all_reduce_sum_f64(values)
    }
    fn broadcast(&self, backend: &dyn Backend, bufs: &mut [Buffer]) -> Result<()> {
        self.device_op(backend, bufs, true)
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()> {
        self.host.broadcast_bytes(bytes)
    }
    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.host.abort(code)
    }
}

/// `host` upgraded to NCCL when every rank's backend is a GPU and NCCL loads on every
/// rank; otherwise `host` itself, with the reason (for the run's log) when a GPU run stays
/// on the host path. Every rank must call this together.
pub fn with_device<'a>(
    host: &'a dyn Collective,
    backend: &dyn Backend,
) -> (Option<Box<dyn Collective + 'a>>, Option<String>) {
    let ordinal = device_of(backend);
    let usable = ordinal.is_some() && nccl_present();
    // Agree: NCCL only if every rank can use it (a mixed job would deadlock).
    let mut votes = [
        f64::from(u8::from(ordinal.is_some())),
        f64::from(u8::from(usable)),
    ];
    if let Err(e) = host.all_reduce_sum_f64(&mut votes) {
        return (
            None,
            Some(format!("the ranks could not agree on NCCL: {e}")),
        );
    }
    let n = host.size() as f64;
    let Some(ordinal) = ordinal else {
        return (None, None);
    };
    if votes[1] < n {
        let why = if votes[0] < n {
            "not every rank runs on a GPU"
        } else {
            "libnccl.so.2 was not found on every rank (pip install nvidia-nccl-cu12 and put \
             its lib folder on LD_LIBRARY_PATH)"
        };
        return (
            None,
            Some(format!("gradients are summed through host memory: {why}")),
        );
    }
    match Nccl::new(host, ordinal) {
        Ok(nccl) => (Some(Box::new(nccl)), None),
        Err(e) => {
            // The other ranks are inside NCCL's initialisation: end the job, saying why.
            eprintln!(
                "Error on rank {} of {}: {e}; run with NCCL_DEBUG=INFO for details",
                host.rank(),
                host.size()
            );
            host.abort(1)
        }
    }
}
