//! The checks every [`Collective`] passes, on every rank at once: the single process in the
//! unit tests, MPI under `mpirun -np 2` in `trainer/tests/mpi.rs`. Each rank contributes
//! values that depend on its rank, and each check compares bit for bit with the rank-order
//! sum computed locally, so a wrong order, a dropped rank, a misplaced chunk or padding that
//! leaks into the result all fail.

use super::{check_same, Collective, CollectiveError};
use crate::backend::{Backend, Buffer};

/// Lengths that exercise padding (not multiples of the world size) and an empty buffer.
const LENGTHS: [usize; 4] = [3, 1001, 0, 17];

/// Rank `r`'s element `j` of buffer `b`: values whose sum rounds, so the order shows.
fn value(r: usize, b: usize, j: usize) -> f32 {
    let x = (r * 7919 + b * 104_729 + j * 31) % 1000;
    0.1 + x as f32 * 1.000_1e-3 + (r as f32) * 1e3
}

/// Rank `r`'s buffers, of [`LENGTHS`], on `backend`.
fn rank_buffers(backend: &dyn Backend, r: usize) -> Result<Vec<Buffer>, CollectiveError> {
    LENGTHS
        .iter()
        .enumerate()
        .map(|(b, &len)| {
            let host: Vec<f32> = (0..len).map(|j| value(r, b, j)).collect();
            Ok(backend.upload(&host)?)
        })
        .collect()
}

/// Runs every check; the first failure is the error, naming the operation.
pub fn check(comm: &dyn Collective, backend: &dyn Backend) -> Result<(), String> {
    let (r, n) = (comm.rank(), comm.size());
    let fail = |op: &str, e: CollectiveError| format!("{op} on rank {r} of {n}: {e}");
    if r >= n || comm.local_rank() >= n {
        return Err(format!(
            "rank {r} / local rank {} out of range for size {n}",
            comm.local_rank()
        ));
    }
    comm.barrier().map_err(|e| fail("barrier", e))?;

    // all_reduce_sum on backend buffers.
    let mut bufs = rank_buffers(backend, r).map_err(|e| fail("upload", e))?;
    comm.all_reduce_sum(backend, &mut bufs)
        .map_err(|e| fail("all_reduce_sum", e))?;
    for (b, buf) in bufs.iter().enumerate() {
        let got = backend
            .download(buf)
            .map_err(|e| fail("download", e.into()))?;
        for (j, &g) in got.iter().enumerate() {
            let mut want = value(0, b, j);
            for q in 1..n {
                want += value(q, b, j);
            }
            if g.to_bits() != want.to_bits() {
                return Err(format!(
                    "all_reduce_sum on rank {r} of {n}: buffer {b} element {j} is {g}, the \
                     rank-order sum is {want}"
                ));
            }
        }
    }

    // all_reduce_sum_f64.
    let mut v: Vec<f64> = (0..5).map(|j| f64::from(value(r, 9, j)) / 3.0).collect();
    comm.all_reduce_sum_f64(&mut v)
        .map_err(|e| fail("all_reduce_sum_f64", e))?;
    for (j, &g) in v.iter().enumerate() {
        let mut want = f64::from(value(0, 9, j)) / 3.0;
        for q in 1..n {
            want += f64::from(value(q, 9, j)) / 3.0;
        }
        if g.to_bits() != want.to_bits() {
            return Err(format!(
                "all_reduce_sum_f64 on rank {r} of {n}: element {j} is {g}, want {want}"
            ));
        }
    }

    // broadcast from rank 0.
    let mut bufs = rank_buffers(backend, r).map_err(|e| fail("upload", e))?;
    comm.broadcast(backend, &mut bufs)
        .map_err(|e| fail("broadcast", e))?;
    for (b, buf) in bufs.iter().enumerate() {
        let got = backend
            .download(buf)
            .map_err(|e| fail("download", e.into()))?;
        let want: Vec<f32> = (0..LENGTHS[b]).map(|j| value(0, b, j)).collect();
        if got != want {
            return Err(format!(
                "broadcast on rank {r} of {n}: buffer {b} is not rank 0's"
            ));
        }
    }

    // broadcast_bytes, with a length that differs between ranks.
    let root = b"rank 0's configuration".to_vec();
    let mut bytes = if r == 0 {
        root.clone()
    } else {
        vec![7u8; r * 3]
    };
    comm.broadcast_bytes(&mut bytes)
        .map_err(|e| fail("broadcast_bytes", e))?;
    if bytes != root {
        return Err(format!(
            "broadcast_bytes on rank {r} of {n}: got {bytes:?}, not rank 0's"
        ));
    }

    // check_same: equal values pass; a value that differs on the last rank names it.
    check_same(comm, "shape", &[1, 28, 28]).map_err(|e| fail("check_same", e))?;
    let last = n - 1;
    let mine = [1, 28, if r == last && n > 1 { 14 } else { 28 }];
    match (check_same(comm, "shape", &mine), n) {
        (Ok(()), 1) => {}
        (Err(CollectiveError::Mismatch { rank, .. }), _) if rank == last => {}
        (other, _) => {
            return Err(format!(
                "check_same on rank {r} of {n}: a shape that differs on rank {last} gave {other:?}"
            ))
        }
    }
    comm.barrier().map_err(|e| fail("barrier", e))?;
    Ok(())
}
