//! The module's exports over static buffers (see the crate docs for the table).
//!
//! JavaScript writes only into the blob buffer (between `cf_blob_reserve` and `cf_load`)
//! and the digit buffer, and reads the pixel, value and message buffers, always between
//! calls: no Rust code runs while it does.

use crate::model::{describe, open, Failure, PIXELS};
use crate::shared;
use crate::text::Text;
use clayflow_kernel::{bits_per_dim, log_prob, sample, Model};
use core::cell::UnsafeCell;
use core::ptr::{addr_of, addr_of_mut};

#[cfg(target_feature = "atomics")]
compile_error!("the module's statics assume one thread: build without the atomics feature");

/// Largest blob the page loads: 8 MiB (the f32 MNIST RealNVP blob is 1.3 MB).
const BLOB_CAP: usize = 8 << 20;

/// Scratch in f32 elements: 4 MiB (the MNIST presets need 16,072 and 27,048).
const SCRATCH_CAP: usize = 1 << 20;

/// A static the module mutates. All-zero statics land in `.bss`, so the buffers add nothing
/// to the size of the `.wasm` file (which is why `State` holds no `Option` and no NaN).
struct Global<T>(UnsafeCell<T>);

// SAFETY: this module is compiled only for wasm32 without the `atomics` target feature
// (checked above), where there is exactly one thread, so no two threads can reach a cell.
unsafe impl<T> Sync for Global<T> {}

struct State {
    scratch: [f32; SCRATCH_CAP],
    pixels: [u8; PIXELS],
    values: [f32; PIXELS],
    digit: [u8; PIXELS],
    log_prob: f32,
    bits_per_dim: f32,
    message: Text,
}

static STATE: Global<State> = Global(UnsafeCell::new(State {
    scratch: [0.0; SCRATCH_CAP],
    pixels: [0; PIXELS],
    values: [0.0; PIXELS],
    digit: [0; PIXELS],
    log_prob: 0.0,
    bits_per_dim: 0.0,
    message: Text::new(),
}));

/// The loaded model; it borrows BLOB.
static MODEL: Global<Option<Model<'static>>> = Global(UnsafeCell::new(None));

static BLOB: Global<[u8; BLOB_CAP]> = Global(UnsafeCell::new([0; BLOB_CAP]));

/// Runs `f` on the state and the loaded model.
fn with<R>(f: impl FnOnce(&mut State, &mut Option<Model<'static>>) -> R) -> R {
    // SAFETY: one thread (see `Global`), and no export calls another export or itself, so
    // these are the only references to STATE and MODEL while `f` runs; they do not outlive
    // `f`. JavaScript touches the buffers only between calls.
    let (state, model) = unsafe { (&mut *STATE.0.get(), &mut *MODEL.0.get()) };
    f(state, model)
}

/// Runs `f` on the state.
fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    with(|s, _| f(s))
}

/// `Ok(())` as 0; a failure as -1, its text in the message buffer.
fn status(s: &mut State, r: Result<(), Failure>) -> i32 {
    s.message.clear();
    match r {
        Ok(()) => 0,
        Err(f) => {
            describe(&mut s.message, &f);
            -1
        }
    }
}

/// Drops the loaded model and returns the blob buffer, to be filled with `len` bytes and
/// passed to [`cf_load`]; null (and a message) if `len` exceeds the buffer.
#[no_mangle]
pub extern "C" fn cf_blob_reserve(len: usize) -> *mut u8 {
    with(|s, model| {
        // The model borrows the blob buffer: drop it before JavaScript overwrites it.
        *model = None;
        if len > BLOB_CAP {
            status(s, Err(Failure::BlobTooLarge { len, cap: BLOB_CAP }));
            return core::ptr::null_mut();
        }
        s.message.clear();
        BLOB.0.get().cast::<u8>()
    })
}

/// Parses the first `len` bytes of the blob buffer with the kernel and keeps the model if
/// the page can use it. 0, or -1 with the reason in the message buffer.
#[no_mangle]
pub extern "C" fn cf_load(len: usize) -> i32 {
    with(|s, model| {
        *model = None;
        // SAFETY: Rust never writes BLOB; JavaScript writes it only after `cf_blob_reserve`,
        // which first drops the model, the only holder of a reference into it. So this
        // shared reference (and the model made from it) is never aliased by a write while
        // it is in use.
        let whole: &'static [u8; BLOB_CAP] = unsafe { &*BLOB.0.get() };
        let r = match whole.get(..len) {
            Some(blob) => open(blob, SCRATCH_CAP).map(|m| *model = Some(m)),
            None => Err(Failure::BlobTooLarge { len, cap: BLOB_CAP }),
        };
        status(s, r)
    })
}

/// Draws one image with the kernel's PCG32 seeded by `seed`; 0 or -1.
#[no_mangle]
pub extern "C" fn cf_sample(seed: u64, temperature: f32) -> i32 {
    with(|s, model| {
        let r = match *model {
            Some(m) => sample(
                &m,
                seed,
                temperature,
                &mut s.scratch,
                &mut s.pixels,
                &mut s.values,
            )
            .map_err(Failure::from),
            None => Err(Failure::NoModel),
        };
        status(s, r)
    })
}

/// `log p` (nats) and bits/dim of the digit buffer's pixels, kept for [`cf_log_prob`] and
/// [`cf_bits_per_dim`] (NaN after a failure); 0 or -1.
#[no_mangle]
pub extern "C" fn cf_score() -> i32 {
    with(|s, model| {
        s.log_prob = f32::NAN;
        s.bits_per_dim = f32::NAN;
        let r = match *model {
            Some(m) => log_prob(&m, &s.digit, &mut s.scratch)
                .map(|lp| {
                    s.log_prob = lp;
                    s.bits_per_dim = bits_per_dim(m.arch(), lp);
                })
                .map_err(Failure::from),
            None => Err(Failure::NoModel),
        };
        status(s, r)
    })
}

/// FNV-1a (32 bit) of the last sample's f32 values, as the firmware prints it.
#[no_mangle]
pub extern "C" fn cf_checksum() -> u32 {
    with_state(|s| shared::fnv1a32(&s.values))
}

/// The last score's `log p` in nats.
#[no_mangle]
pub extern "C" fn cf_log_prob() -> f32 {
    with_state(|s| s.log_prob)
}

/// The last score's bits/dim.
#[no_mangle]
pub extern "C" fn cf_bits_per_dim() -> f32 {
    with_state(|s| s.bits_per_dim)
}

/// The last sample's 784 pixels.
#[no_mangle]
pub extern "C" fn cf_pixels_ptr() -> *const u8 {
    // SAFETY: only the address of a field of the static is taken (no reference is made).
    unsafe { addr_of!((*STATE.0.get()).pixels).cast() }
}

/// The last sample's 784 dequantized values in `[0, 1]`.
#[no_mangle]
pub extern "C" fn cf_values_ptr() -> *const f32 {
    // SAFETY: only the address of a field of the static is taken (no reference is made).
    unsafe { addr_of!((*STATE.0.get()).values).cast() }
}

/// The 784 pixels [`cf_score`] reads.
#[no_mangle]
pub extern "C" fn cf_digit_ptr() -> *mut u8 {
    // SAFETY: only the address of a field of the static is taken (no reference is made).
    unsafe { addr_of_mut!((*STATE.0.get()).digit).cast() }
}

/// The last failure's message (UTF-8, [`cf_message_len`] bytes).
#[no_mangle]
pub extern "C" fn cf_message_ptr() -> *const u8 {
    with_state(|s| s.message.as_bytes().as_ptr())
}

/// Length in bytes of the last failure's message (0 after a success).
#[no_mangle]
pub extern "C" fn cf_message_len() -> usize {
    with_state(|s| s.message.as_bytes().len())
}

/// The firmware's sampling seed (`shared::SEED`).
#[no_mangle]
pub extern "C" fn cf_check_seed() -> u64 {
    shared::SEED
}

/// The firmware's sampling temperature (`shared::TEMPERATURE`).
#[no_mangle]
pub extern "C" fn cf_check_temperature() -> f32 {
    shared::TEMPERATURE
}

/// Index of the firmware's held-out digit (`digit.bin`) in the bundled MNIST images.
#[no_mangle]
pub extern "C" fn cf_check_digit_index() -> u32 {
    shared::DIGIT_INDEX as u32
}

/// Label of that digit.
#[no_mangle]
pub extern "C" fn cf_check_digit_label() -> u32 {
    u32::from(shared::DIGIT_LABEL)
}
