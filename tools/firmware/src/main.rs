//! clayflow on a Cortex-M4F: samples one MNIST digit with the `no_std` kernel from a fixed
//! seed, prints it as ASCII art, writes it as a PGM file on the host, prints a checksum of
//! the f32 sample, scores one real held-out digit with `log_prob` and, as an anomaly score,
//! two inputs that are not digits (its negative and uniform noise), and reports the
//! instructions each step took and the peak stack. Exits through semihosting: status 0 when
//! everything ran, 1 on any error (kernel error, host I/O failure, panic, fault).
//!
//! The default build embeds the trained `mnist-glow` model (what `clayflow train` trains by
//! default); `--no-default-features` the seed's `mnist` RealNVP.
//!
//! Runs under `qemu-system-arm -machine mps2-an386 -cpu cortex-m4` (the cargo runner in
//! `.cargo/config.toml`); see `README.md`.

#![no_std]
#![no_main]

mod shared;

use clayflow_kernel::conv::Conv;
use clayflow_kernel::{bits_per_dim, image_len, scratch_len, Arch, Buffers, Error, Model};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering};
use cortex_m::peripheral::{syst::SystClkSource, SCB, SYST};
use cortex_m_rt::{entry, exception, ExceptionFrame};
use cortex_m_semihosting::{debug, hio, nr, syscall};
use shared::{Results, PGM_HEADER, PGM_NAME, SEED, SIDE, TEMPERATURE};

/// Bytes with the 4-byte alignment the blob's tensors are laid out for (the kernel decodes
/// with `from_le_bytes` and would cope without; aligned is simply the honest layout).
#[repr(C, align(4))]
struct Aligned<B: ?Sized>(B);

/// The architecture the buffers are sized for: with the `glow` feature (the default) the
/// two-level Glow preset `MNIST_GLOW`, else the seed's MNIST preset.
#[cfg(not(feature = "glow"))]
const ARCH: Arch = clayflow_kernel::MNIST;
#[cfg(not(feature = "glow"))]
const ARCH_NAME: &str = "MNIST preset (the seed's RealNVP, 12 couplings)";
#[cfg(feature = "glow")]
const ARCH: Arch = clayflow_kernel::MNIST_GLOW;
#[cfg(feature = "glow")]
const ARCH_NAME: &str = "MNIST_GLOW preset (mnist-glow: 2 levels x 16 Glow steps)";

#[cfg(not(any(feature = "f32-weights", feature = "glow")))]
static BLOB: &Aligned<[u8]> = &Aligned(*include_bytes!("../model-f16.cfw"));
#[cfg(not(feature = "f32-weights"))]
const DTYPE: &str = "f16";

/// The Glow variant's f16 blob (Glow tensors f32): the trained `mnist-glow` model
/// (`README.md` says which run exported it).
#[cfg(all(feature = "glow", not(feature = "f32-weights")))]
static BLOB: &Aligned<[u8]> = &Aligned(*include_bytes!("../model-glow-f16.cfw"));

#[cfg(all(feature = "f32-weights", feature = "glow"))]
compile_error!("the glow variant has only an f16 blob (f32-weights needs --no-default-features)");
#[cfg(feature = "f32-weights")]
static BLOB: &Aligned<[u8]> = &Aligned(*include_bytes!("../model-f32.cfw"));
#[cfg(feature = "f32-weights")]
const DTYPE: &str = "f32";

/// The real test digit: held-out image `DIGIT_INDEX` of the bundled MNIST data.
static DIGIT: [u8; image_len(&ARCH)] = *include_bytes!("../digit.bin");

/// Scratch and image buffers of the architecture, sized at compile time.
type Bufs = Buffers<{ scratch_len(&ARCH) }, { image_len(&ARCH) }>;

/// The only instance, in `.bss` (about 66 KiB): too big for the stack.
static mut BUFFERS: Bufs = Bufs::new();

/// Why the firmware failed.
enum Failure {
    /// The kernel refused (bad blob, wrong buffer sizes, ...).
    Kernel(Error),
    /// A semihosting call failed (host console or file).
    Host(&'static str),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Kernel(e)
    }
}

impl From<fmt::Error> for Failure {
    fn from(_: fmt::Error) -> Self {
        Failure::Host("writing to the host console failed")
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Kernel(e) => write!(f, "kernel: {e}"),
            Failure::Host(what) => f.write_str(what),
        }
    }
}

#[entry]
fn main() -> ! {
    stack::paint();
    let status = match run() {
        Ok(()) => debug::EXIT_SUCCESS,
        Err(e) => {
            report_failure(format_args!("error: {e}"));
            debug::EXIT_FAILURE
        }
    };
    exit(status)
}

fn run() -> Result<(), Failure> {
    let mut out = hio::hstdout().map_err(|()| Failure::Host("no semihosting console"))?;
    let core = cortex_m::Peripherals::take().ok_or(Failure::Host("peripherals taken twice"))?;
    let clock = icount::Clock::start(core.SYST);
    let per_tick = icount::calibrate(&clock);

    let t = clock.ticks();
    let model = Model::from_blob(&BLOB.0)?;
    let parse = clock.ticks() - t;

    // SAFETY: `run` is called once, from `main`, and nothing else (no interrupt handler)
    // touches BUFFERS, so this is the only reference to it.
    let bufs: &'static mut Bufs = unsafe { &mut *core::ptr::addr_of_mut!(BUFFERS) };

    if cfg!(feature = "profile") {
        // Profiling build: only the convolution breakdown, so that a QEMU `-d exec` log
        // holds little else.
        let convs = conv_breakdown(&clock, &model, 0, &mut bufs.scratch)?;
        writeln!(
            out,
            "profile: conv ticks {convs:?}, parse {parse}, {per_tick} insn/tick"
        )?;
        return Ok(());
    }

    let t = clock.ticks();
    let (pixels, values) = bufs.sample(&model, SEED, TEMPERATURE)?;
    let sample = clock.ticks() - t;
    let checksum = shared::fnv1a32(values);
    let pixels = *pixels;

    let t = clock.ticks();
    let log_prob = bufs.log_prob(&model, &DIGIT)?;
    let score = clock.ticks() - t;
    let mut bpd = [bits_per_dim(model.arch(), log_prob), 0.0, 0.0];
    for (b, image) in bpd
        .iter_mut()
        .skip(1)
        .zip([shared::negative(&DIGIT), shared::noise()])
    {
        *b = bits_per_dim(model.arch(), bufs.log_prob(&model, &image)?);
    }
    let results = Results {
        checksum,
        log_prob,
        bits_per_dim: bits_per_dim(model.arch(), log_prob),
    };

    writeln!(
        out,
        "clayflow firmware: {ARCH_NAME}, {DTYPE} blob of {} bytes",
        BLOB.0.len()
    )?;
    writeln!(
        out,
        "sample (seed {SEED}, temperature {TEMPERATURE}), {SIDE}x{SIDE}:"
    )?;
    shared::write_ascii(&mut out, &pixels)?;
    write_pgm(&pixels)?;
    writeln!(out, "pgm: wrote {PGM_NAME} on the host")?;
    shared::write_results(&mut out, DTYPE, &results)?;
    shared::write_scores(&mut out, &bpd)?;
    let insn = |ticks: u64| (ticks as f64 * per_tick) as u64;
    writeln!(
        out,
        "icount: {per_tick:.3} instructions per SysTick tick (calibrated on a known loop)"
    )?;
    writeln!(out, "instructions: parse {}", insn(parse))?;
    // One coupling's convolutions on each level (first step of the level).
    for level in 0..ARCH.levels {
        let step = level * ARCH.steps_per_level();
        let convs = conv_breakdown(&clock, &model, step, &mut bufs.scratch)?;
        let view = ARCH.step_arch(step);
        let (_, h, w) = view.flow_shape();
        for (j, ticks) in convs.iter().enumerate() {
            let (cin, cout, k) = view.conv_shape(ARCH.masks[step], j);
            writeln!(
                out,
                "instructions: step {step} conv{j} ({cin}->{cout}, {k}x{k} on {h}x{w}) {} ({:.2} per multiply-add)",
                insn(*ticks),
                insn(*ticks) as f64 / (cin * cout * k * k * h * w) as f64
            )?;
        }
    }
    writeln!(out, "instructions: sample {}", insn(sample))?;
    writeln!(out, "instructions: log_prob {}", insn(score))?;
    let peak = stack::peak();
    writeln!(
        out,
        "stack: peak {} bytes of {} available{}",
        peak.used,
        peak.size,
        if peak.overflowed { " (OVERFLOWED)" } else { "" }
    )?;
    if peak.overflowed {
        return Err(Failure::Host("the stack overran its region"));
    }
    Ok(())
}

/// Ticks of each of step `step`'s three coupling convolutions, run alone on its real weights
/// (the input is whatever the scratch holds: the count does not depend on the values).
fn conv_breakdown(
    clock: &icount::Clock,
    model: &Model<'_>,
    step: usize,
    scratch: &mut [f32],
) -> Result<[u64; 3], Failure> {
    let cw = model.coupling(step)?;
    let view = model.arch().step_arch(step);
    let (_, h, w) = view.flow_shape();
    let plane = h * w;
    let mut ticks = [0u64; 3];
    for (j, t) in ticks.iter_mut().enumerate() {
        let (cin, cout, k) = view.conv_shape(cw.mask, j);
        let conv = Conv {
            cin,
            cout,
            height: h,
            width: w,
            kernel: k,
        };
        let (input, rest) = scratch
            .split_at_mut_checked(cin * plane)
            .ok_or(Failure::Host("scratch too small for the breakdown"))?;
        let output = rest
            .get_mut(..cout * plane)
            .ok_or(Failure::Host("scratch too small for the breakdown"))?;
        let (wt, b) = cw
            .conv_w
            .get(j)
            .zip(cw.conv_b.get(j))
            .ok_or(Failure::Host("no such convolution"))?;
        let start = clock.ticks();
        conv.forward(input, *wt, *b, j < 2, output)?;
        *t = clock.ticks() - start;
    }
    Ok(ticks)
}

/// Writes the sample as a binary PGM file in QEMU's working directory.
fn write_pgm(pixels: &[u8]) -> Result<(), Failure> {
    let mut name = [0u8; 64];
    let n = PGM_NAME.len();
    name.get_mut(..n)
        .ok_or(Failure::Host("PGM file name too long"))?
        .copy_from_slice(PGM_NAME.as_bytes());
    // SAFETY: SYS_OPEN reads `n` bytes of `name` (NUL-terminated at `n`), which outlives the
    // call; it writes no memory.
    let fd = unsafe { syscall!(OPEN, name.as_ptr(), nr::open::W_TRUNC_BINARY, n) } as isize;
    if fd < 0 {
        return Err(Failure::Host("could not open the PGM file on the host"));
    }
    let mut ok = true;
    for part in [PGM_HEADER, pixels] {
        // SAFETY: SYS_WRITE reads `part.len()` bytes of `part`, valid for the call. It returns
        // the number of bytes *not* written.
        ok &= unsafe { syscall!(WRITE, fd, part.as_ptr(), part.len()) } == 0;
    }
    // SAFETY: closes the handle opened above; touches no memory.
    ok &= unsafe { syscall!(CLOSE, fd) } == 0;
    if ok {
        Ok(())
    } else {
        Err(Failure::Host("could not write the PGM file on the host"))
    }
}

/// Prints a failure line on the host's stderr (best effort: there is nowhere else to go).
fn report_failure(args: fmt::Arguments<'_>) {
    if let Ok(mut err) = hio::hstderr() {
        let _ = err.write_fmt(args);
        let _ = err.write_str("\n");
    }
}

/// Ends the QEMU session with `status` (0 or 1 as QEMU's exit code).
fn exit(status: debug::ExitStatus) -> ! {
    debug::exit(status);
    // Only reached under a debugger that resumes after the exit request.
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    report_failure(format_args!("panic: {info}"));
    exit(debug::EXIT_FAILURE)
}

#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    report_failure(format_args!("hard fault at pc {:#010x}", frame.pc()));
    exit(debug::EXIT_FAILURE)
}

/// Instruction counting: under `-icount shift=0` QEMU advances its virtual clock by exactly
/// 1 ns per executed instruction, and SysTick (on the core clock) runs on that virtual clock,
/// so ticks are proportional to instructions. The ratio is measured, not assumed: a loop of
/// known length is timed first. (DWT CYCCNT is not modelled by QEMU.)
mod icount {
    use super::{AtomicU32, Ordering, SystClkSource, SCB, SYST};

    /// SysTick counts down from this value; one period is `RELOAD + 1` ticks.
    const RELOAD: u32 = 0x00FF_FFFF;

    /// Completed SysTick periods, counted by the exception handler.
    static WRAPS: AtomicU32 = AtomicU32::new(0);

    #[cortex_m_rt::exception]
    fn SysTick() {
        WRAPS.fetch_add(1, Ordering::Relaxed);
    }

    /// A free-running 64-bit tick counter on SysTick.
    pub struct Clock {
        _syst: SYST,
    }

    impl Clock {
        /// Starts SysTick on the core clock with its wrap interrupt enabled.
        pub fn start(mut syst: SYST) -> Clock {
            syst.set_clock_source(SystClkSource::Core);
            syst.set_reload(RELOAD);
            syst.clear_current();
            syst.enable_interrupt();
            syst.enable_counter();
            // Right after the clear the counter reads 0 until its first reload (to RELOAD):
            // wait for that, so that `ticks` is monotonic from here on.
            while SYST::get_current() == 0 {}
            Clock { _syst: syst }
        }

        /// Ticks since `start`.
        pub fn ticks(&self) -> u64 {
            cortex_m::interrupt::free(|_| {
                let mut wraps = WRAPS.load(Ordering::Relaxed);
                let mut current = SYST::get_current();
                // A wrap whose exception is still pending (masked here) is not counted yet.
                if SCB::is_pendst_pending() {
                    wraps += 1;
                    current = SYST::get_current();
                }
                (u64::from(wraps) << 24) + u64::from(RELOAD - current)
            })
        }
    }

    /// Instructions per tick, from timing `2 * N` instructions of `subs; bne`.
    pub fn calibrate(clock: &Clock) -> f64 {
        const N: u32 = 4_000_000;
        let t = clock.ticks();
        // SAFETY: a register-only countdown loop: no memory access, no stack use.
        unsafe {
            core::arch::asm!(
                "2:",
                "subs {n}, {n}, #1",
                "bne 2b",
                n = inout(reg) N => _,
                options(nomem, nostack),
            );
        }
        let ticks = clock.ticks() - t;
        2.0 * f64::from(N) / ticks.max(1) as f64
    }
}

/// Peak stack by painting: fill the free stack region with a pattern at boot, later find the
/// lowest word that no longer holds it.
mod stack {
    /// The pattern; a stack word equal to it by chance makes the peak read low by a word.
    const PAINT: u32 = 0xC1A7_F10E;

    extern "C" {
        /// Bottom of the stack region (end of `.bss`/`.uninit`), from cortex-m-rt's `link.x`.
        static _stack_end: u32;
        /// Top of the stack region (end of RAM), from cortex-m-rt's `link.x`.
        static _stack_start: u32;
    }

    fn bounds() -> (usize, usize) {
        // Only the addresses of the linker symbols are taken, never their values.
        (
            core::ptr::addr_of!(_stack_end) as usize,
            core::ptr::addr_of!(_stack_start) as usize,
        )
    }

    /// Paints from the bottom of the stack region up to 256 bytes below the current stack
    /// pointer (the frames above it are live).
    #[inline(never)]
    pub fn paint() {
        let (bottom, _) = bounds();
        let limit = (cortex_m::register::msp::read() as usize).saturating_sub(256);
        let mut p = bottom;
        while p + 4 <= limit {
            // SAFETY: [bottom, limit) is RAM between the statics and the live stack frames:
            // nothing else uses it yet; word-aligned since both linker symbols are.
            unsafe { (p as *mut u32).write_volatile(PAINT) };
            p += 4;
        }
    }

    /// What the stack used.
    pub struct Peak {
        /// Bytes from the top of RAM down to the lowest overwritten word.
        pub used: usize,
        /// Bytes in the stack region (RAM left after the statics).
        pub size: usize,
        /// True when even the bottom word was overwritten (the stack may have run into
        /// the statics).
        pub overflowed: bool,
    }

    /// The peak stack since [`paint`].
    pub fn peak() -> Peak {
        let (bottom, top) = bounds();
        let mut p = bottom;
        // SAFETY: reads words of the painted region, which is RAM below the live stack.
        while p < top && unsafe { (p as *const u32).read_volatile() } == PAINT {
            p += 4;
        }
        Peak {
            used: top - p,
            size: top - bottom,
            overflowed: p == bottom,
        }
    }
}
