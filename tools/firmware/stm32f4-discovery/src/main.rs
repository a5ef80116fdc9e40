//! clayflow's default model on a real board, the STM32F4-Discovery (STM32F407VGT6:
//! Cortex-M4F at 168 MHz, 1 MiB flash, 192 KiB RAM): the same kernel, blob, seed and inputs
//! as the QEMU firmware (`../src`), with the board's own tools instead of semihosting.
//!
//! It samples one digit from the trained `mnist-glow` model and logs it as ASCII art over
//! RTT (`defmt`), then scores the held-out digit, its negative and uniform noise; every
//! result line is the QEMU firmware's and the host twin's, byte for byte (same code, same
//! IEEE arithmetic), so a board can be checked against `cargo run --example
//! firmware_host`. Times come from the DWT cycle counter: real cycles, which QEMU cannot
//! give. The green LED (PD12) lights when everything ran, the red one (PD14) on an error.
//!
//! `cargo run --release` flashes it with `probe-rs` (see `README.md`).

#![no_std]
#![no_main]

// Shared with the QEMU firmware and the host twin (the parts this program does not use: the
// PGM file name and header).
#[allow(dead_code)]
#[path = "../../src/shared.rs"]
mod shared;

use clayflow_kernel::{bits_per_dim, image_len, scratch_len, Buffers, Error, Model, MNIST_GLOW};
use core::fmt::{self, Write};
use cortex_m::peripheral::DWT;
use cortex_m_rt::entry;
use defmt_rtt as _;
use panic_probe as _;
use stm32f4xx_hal::{pac, prelude::*};

/// The blob's 4-byte alignment (the kernel decodes with `from_le_bytes` and would cope
/// without).
#[repr(C, align(4))]
struct Aligned<B: ?Sized>(B);

/// The trained `mnist-glow` model, f16 (the QEMU firmware's default blob).
static BLOB: &Aligned<[u8]> = &Aligned(*include_bytes!("../../model-glow-f16.cfw"));

/// Held-out image 7000 of the bundled MNIST digits.
static DIGIT: [u8; image_len(&MNIST_GLOW)] = *include_bytes!("../../digit.bin");

type Bufs = Buffers<{ scratch_len(&MNIST_GLOW) }, { image_len(&MNIST_GLOW) }>;

/// Scratch and image buffers in SRAM (106 KiB of scratch; the stack lives in CCM RAM, see
/// `memory.x`).
static mut BUFFERS: Bufs = Bufs::new();

/// Core clock the board is set to (from its 8 MHz crystal).
const SYSCLK_MHZ: u32 = 168;

/// Collects `core::fmt` output and logs it line by line through `defmt`, so the shared
/// result formatting (`shared::write_results`) prints the same text as on QEMU and the host.
struct DefmtLines {
    buf: [u8; 160],
    len: usize,
}

impl DefmtLines {
    const fn new() -> Self {
        DefmtLines {
            buf: [0; 160],
            len: 0,
        }
    }

    fn flush(&mut self) {
        let line = self.buf.get(..self.len).unwrap_or(&[]);
        defmt::println!(
            "{=str}",
            core::str::from_utf8(line).unwrap_or("(not UTF-8)")
        );
        self.len = 0;
    }
}

impl Write for DefmtLines {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if b == b'\n' {
                self.flush();
            } else if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            } else {
                // An over-long line: log what we have and go on.
                self.flush();
            }
        }
        Ok(())
    }
}

#[entry]
fn main() -> ! {
    let (Some(dp), Some(mut cp)) = (pac::Peripherals::take(), cortex_m::Peripherals::take()) else {
        defmt::panic!("peripherals taken twice");
    };
    let rcc = dp.RCC.constrain();
    let _clocks = rcc.cfgr.use_hse(8.MHz()).sysclk(SYSCLK_MHZ.MHz()).freeze();
    cp.DCB.enable_trace();
    cp.DWT.enable_cycle_counter();
    let gpiod = dp.GPIOD.split();
    let mut green = gpiod.pd12.into_push_pull_output();
    let mut red = gpiod.pd14.into_push_pull_output();

    match run() {
        Ok(()) => {
            defmt::println!("done");
            green.set_high();
        }
        Err(e) => {
            defmt::error!("kernel: {}", defmt::Display2Format(&e));
            red.set_high();
        }
    }
    loop {
        cortex_m::asm::wfi();
    }
}

/// Cycles since `start` on the DWT counter (wraps after 2^32 cycles, 25 s at 168 MHz; each
/// timed step is well under that).
fn since(start: u32) -> u32 {
    DWT::cycle_count().wrapping_sub(start)
}

fn log_time(what: &str, cycles: u32) {
    defmt::println!(
        "{=str}: {=u32} cycles, {=u32} ms at {=u32} MHz",
        what,
        cycles,
        cycles / (SYSCLK_MHZ * 1000),
        SYSCLK_MHZ
    );
}

fn run() -> Result<(), Error> {
    let mut out = DefmtLines::new();
    let t = DWT::cycle_count();
    let model = Model::from_blob(&BLOB.0)?;
    log_time("parse and check the blob", since(t));

    // SAFETY: `run` is called once, from `main`, and no interrupt handler touches BUFFERS,
    // so this is the only reference to it.
    let bufs: &'static mut Bufs = unsafe { &mut *core::ptr::addr_of_mut!(BUFFERS) };

    let t = DWT::cycle_count();
    let (pixels, values) = bufs.sample(&model, shared::SEED, shared::TEMPERATURE)?;
    let sample = since(t);
    let checksum = shared::fnv1a32(values);
    let pixels = *pixels;
    defmt::println!(
        "mnist-glow sample (seed {=u64}, temperature {=f32}):",
        shared::SEED,
        shared::TEMPERATURE
    );
    // Formatting into `out` never fails (an over-long line is logged in parts).
    let _ = shared::write_ascii(&mut out, &pixels);
    log_time("sample", sample);

    let t = DWT::cycle_count();
    let log_prob = bufs.log_prob(&model, &DIGIT)?;
    log_time("log_prob", since(t));
    let mut bpd = [bits_per_dim(model.arch(), log_prob), 0.0, 0.0];
    for (b, image) in bpd
        .iter_mut()
        .skip(1)
        .zip([shared::negative(&DIGIT), shared::noise()])
    {
        *b = bits_per_dim(model.arch(), bufs.log_prob(&model, &image)?);
    }
    let results = shared::Results {
        checksum,
        log_prob,
        bits_per_dim: bpd[0],
    };
    let _ = shared::write_results(&mut out, "f16", &results);
    let _ = shared::write_scores(&mut out, &bpd);
    Ok(())
}
