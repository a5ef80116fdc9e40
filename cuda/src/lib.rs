//! Runs clayflow's CUDA kernels on the CPU.
//!
//! `build.rs` compiles the very `.cu` sources the GPU runs (`cuda/kernels/*.cu`) with the
//! host C++ compiler and a small shim (`cuda/sim/shim.h`), plus a grid runner
//! (`cuda/sim/sim.cpp`) that executes a launch with CUDA's model: blocks one after another, the
//! threads of a block as independent execution contexts meeting at `__syncthreads` — fibers
//! taking turns in a shuffled order ([`Schedule::Shuffled`], the default) or real OS threads
//! running concurrently ([`Schedule::Concurrent`]). [`SimDevice`] implements
//! the trainer's [`KernelDevice`], so `CudaBackend<SimDevice>` runs the GPU backend's Rust
//! orchestration and kernel code on the CPU, and the parity tests compare it with the CPU
//! backend on every CI run.
//!
//! What the simulator checks on every launch (and reports as a [`BackendError::Device`]):
//! unknown kernel names, parameters whose count or types differ from the kernel's C
//! signature, launch geometry beyond CUDA's limits or the kernel's `__launch_bounds__`,
//! dynamic shared memory over the 48 KiB default, a `__syncthreads` not reached by every
//! thread of a block, and writes just outside the dynamic shared memory (canaries). Shared
//! memory is poisoned with NaN before each block, and by default ([`Schedule::Shuffled`]) the
//! threads of a block take turns in a new random order between barriers, so a missing barrier
//! makes a thread read a value that is not written yet, or already overwritten.
//!
//! Not modelled: warps (no shuffles or warp-synchronous code may be used), global-memory
//! bounds (a kernel indexing past a buffer is undefined behaviour here as on the GPU), and
//! floating-point details of the GPU (FMA contraction, `expf`/`tanhf` ulp differences).

use clayflow_trainer::backend::cuda::{KernelDevice, LaunchCfg, Param};
use clayflow_trainer::backend::{BackendError, Buffer, Result, Storage};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};

/// CUDA's `dim3`, passed by value to the C entry points.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Dim3 {
    x: c_uint,
    y: c_uint,
    z: c_uint,
}

impl From<(u32, u32, u32)> for Dim3 {
    fn from(v: (u32, u32, u32)) -> Dim3 {
        Dim3 {
            x: v.0,
            y: v.1,
            z: v.2,
        }
    }
}

extern "C" {
    fn clayflow_sim_launch_ex(
        name: *const c_char,
        grid: Dim3,
        block: Dim3,
        shared_bytes: c_uint,
        params: *mut *mut c_void,
        mode: c_int,
        seed: u64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn clayflow_sim_signature(name: *const c_char) -> *const c_char;
    fn clayflow_sim_kernel_count() -> usize;
    fn clayflow_sim_kernel_name(i: usize) -> *const c_char;
}

/// How the threads of a block are scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// The block's threads are fibers on the calling OS thread, run one at a time in a fresh
    /// pseudo-random order (from `seed` and the launch count) between barriers: deterministic,
    /// fast, and it exposes missing barriers.
    Shuffled {
        /// Seed of the orders.
        seed: u64,
    },
    /// The block's threads are OS threads running concurrently and meeting at a barrier (the
    /// OS schedules them; slower, for a different interleaving).
    Concurrent,
}

/// The kernels compiled into the simulator, in registry order (the `cuda/kernels/*.cu` ones
/// and the simulator's own `cf_simtest_*` self-test kernels).
pub fn kernel_names() -> Vec<String> {
    // SAFETY: both functions only read the static registry; names are static NUL-terminated
    // strings, and `i` stays below the count.
    unsafe {
        (0..clayflow_sim_kernel_count())
            .map(|i| {
                CStr::from_ptr(clayflow_sim_kernel_name(i))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

/// The parameter type codes of kernel `name` (`p` pointer, `i` int, `u` unsigned, `f` float),
/// or `None` if there is no such kernel.
pub fn signature(name: &str) -> Option<String> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string; the result is null or a static string.
    unsafe {
        let s = clayflow_sim_signature(c.as_ptr());
        (!s.is_null()).then(|| CStr::from_ptr(s).to_string_lossy().into_owned())
    }
}

/// What a [`SimDevice`] has been asked to do, counted as a GPU would do it: every
/// [`KernelDevice::download`] is one device-to-host copy and one synchronisation (the host
/// waits for the copy), every upload one host-to-device copy, every `alloc_zeros` and every
/// allocating `upload` one device allocation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Device-to-host copies.
    pub d2h: u64,
    /// Host-to-device copies.
    pub h2d: u64,
    /// Host waits for the device (explicit `synchronize` calls and downloads).
    pub syncs: u64,
    /// Device allocations.
    pub allocs: u64,
    /// Kernel launches.
    pub launches: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            d2h: self.d2h - o.d2h,
            h2d: self.h2d - o.h2d,
            syncs: self.syncs - o.syncs,
            allocs: self.allocs - o.allocs,
            launches: self.launches - o.launches,
        }
    }
}

/// The host simulator as a [`KernelDevice`]. Buffers are host vectors
/// ([`Storage::Host`]); a buffer's device address is its vector's address. Launches run to
/// completion before `launch` returns (one launch at a time per process). Transfers,
/// synchronisations, allocations and launches are counted ([`SimDevice::counts`]).
#[derive(Debug)]
pub struct SimDevice {
    schedule: Schedule,
    launches: AtomicU64,
    d2h: AtomicU64,
    h2d: AtomicU64,
    syncs: AtomicU64,
    allocs: AtomicU64,
}

impl Default for SimDevice {
    fn default() -> Self {
        SimDevice::new()
    }
}

impl SimDevice {
    /// A simulator with the shuffled schedule (seed 0x5eed).
    pub fn new() -> SimDevice {
        SimDevice::with_schedule(Schedule::Shuffled { seed: 0x5eed })
    }

    /// A simulator with the given thread schedule.
    pub fn with_schedule(schedule: Schedule) -> SimDevice {
        SimDevice {
            schedule,
            launches: AtomicU64::new(0),
            d2h: AtomicU64::new(0),
            h2d: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            allocs: AtomicU64::new(0),
        }
    }

    /// Number of kernel launches so far.
    pub fn launches(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    /// Everything counted so far (subtract two snapshots for the work in between).
    pub fn counts(&self) -> Counts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            d2h: get(&self.d2h),
            h2d: get(&self.h2d),
            syncs: get(&self.syncs),
            allocs: get(&self.allocs),
            launches: get(&self.launches),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

fn code(p: &Param) -> char {
    match p {
        Param::Ptr(_) => 'p',
        Param::I32(_) => 'i',
        Param::U32(_) => 'u',
        Param::F32(_) => 'f',
    }
}

fn dev_err(msg: String) -> BackendError {
    BackendError::Device(format!("cuda-sim: {msg}"))
}

impl KernelDevice for SimDevice {
    fn name(&self) -> String {
        "cuda-sim (host)".to_string()
    }

    fn alloc_zeros(&self, len: usize) -> Result<Buffer> {
        bump(&self.allocs);
        Ok(Buffer {
            storage: Storage::Host(vec![0.0; len]),
        })
    }

    fn upload(&self, data: &[f32]) -> Result<Buffer> {
        bump(&self.allocs);
        bump(&self.h2d);
        Ok(Buffer {
            storage: Storage::Host(data.to_vec()),
        })
    }

    fn upload_into(&self, data: &[f32], dst: &mut Buffer) -> Result<()> {
        match &mut dst.storage {
            Storage::Host(v) if v.len() == data.len() => {
                bump(&self.h2d);
                v.copy_from_slice(data);
                Ok(())
            }
            Storage::Host(v) => Err(BackendError::Size {
                op: "upload_into",
                what: "dst",
                expected: data.len(),
                got: v.len(),
            }),
            #[allow(unreachable_patterns)]
            _ => Err(BackendError::WrongDevice { op: "upload_into" }),
        }
    }

    fn download(&self, buf: &Buffer) -> Result<Vec<f32>> {
        bump(&self.d2h);
        bump(&self.syncs);
        match &buf.storage {
            Storage::Host(v) => Ok(v.clone()),
            #[allow(unreachable_patterns)]
            _ => Err(BackendError::WrongDevice { op: "download" }),
        }
    }

    fn ptr(&self, buf: &Buffer) -> Result<u64> {
        match &buf.storage {
            Storage::Host(v) => Ok(v.as_ptr() as u64),
            #[allow(unreachable_patterns)]
            _ => Err(BackendError::WrongDevice { op: "ptr" }),
        }
    }

    fn ptr_mut(&self, buf: &mut Buffer) -> Result<u64> {
        match &mut buf.storage {
            Storage::Host(v) => Ok(v.as_mut_ptr() as u64),
            #[allow(unreachable_patterns)]
            _ => Err(BackendError::WrongDevice { op: "ptr_mut" }),
        }
    }

    fn launch(&self, name: &'static str, cfg: LaunchCfg, params: &[Param]) -> Result<()> {
        let expected = signature(name).ok_or_else(|| dev_err(format!("no kernel named {name}")))?;
        let got: String = params.iter().map(code).collect();
        if got != expected {
            return Err(dev_err(format!(
                "{name}: parameters ({got}) do not match the kernel's signature ({expected}) \
                 (p pointer, i int, u unsigned, f float)"
            )));
        }
        // Each value in its own 8-byte slot; params[i] points at slot i (cuLaunchKernel).
        let mut slots: Vec<u64> = params
            .iter()
            .map(|p| match *p {
                Param::Ptr(v) => v,
                Param::I32(v) => u64::from(v as u32),
                Param::U32(v) => u64::from(v),
                Param::F32(v) => u64::from(v.to_bits()),
            })
            .collect();
        // Little-endian: a 4-byte value read through `int*`/`float*` at the slot's address is
        // the low half. Big-endian hosts would need the high half.
        #[cfg(target_endian = "big")]
        for (s, p) in slots.iter_mut().zip(params) {
            if !matches!(p, Param::Ptr(_)) {
                *s <<= 32;
            }
        }
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let cname = CString::new(name).map_err(|_| dev_err(format!("bad kernel name {name}")))?;
        let n = self.launches.fetch_add(1, Ordering::Relaxed);
        let (mode, seed) = match self.schedule {
            Schedule::Shuffled { seed } => (0, seed.wrapping_add(n.wrapping_mul(0x9e37_79b9))),
            Schedule::Concurrent => (1, 0),
        };
        let mut err = vec![0u8; 512];
        // SAFETY: `cname` is NUL-terminated; `ptrs` holds one pointer per kernel parameter
        // (count and types checked against the registry above), each to a live 8-byte slot.
        // The pointer *values* are device addresses from `ptr`/`ptr_mut`, i.e. addresses of
        // live host buffers, which the caller (CudaBackend) has sized for the launch exactly
        // as it must for the GPU; the kernel only touches memory inside them. `err` has
        // `err.len()` writable bytes.
        let rc = unsafe {
            clayflow_sim_launch_ex(
                cname.as_ptr(),
                cfg.grid.into(),
                cfg.block.into(),
                cfg.shared_bytes,
                ptrs.as_mut_ptr(),
                mode,
                seed,
                err.as_mut_ptr().cast::<c_char>(),
                err.len(),
            )
        };
        if rc != 0 {
            let msg = CStr::from_bytes_until_nul(&err)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(dev_err(msg));
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        bump(&self.syncs);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(grid: u32, block: u32, shared: u32) -> LaunchCfg {
        LaunchCfg {
            grid: (grid, 1, 1),
            block: (block, 1, 1),
            shared_bytes: shared,
        }
    }

    fn run(
        dev: &SimDevice,
        name: &'static str,
        c: LaunchCfg,
        ints: &[i32],
        x: &Buffer,
        y: &mut Buffer,
    ) -> Result<Vec<f32>> {
        let mut params: Vec<Param> = ints.iter().map(|&v| Param::I32(v)).collect();
        params.push(Param::Ptr(dev.ptr(x)?));
        params.push(Param::Ptr(dev.ptr_mut(y)?));
        dev.launch(name, c, &params)?;
        dev.download(y)
    }

    #[test]
    fn registry_holds_every_kernel_of_the_sources() {
        let names = kernel_names();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
        let mut count = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            // The kernel sources: `.cu` files and `common.cuh` (the folder is also the
            // `clayflow-cuda-kernels` crate, with `src/`, `ptx/` and a manifest).
            let path = entry.unwrap().path();
            if !path.extension().is_some_and(|x| x == "cu" || x == "cuh") {
                continue;
            }
            let text = std::fs::read_to_string(path).unwrap();
            for part in text.split("extern \"C\" __global__").skip(1) {
                // The name is the identifier just before the parameter list's '(' (skipping
                // a `__launch_bounds__(..)` first).
                let part = match part.find("__launch_bounds__(") {
                    Some(at) if at < part.find('{').unwrap_or(usize::MAX) => {
                        let rest = &part[at..];
                        &rest[rest.find(')').unwrap() + 1..]
                    }
                    _ => part,
                };
                let name = part
                    .split('(')
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .last()
                    .unwrap();
                assert!(names.iter().any(|n| n == name), "{name} not registered");
                count += 1;
            }
        }
        assert_eq!(count, 40, "kernels in cuda/kernels");
        assert_eq!(signature("cf_axpy").as_deref(), Some("ifpp"));
        assert_eq!(signature("nope"), None);
    }

    #[test]
    fn block_and_thread_coordinates_cover_the_grid() {
        let dev = SimDevice::new();
        let c = LaunchCfg {
            grid: (3, 2, 2),
            block: (4, 3, 2),
            shared_bytes: 0,
        };
        let mut y = dev.alloc_zeros(12 * 24).unwrap();
        let p = [Param::Ptr(dev.ptr_mut(&mut y).unwrap())];
        dev.launch("cf_simtest_coords", c, &p).unwrap();
        let y = dev.download(&y).unwrap();
        for b in 0..12 {
            for t in 0..24 {
                assert_eq!(y[b * 24 + t], (b * 1000 + t) as f32);
            }
        }
    }

    #[test]
    fn barriers_make_shared_memory_exchanges_correct() {
        for dev in [
            SimDevice::new(),
            SimDevice::with_schedule(Schedule::Concurrent),
        ] {
            let n = 64;
            let x = dev
                .upload(&(0..2 * n).map(|v| v as f32).collect::<Vec<_>>())
                .unwrap();
            let mut y = dev.alloc_zeros(2 * n).unwrap();
            let out = run(
                &dev,
                "cf_simtest_reverse",
                cfg(2, 64, 256),
                &[1],
                &x,
                &mut y,
            )
            .unwrap();
            for b in 0..2 {
                for t in 0..n {
                    assert_eq!(out[b * n + t], (b * n + n - 1 - t) as f32);
                }
            }
            let out = run(&dev, "cf_simtest_rounds", cfg(1, 64, 256), &[1], &x, &mut y).unwrap();
            for r in 0..2 {
                for t in 0..n {
                    assert_eq!(out[r * n + t], (r * n + (t + 1) % n) as f32);
                }
            }
        }
    }

    /// The shuffled schedule turns a missing barrier into wrong results, both
    /// read-after-write (reading a slot nobody wrote yet: NaN poison) and write-after-read
    /// (the next round overwrote it).
    #[test]
    fn missing_barriers_give_wrong_results() {
        let dev = SimDevice::new();
        let n = 64;
        let x = dev
            .upload(&(0..2 * n).map(|v| v as f32).collect::<Vec<_>>())
            .unwrap();
        let mut y = dev.alloc_zeros(2 * n).unwrap();
        let out = run(
            &dev,
            "cf_simtest_reverse",
            cfg(1, 64, 256),
            &[0],
            &x,
            &mut y,
        )
        .unwrap();
        assert!(
            out[..n].iter().any(|v| v.is_nan()),
            "missing barrier went unnoticed"
        );
        let out = run(&dev, "cf_simtest_rounds", cfg(1, 64, 256), &[0], &x, &mut y).unwrap();
        let wrong = (0..n).filter(|&t| out[t] != ((t + 1) % n) as f32).count();
        assert!(wrong > 0, "write-after-read race went unnoticed");
    }

    #[test]
    fn broken_launches_are_errors_not_hangs() {
        let dev = SimDevice::new();
        let mut y = dev.alloc_zeros(64).unwrap();
        let p = [Param::Ptr(dev.ptr_mut(&mut y).unwrap())];
        let e = dev
            .launch("cf_simtest_divergent", cfg(1, 64, 0), &p)
            .unwrap_err();
        assert!(e.to_string().contains("divergent __syncthreads"), "{e}");

        let store = |at: i32| {
            let mut y = dev.alloc_zeros(32).unwrap();
            let p = [Param::I32(at), Param::Ptr(dev.ptr_mut(&mut y).unwrap())];
            dev.launch("cf_simtest_shared_store", cfg(2, 32, 64), &p)
        };
        store(15).unwrap();
        let e = store(16).unwrap_err();
        assert!(e.to_string().contains("outside its 64 bytes"), "{e}");
        let e = store(-1).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");

        let e = dev
            .launch("cf_simtest_divergent", cfg(1, 65, 0), &p)
            .unwrap_err();
        assert!(e.to_string().contains("__launch_bounds__(64)"), "{e}");
        let e = dev
            .launch("cf_simtest_divergent", cfg(1, 64, 48 * 1024 + 4), &p)
            .unwrap_err();
        assert!(e.to_string().contains("48 KiB"), "{e}");
        let e = dev
            .launch("cf_simtest_divergent", cfg(0, 64, 0), &p)
            .unwrap_err();
        assert!(e.to_string().contains("geometry"), "{e}");
        let e = dev.launch("cf_nope", cfg(1, 1, 0), &p).unwrap_err();
        assert!(e.to_string().contains("no kernel named cf_nope"), "{e}");
        let e = dev
            .launch("cf_simtest_divergent", cfg(1, 64, 0), &[Param::F32(1.0)])
            .unwrap_err();
        assert!(e.to_string().contains("signature (p)"), "{e}");
    }
}
