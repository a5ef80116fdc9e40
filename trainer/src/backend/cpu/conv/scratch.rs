//! Thread-local scratch buffers, reused between calls so the steady state allocates
//! nothing but matrixmultiply's packing buffers.

use std::cell::Cell;

thread_local! {
    /// Scratch of the rayon task running on this thread (columns, padded images).
    static WORKER_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Per-call scratch of the calling thread (repacked weights, weight-gradient partials).
    static CALL_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Flipped, channel-transposed weights of backward-data (calling thread).
    pub(super) static FLIP_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Zero-padded copy of one image, used inside `im2col`.
    pub(super) static PAD_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on a `len`-element scratch slice taken from `key` (contents unspecified).
///
/// The buffer is moved out of the thread-local while `f` runs, so a nested use on the
/// same thread (e.g. rayon work-stealing another convolution while this one waits) just
/// gets a fresh buffer instead of aliasing this one.
pub(super) fn with_scratch<R>(
    key: &'static std::thread::LocalKey<Cell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut v = key.with(Cell::take);
    if v.len() < len {
        v.resize(len, 0.0);
    }
    let r = f(&mut v[..len]);
    key.with(|c| {
        let other = c.take();
        c.set(if other.len() > v.len() { other } else { v });
    });
    r
}

pub(super) fn with_worker_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_scratch(&WORKER_SCRATCH, len, f)
}

pub(super) fn with_call_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_scratch(&CALL_SCRATCH, len, f)
}
