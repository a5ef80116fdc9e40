//! AMX-BF16 matrix products (`tdpbf16ps`) for the 1x1 convolutions of the coupling
//! networks when a run asks for bf16 (`clayflow train --bf16`): `C = A·B` with A and B
//! rounded to bf16 and the products summed in f32.
//!
//! One `tdpbf16ps` multiplies a 16 x 32 tile of A by a 32 x 16 tile of B into a 16 x 16
//! f32 tile of C; on the Xeon this was written on, the 2 x 2 block below, loads included,
//! does 3.6x the multiply-adds per second of AVX-512 FMA, and 15x with its operands held in
//! tiles (BENCHMARKS section 14). Operands are packed into tiles of 16 rows of 16 lanes,
//! each lane a *pair* of bf16 values along K (the layout `tdpbf16ps` reads; see `bf16`):
//! an A tile row holds `A[m][2j], A[m][2j+1]` in lane `j`, a B tile row `j` holds
//! `B[2j][n], B[2j+1][n]` in lane `n`. M, N and K are padded with zeros to whole tiles (and
//! M and N to pairs of tiles, the kernel's 2 x 2 block). Pairs are stored as the bits of
//! f32 slots, so the scratch buffers stay `f32`.
//!
//! Linux gives a process the AMX tile state only on request (`arch_prctl`,
//! `ARCH_REQ_XCOMP_PERM`); [`available`] asks once and reports whether it was granted.

use super::bf16::{consecutive_pairs, pair_rows, round_bits};
use std::arch::asm;
use std::sync::OnceLock;

/// Rows (and 32-bit lanes) of a tile.
pub(super) const T: usize = 16;
/// f32 slots of one packed tile.
const TILE: usize = T * T;

/// Whether this CPU and OS run the AMX kernels: AMX-TILE and AMX-BF16 (CPUID leaf 7), the
/// AVX-512 BF16 conversions of the packers, and the kernel's permission for the tile data.
pub(super) fn available() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| super::bf16::available() && cpu_has_amx() && request_tile_data())
}

fn cpu_has_amx() -> bool {
    // Leaf 0 gives the highest leaf.
    let max = std::arch::x86_64::__cpuid(0).eax;
    if max < 7 {
        return false;
    }
    let l7 = std::arch::x86_64::__cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (l7.edx & (1 << 22) != 0, l7.edx & (1 << 24) != 0);
    amx_bf16 && amx_tile
}

#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, 18) only asks the kernel to enable the AMX
    // tile state for this process; it reads and writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// Tiles needed for `n` rows or columns, rounded up to the 2 x 2 block.
fn tiles2(n: usize) -> usize {
    n.div_ceil(2 * T) * 2
}

/// Tiles along K (32 values, 16 pairs, per tile).
fn ktiles(k: usize) -> usize {
    k.div_ceil(2 * T)
}

/// A packed operand: `rows` tiles by `kt` K-tiles, tile `(r, q)` at `(r·kt + q)·TILE`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Packed {
    /// Row (M or N) tiles, even.
    pub(super) tiles: usize,
    /// K tiles.
    pub(super) kt: usize,
}

impl Packed {
    pub(super) fn new(rows: usize, k: usize) -> Packed {
        Packed {
            tiles: tiles2(rows),
            kt: ktiles(k),
        }
    }
    /// f32 slots of the packed operand.
    pub(super) fn len(&self) -> usize {
        self.tiles * self.kt * TILE
    }
}

/// Packs A (`m x k`, element `(i, j)` from `get(i, j)`) as the A operand: tile `(r, q)`,
/// row `i`, lane `j` = the pair `A[16r + i][32q + 2j], A[16r + i][32q + 2j + 1]`. For the
/// small weight matrices (scalar).
pub(super) fn pack_a(m: usize, k: usize, get: impl Fn(usize, usize) -> f32, out: &mut [f32]) {
    let p = Packed::new(m, k);
    let out = &mut out[..p.len()];
    out.fill(0.0);
    for i in 0..m {
        for j in 0..k.div_ceil(2) {
            let lo = get(i, 2 * j);
            let hi = if 2 * j + 1 < k {
                get(i, 2 * j + 1)
            } else {
                0.0
            };
            let (r, q) = (i / T, j / T);
            let v = u32::from(round_bits(lo)) | u32::from(round_bits(hi)) << 16;
            out[(r * p.kt + q) * TILE + (i % T) * T + j % T] = f32::from_bits(v);
        }
    }
}

/// Packs B (`k x n`) stored row-major with row stride `ld` (`b[j·ld + c]`) as the B
/// operand: tile `(r, q)`, row `j`, lane `c` = the pair `B[32q + 2j][16r + c],
/// B[32q + 2j + 1][16r + c]`. Vectorised (two rows of B at a time).
pub(super) fn pack_b_rows(k: usize, n: usize, b: &[f32], ld: usize, out: &mut [f32]) {
    let p = Packed::new(n, k);
    let out = &mut out[..p.len()];
    out.fill(0.0);
    for j in 0..k.div_ceil(2) {
        let q = j / T;
        let lo = &b[2 * j * ld..][..n];
        let hi = (2 * j + 1 < k).then(|| &b[(2 * j + 1) * ld..][..n]);
        for r in 0..n.div_ceil(T) {
            let c0 = r * T;
            let w = (n - c0).min(T);
            let dst = &mut out[(r * p.kt + q) * TILE + (j % T) * T..][..w];
            pair_rows(&lo[c0..c0 + w], hi.map(|h| &h[c0..c0 + w]), dst);
        }
    }
}

/// Packs A (`m x k`) stored row-major with row stride `ld` (`a[i·ld + j]`) as the A
/// operand (as [`pack_a`]). Vectorised (32 values of a row at a time).
pub(super) fn pack_a_rows(m: usize, k: usize, a: &[f32], ld: usize, out: &mut [f32]) {
    pack_along_k(m, k, a, ld, out, false);
}

/// Packs the transpose of X (`n x k`, row-major with row stride `ld`: `x[c·ld + j]`) as the
/// B operand, B = Xᵀ (`k x n`): for the weight gradient, where K runs along X's rows.
pub(super) fn pack_b_transposed(k: usize, n: usize, x: &[f32], ld: usize, out: &mut [f32]) {
    pack_along_k(n, k, x, ld, out, true);
}

/// Rows of a matrix whose K runs along its rows, as pairs of consecutive values: tile
/// row `i % 16`, lane `j` (A, `transposed` false) or tile row `j`, lane `i % 16` (B).
fn pack_along_k(rows: usize, k: usize, x: &[f32], ld: usize, out: &mut [f32], transposed: bool) {
    let p = Packed::new(rows, k);
    let out = &mut out[..p.len()];
    out.fill(0.0);
    let mut row = [0.0f32; T];
    for i in 0..rows {
        let (r, lane) = (i / T, i % T);
        let xr = &x[i * ld..][..k];
        for q in 0..p.kt {
            let j0 = q * 2 * T;
            let len = (k - j0).min(2 * T);
            let pairs = len.div_ceil(2);
            let tile = &mut out[(r * p.kt + q) * TILE..][..TILE];
            if transposed {
                consecutive_pairs(&xr[j0..j0 + len], &mut row[..pairs]);
                for (j, v) in row[..pairs].iter().enumerate() {
                    tile[j * T + lane] = *v;
                }
            } else {
                consecutive_pairs(&xr[j0..j0 + len], &mut tile[lane * T..][..pairs]);
            }
        }
    }
}

/// `C = A·B` (`beta = 0`) or `C += A·B` (`beta = 1`) for the packed `a` (`m x k`) and `b`
/// (`k x n`), `C` row-major with row stride `ldc` (`c[i·ldc + j]`, `i < m`, `j < n`).
///
/// # Panics
///
/// If [`available`] is false, the packings disagree on K, or a slice is too short.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    m: usize,
    n: usize,
    a: &[f32],
    pa: Packed,
    b: &[f32],
    pb: Packed,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(
        available(),
        "AMX kernel needs AMX-BF16 and the kernel's permission"
    );
    assert_eq!(pa.kt, pb.kt, "amx::gemm: K tiles");
    assert!(
        pa.tiles * T >= m && pb.tiles * T >= n,
        "amx::gemm: packing too small"
    );
    assert!(
        a.len() >= pa.len() && b.len() >= pb.len(),
        "amx::gemm: packed too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "amx::gemm: c too short");
    let mut out = [0.0f32; 4 * TILE];
    let tiles = Tiles::configure();
    for mt in (0..m.div_ceil(T)).step_by(2) {
        for nt in (0..n.div_ceil(T)).step_by(2) {
            if pa.kt == 0 {
                out.fill(0.0);
            } else {
                // SAFETY: AMX is available and permitted (asserted); the kernel reads
                // `pa.kt` tiles from A's tiles `mt`, `mt + 1` and B's tiles `nt`, `nt + 1`,
                // which exist (both packings round their tiles up to even counts) and
                // lie inside `a` and `b` (asserted lengths), and writes 4 tiles to `out`.
                unsafe {
                    block(
                        &tiles,
                        a.as_ptr().add(mt * pa.kt * TILE),
                        a.as_ptr().add((mt + 1) * pa.kt * TILE),
                        b.as_ptr().add(nt * pb.kt * TILE),
                        b.as_ptr().add((nt + 1) * pb.kt * TILE),
                        pa.kt,
                        out.as_mut_ptr(),
                    )
                };
            }
            // Tile (dm, dn) of the block is at out[(2·dm + dn)·TILE].
            for dm in 0..2 {
                for dn in 0..2 {
                    let (i0, j0) = ((mt + dm) * T, (nt + dn) * T);
                    if i0 >= m || j0 >= n {
                        continue;
                    }
                    let tile = &out[(2 * dm + dn) * TILE..][..TILE];
                    let w = (n - j0).min(T);
                    for i in 0..(m - i0).min(T) {
                        let src = &tile[i * T..][..w];
                        let dst = &mut c[(i0 + i) * ldc + j0..][..w];
                        if beta == 0.0 {
                            for (d, s) in dst.iter_mut().zip(src) {
                                *d = *s;
                            }
                        } else {
                            for (d, s) in dst.iter_mut().zip(src) {
                                *d += s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The 64-byte tile configuration: palette 1, eight tiles of 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row (little-endian u16)
        c[48 + t] = T as u8; // rows
        t += 1;
    }
    TileConfig(c)
};

/// The tile configuration loaded on this thread for as long as it lives (loading it
/// costs about as much as a small block's products, so [`gemm`] loads it once); dropping
/// it releases the tile state. Tiles are only touched by the `asm!` blocks of this module:
/// the crate enables no AMX target feature, so compiled code never uses them in between,
/// and the OS saves them with the thread.
struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    fn configure() -> Tiles {
        // SAFETY: only called from `gemm`, after asserting that AMX is available and
        // permitted; `CONFIG` is a valid palette-1 configuration, 64-byte aligned.
        unsafe {
            asm!("ldtilecfg [{cfg}]", cfg = in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
        }
        Tiles(std::marker::PhantomData)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a `Tiles` exists only after `configure` on this thread (it is not
        // `Send`), so AMX is available and the tile state is ours to release.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// The 2 x 2 block: `out[(2·dm + dn)·TILE..]` = Σ over `kt` K-tiles of A tile `dm` times B
/// tile `dn`, where A's tiles `dm = 0, 1` start at `a0`, `a1` and B's at `b0`, `b1`, each
/// the next K-tile 1 KiB on.
///
/// # Safety
///
/// The tiles configured (`_tiles`) on this thread; `kt >= 1`; `kt` tiles (1 KiB each)
/// readable from each of `a0`, `a1`, `b0`, `b1`; 4 KiB writable at `out`.
unsafe fn block(
    _tiles: &Tiles,
    a0: *const f32,
    a1: *const f32,
    b0: *const f32,
    b1: *const f32,
    kt: usize,
    out: *mut f32,
) {
    // SAFETY: the caller guarantees the configuration and the bounds.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {kt}",
            "jnz 2b",
            "tilestored [{out} + {s}*1], tmm0",
            "tilestored [{out1} + {s}*1], tmm1",
            "tilestored [{out2} + {s}*1], tmm2",
            "tilestored [{out3} + {s}*1], tmm3",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            kt = inout(reg) kt => _,
            s = in(reg) 64usize,
            out = in(reg) out,
            out1 = in(reg) out.add(TILE),
            out2 = in(reg) out.add(2 * TILE),
            out3 = in(reg) out.add(3 * TILE),
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::bf16::round;
    use super::*;

    /// `A·B` in f64 on the bf16-rounded operands, and `|A|·|B|` (the bound's magnitude).
    fn reference(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let mut want = vec![0.0; m * n];
        let mut mag = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for t in 0..k {
                    let p = f64::from(round(a[i * k + t])) * f64::from(round(b[t * n + j]));
                    want[i * n + j] += p;
                    mag[i * n + j] += p.abs();
                }
            }
        }
        (want, mag)
    }

    /// One core's multiply-add throughput of the three instructions BENCHMARKS section 14
    /// compares: AVX-512 FMA, AVX-512 BF16's `vdpbf16ps` (24 independent accumulators
    /// each), and AMX's `tdpbf16ps`, with its operands in tiles and with the 2 x 2 block of
    /// [`gemm`] (4 tile loads per 4 products, from L1).
    /// `cargo test --release -p clayflow-trainer -- --ignored --nocapture bf16_peaks`
    #[test]
    #[ignore]
    fn bf16_peaks() {
        use std::arch::x86_64::*;
        use std::time::Instant;
        if !available() {
            println!("no AMX-BF16 here");
            return;
        }
        #[target_feature(enable = "avx512f")]
        fn fma(n: usize) -> f32 {
            let x = _mm512_set1_ps(std::hint::black_box(1e-3));
            let mut a = [_mm512_setzero_ps(); 24];
            for _ in 0..std::hint::black_box(n) {
                for v in a.iter_mut() {
                    *v = _mm512_fmadd_ps(x, x, *v);
                }
            }
            let s = a
                .iter()
                .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v));
            _mm512_reduce_add_ps(s)
        }
        #[target_feature(enable = "avx512f,avx512bf16")]
        fn dot(n: usize) -> f32 {
            let v = _mm512_set1_ps(std::hint::black_box(1e-3));
            let x = _mm512_cvtne2ps_pbh(v, v);
            let mut a = [_mm512_setzero_ps(); 24];
            for _ in 0..std::hint::black_box(n) {
                for v in a.iter_mut() {
                    *v = _mm512_dpbf16_ps(*v, x, x);
                }
            }
            let s = a
                .iter()
                .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v));
            _mm512_reduce_add_ps(s)
        }
        let rate = |macs: f64, f: &mut dyn FnMut()| {
            f();
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            macs / best / 1e9
        };
        let n = 2_000_000;
        let g_fma = rate((n * 24 * 16) as f64, &mut || {
            // SAFETY: AVX-512F is available (`available` checked it).
            std::hint::black_box(unsafe { fma(n) });
        });
        let g_dot = rate((n * 24 * 32) as f64, &mut || {
            // SAFETY: AVX-512F and AVX-512 BF16 are available (`available` checked them).
            std::hint::black_box(unsafe { dot(n) });
        });
        let kt = 64;
        let a = vec![0.5f32; 2 * kt * TILE];
        let b = vec![0.5f32; 2 * kt * TILE];
        let mut out = vec![0.0f32; 4 * TILE];
        let tiles = Tiles::configure();
        let reps = 2_000;
        let g_amx = rate((reps * kt * 4 * T * T * 2 * T) as f64, &mut || {
            for _ in 0..reps {
                // SAFETY: configured tiles; `kt` tiles of A and B in each half of `a`, `b`.
                unsafe {
                    block(
                        &tiles,
                        a.as_ptr(),
                        a[kt * TILE..].as_ptr(),
                        b.as_ptr(),
                        b[kt * TILE..].as_ptr(),
                        kt,
                        out.as_mut_ptr(),
                    )
                };
            }
        });
        drop(tiles);
        println!("one core, multiply-adds per second:");
        println!("  AVX-512 FMA (vfmadd231ps)        {g_fma:7.1} G  1.00x");
        println!(
            "  AVX-512 BF16 (vdpbf16ps)         {g_dot:7.1} G  {:.2}x",
            g_dot / g_fma
        );
        println!(
            "  AMX tdpbf16ps, 2x2 block, loads  {g_amx:7.1} G  {:.2}x",
            g_amx / g_fma
        );
    }

    #[test]
    fn products_match_reference_on_rounded_operands() {
        if !available() {
            eprintln!("no AMX-BF16 here (or no permission): the AMX kernel is not run");
            return;
        }
        let mut s = 0x2545_f491u32;
        let mut f = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / 8_388_608.0 - 1.0
        };
        for (m, k, n) in [
            (1, 1, 1),
            (16, 32, 16),
            (17, 33, 15),
            (64, 64, 196),
            (4, 70, 49),
            (40, 7, 100),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| f()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| f()).collect();
            let (want, mag) = reference(m, k, n, &a, &b);
            let tol = |i: usize| (k as f64 + 2.0) * f64::from(f32::EPSILON) / 2.0 * mag[i] + 1e-30;
            let pa = Packed::new(m, k);
            let mut ap = vec![0.0; pa.len()];
            pack_a(m, k, |i, j| a[i * k + j], &mut ap);
            let mut ap2 = vec![0.0; pa.len()];
            pack_a_rows(m, k, &a, k, &mut ap2);
            assert_eq!(
                ap.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                ap2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{m}x{k}x{n}: the two packings of A"
            );
            // B packed both ways: from its rows, and as the transpose of Bᵀ.
            let pb = Packed::new(n, k);
            let mut bp = vec![0.0; pb.len()];
            pack_b_rows(k, n, &b, n, &mut bp);
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let mut btp = vec![0.0; pb.len()];
            pack_b_transposed(k, n, &bt, k, &mut btp);
            assert_eq!(
                bp.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                btp.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{m}x{k}x{n}: the two packings of B"
            );
            let mut c = vec![f32::NAN; m * n];
            gemm(m, n, &ap, pa, &bp, pb, 0.0, &mut c, n);
            for i in 0..m * n {
                assert!(
                    (f64::from(c[i]) - want[i]).abs() <= tol(i),
                    "{m}x{k}x{n} [{i}]: {} vs {}",
                    c[i],
                    want[i]
                );
            }
            // beta = 1 adds to what is there.
            gemm(m, n, &ap, pa, &bp, pb, 1.0, &mut c, n);
            for i in 0..m * n {
                assert!(
                    (f64::from(c[i]) - 2.0 * want[i]).abs() <= 2.0 * tol(i) + 1e-6 * mag[i],
                    "beta 1, [{i}]"
                );
            }
        }
    }
}
