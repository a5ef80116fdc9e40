use super::*;
use crate::rng::SplitMix64;
use clayflow_testkit::conv as reference;
use proptest::prelude::*;

/// The test kit's copy of a convolution's shape.
fn dims(s: &ConvShape) -> reference::ConvShape {
    reference::ConvShape {
        batch: s.batch,
        cin: s.cin,
        cout: s.cout,
        height: s.height,
        width: s.width,
        kernel: s.kernel,
    }
}

/// Unit roundoff of f32.
const U: f64 = f32::EPSILON as f64 / 2.0;

/// The trainer's [`SplitMix64`], with the draws these tests need.
struct Rng(SplitMix64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(SplitMix64::new(seed))
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        ((self.0.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

/// Checks `|got - want| <= (terms + 2) * u * mag + tiny` element-wise.
///
/// Justification: each output is a sum of `terms` products of exactly representable
/// f32 values. Whatever the summation order (GEMM blocking, chunked partial sums) and
/// whether products are fused (FMA) or rounded, the f32 result differs from the exact
/// value by at most `terms * u * Σ|terms|` to first order (Higham, Thm 3.1/3.5); the
/// `+ 2` covers the bias add and the final partial-sum adds. `mag` is `Σ|terms|`,
/// computed by the f64 reference on absolute values. The reference's own f64 error
/// is ~1e-16 relative, negligible. A real indexing bug drops or adds a whole term,
/// an error of order `mag / terms`, far above this bound for the sizes tested.
fn assert_close(what: &str, got: &[f32], want: &[f64], mag: &[f64], terms: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let tol_f = (terms as f64 + 2.0) * U;
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = tol_f * m + 1e-30;
        assert!(
            (f64::from(g) - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w}, |diff| {} > tol {tol} (mag {m})",
            (f64::from(g) - w).abs()
        );
    }
}

/// Every algorithm this machine can run.
fn algos() -> Vec<Algo> {
    let mut v = vec![Algo::Gemm];
    if avx2::available() {
        v.push(Algo::Direct);
    }
    if avx512::available() {
        v.push(Algo::Direct512);
        v.push(Algo::Direct512Co);
        v.push(Algo::Direct512Ci);
    }
    v
}

/// Every backward-data plan this machine can run.
fn data_plans() -> Vec<DataPlan> {
    let mut v = vec![DataPlan::Col2im];
    v.extend(algos().into_iter().map(DataPlan::Flipped));
    v
}

/// Forward with every algorithm (and through the public entry point) vs the reference.
fn check_forward(s: &ConvShape, rng: &mut Rng, relu: bool) {
    let x = rng.vec(s.input_len());
    let w = rng.vec(s.weight_len());
    let b = rng.vec(s.cout);
    let want = reference::conv2d_forward_ref(&dims(s), &x, &w, &b, relu);
    let mag = reference::conv2d_forward_ref(&dims(s), &abs(&x), &abs(&w), &abs(&b), false);
    let terms = s.cin * s.kernel * s.kernel + 1;
    let mut y = vec![f32::NAN; s.output_len()];
    conv2d_forward(s, &x, &w, &b, relu, &mut y);
    assert_close(&format!("forward y {s:?}"), &y, &want, &mag, terms);
    for algo in algos() {
        let mut y = vec![f32::NAN; s.output_len()];
        forward_with(s, &x, &w, &b, relu, &mut y, algo);
        assert_close(&format!("forward y {algo:?} {s:?}"), &y, &want, &mag, terms);
    }
}

fn check_backward_data(s: &ConvShape, rng: &mut Rng) {
    let dy = rng.vec(s.output_len());
    let w = rng.vec(s.weight_len());
    let want = reference::conv2d_backward_data_ref(&dims(s), &dy, &w);
    let mag = reference::conv2d_backward_data_ref(&dims(s), &abs(&dy), &abs(&w));
    let terms = s.cout * s.kernel * s.kernel;
    let mut dx = vec![f32::NAN; s.input_len()];
    conv2d_backward_data(s, &dy, &w, &mut dx);
    assert_close(&format!("backward dx {s:?}"), &dx, &want, &mag, terms);
    for plan in data_plans() {
        let mut dx = vec![f32::NAN; s.input_len()];
        backward_data_with(s, &dy, &w, &mut dx, plan);
        assert_close(
            &format!("backward dx {plan:?} {s:?}"),
            &dx,
            &want,
            &mag,
            terms,
        );
    }
}

fn check_backward_weight(s: &ConvShape, rng: &mut Rng) {
    let x = rng.vec(s.input_len());
    let dy = rng.vec(s.output_len());
    let (want_w, want_b) = reference::conv2d_backward_weight_ref(&dims(s), &x, &dy);
    let (mag_w, mag_b) = reference::conv2d_backward_weight_ref(&dims(s), &abs(&x), &abs(&dy));
    // The direct kernel also runs over the zero "gap" columns of the padded-width
    // grid (exact zero products, but they lengthen the summation), so count them.
    let terms = s.batch * s.height * (s.width + 2 * s.pad()) + 8;
    let mut dw = vec![f32::NAN; s.weight_len()];
    let mut db = vec![f32::NAN; s.cout];
    conv2d_backward_weight(s, &x, &dy, &mut dw, &mut db);
    assert_close(&format!("dw {s:?}"), &dw, &want_w, &mag_w, terms);
    assert_close(&format!("db {s:?}"), &db, &want_b, &mag_b, terms);
    for algo in algos() {
        let mut dw = vec![f32::NAN; s.weight_len()];
        let mut db = vec![f32::NAN; s.cout];
        backward_weight_with(s, &x, &dy, &mut dw, &mut db, algo);
        assert_close(&format!("dw {algo:?} {s:?}"), &dw, &want_w, &mag_w, terms);
        assert_close(&format!("db {algo:?} {s:?}"), &db, &want_b, &mag_b, terms);
    }
}

/// The bf16 entry points against the f64 reference on bf16-rounded operands, with the f32
/// kernels' bound (the products of bf16 values are exact in f32, so only the additions
/// round). They round only for 1x1 kernels on a CPU with AMX; otherwise they are the f32
/// ops, checked against the unrounded operands. A kernel that skipped the rounding would
/// miss by about 2^-9 of the magnitude, far above the bound.
fn check_bf16(s: &ConvShape, rng: &mut Rng, relu: bool) {
    let x = rng.vec(s.input_len());
    let w = rng.vec(s.weight_len());
    let b = rng.vec(s.cout);
    let dy = rng.vec(s.output_len());
    let rounds = s.kernel == 1 && bf16_available();
    let r = |v: &[f32]| -> Vec<f32> {
        if rounds {
            v.iter().map(|&x| round_bf16(x)).collect()
        } else {
            v.to_vec()
        }
    };
    let (xr, wr, dyr) = (r(&x), r(&w), r(&dy));
    let want = reference::conv2d_forward_ref(&dims(s), &xr, &wr, &b, relu);
    let mag = reference::conv2d_forward_ref(&dims(s), &abs(&xr), &abs(&wr), &abs(&b), false);
    let mut y = vec![f32::NAN; s.output_len()];
    conv2d_forward_bf16(s, &x, &w, &b, relu, &mut y);
    let terms = s.cin * s.kernel * s.kernel + 1;
    assert_close(&format!("bf16 forward y {s:?}"), &y, &want, &mag, terms);
    let want = reference::conv2d_backward_data_ref(&dims(s), &dyr, &wr);
    let mag = reference::conv2d_backward_data_ref(&dims(s), &abs(&dyr), &abs(&wr));
    let mut dx = vec![f32::NAN; s.input_len()];
    conv2d_backward_data_bf16(s, &dy, &w, &mut dx);
    let terms = s.cout * s.kernel * s.kernel;
    assert_close(&format!("bf16 backward dx {s:?}"), &dx, &want, &mag, terms);
    let (want_w, _) = reference::conv2d_backward_weight_ref(&dims(s), &xr, &dyr);
    let (mag_w, _) = reference::conv2d_backward_weight_ref(&dims(s), &abs(&xr), &abs(&dyr));
    // The bias gradient is summed from the unrounded dy.
    let (_, want_b) = reference::conv2d_backward_weight_ref(&dims(s), &x, &dy);
    let (_, mag_b) = reference::conv2d_backward_weight_ref(&dims(s), &abs(&x), &abs(&dy));
    let mut dw = vec![f32::NAN; s.weight_len()];
    let mut db = vec![f32::NAN; s.cout];
    conv2d_backward_weight_bf16(s, &x, &dy, &mut dw, &mut db);
    let terms = s.batch * s.height * (s.width + 2 * s.pad()) + 8;
    assert_close(&format!("bf16 dw {s:?}"), &dw, &want_w, &mag_w, terms);
    assert_close(&format!("bf16 db {s:?}"), &db, &want_b, &mag_b, terms);
}

fn shape_strategy() -> impl Strategy<Value = ConvShape> {
    (
        1usize..=3,
        1usize..=5,
        1usize..=5,
        1usize..=9,
        1usize..=9,
        0usize..4,
    )
        .prop_map(|(batch, cin, cout, height, width, ki)| ConvShape {
            batch,
            cin,
            cout,
            height,
            width,
            kernel: [1, 3, 5, 7][ki],
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn forward_matches_reference(s in shape_strategy(), seed: u64, relu: bool) {
        check_forward(&s, &mut Rng::new(seed), relu);
    }

    #[test]
    fn backward_data_matches_reference(s in shape_strategy(), seed: u64) {
        check_backward_data(&s, &mut Rng::new(seed));
    }

    #[test]
    fn backward_weight_matches_reference(s in shape_strategy(), seed: u64) {
        check_backward_weight(&s, &mut Rng::new(seed));
    }

    #[test]
    fn bf16_matches_reference_on_rounded_operands(s in shape_strategy(), seed: u64, relu: bool) {
        check_bf16(&s, &mut Rng::new(seed), relu);
    }
}

/// The model's conv shapes (MNIST 14x14 and colour 16x16 presets), at batch 2.
fn preset_shapes(batch: usize) -> Vec<ConvShape> {
    let mk = |cin, cout, hw, kernel| ConvShape {
        batch,
        cin,
        cout,
        height: hw,
        width: hw,
        kernel,
    };
    vec![
        mk(2, 8, 14, 5),
        mk(8, 64, 14, 7),
        mk(64, 4, 14, 3),
        mk(6, 24, 16, 5),
        mk(24, 192, 16, 7),
        mk(192, 12, 16, 3),
    ]
}

#[test]
fn preset_shapes_match_reference() {
    let mut rng = Rng::new(7);
    for s in preset_shapes(2) {
        check_forward(&s, &mut rng, true);
        check_backward_data(&s, &mut rng);
        check_backward_weight(&s, &mut rng);
        check_bf16(&s, &mut rng, true);
    }
}

/// The bf16 ops on `mnist-glow`'s 1x1 shapes (and odd sizes that pad every tile), and
/// their results bitwise the same on 1 and 2 threads.
#[test]
fn bf16_glow_shapes_match_reference_on_any_thread_count() {
    let mut rng = Rng::new(11);
    let mk = |batch, cin, cout, hw| ConvShape {
        batch,
        cin,
        cout,
        height: hw,
        width: hw,
        kernel: 1,
    };
    for s in [
        mk(3, 64, 64, 14),
        mk(2, 64, 64, 7),
        mk(17, 33, 17, 5),
        mk(1, 1, 40, 3),
    ] {
        check_bf16(&s, &mut rng, true);
        let x = rng.vec(s.input_len());
        let dy = rng.vec(s.output_len());
        let w = rng.vec(s.weight_len());
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut dw = vec![0.0; s.weight_len()];
                let mut db = vec![0.0; s.cout];
                conv2d_backward_weight_bf16(&s, &x, &dy, &mut dw, &mut db);
                let mut dx = vec![0.0; s.input_len()];
                conv2d_backward_data_bf16(&s, &dy, &w, &mut dx);
                [dw, db, dx].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
            })
        };
        assert_eq!(run(1), run(2), "{s:?}");
    }
}

/// Larger batches exercise the multi-image GEMM grouping and the chunked
/// weight-gradient reduction (more images than chunks).
#[test]
fn grouped_batches_match_reference() {
    let mut rng = Rng::new(11);
    for s in [
        ConvShape {
            batch: 37,
            cin: 3,
            cout: 5,
            height: 6,
            width: 5,
            kernel: 3,
        },
        ConvShape {
            batch: 40,
            cin: 4,
            cout: 2,
            height: 4,
            width: 4,
            kernel: 1,
        },
        ConvShape {
            batch: 19,
            cin: 2,
            cout: 3,
            height: 7,
            width: 7,
            kernel: 5,
        },
    ] {
        check_forward(&s, &mut rng, false);
        check_forward(&s, &mut rng, true);
        check_backward_data(&s, &mut rng);
        check_backward_weight(&s, &mut rng);
    }
}

/// `<dy, conv(x)> == <conv_transpose(dy), x>` and `<dy, conv(x, w)> == <dw(x, dy), w>`
/// (bias zero), both sides accumulated in f64.
#[test]
fn backward_ops_are_adjoints() {
    let mut rng = Rng::new(3);
    let mut shapes = preset_shapes(2);
    shapes.push(ConvShape {
        batch: 3,
        cin: 3,
        cout: 2,
        height: 5,
        width: 8,
        kernel: 7,
    });
    for s in shapes {
        let x = rng.vec(s.input_len());
        let w = rng.vec(s.weight_len());
        let dy = rng.vec(s.output_len());
        let zero_b = vec![0.0; s.cout];
        let mut y = vec![0.0; s.output_len()];
        conv2d_forward(&s, &x, &w, &zero_b, false, &mut y);
        let mut dx = vec![0.0; s.input_len()];
        conv2d_backward_data(&s, &dy, &w, &mut dx);
        let mut dw = vec![0.0; s.weight_len()];
        let mut db = vec![0.0; s.cout];
        conv2d_backward_weight(&s, &x, &dy, &mut dw, &mut db);

        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(&p, &q)| f64::from(p) * f64::from(q))
                .sum()
        };
        let lhs = dot(&dy, &y);
        // Scale: Σ|dy| * |conv|(|x|, |w|); each f32 value carries relative error
        // <= (terms + 2) u, so the inner products agree to that times the scale.
        let mag_y = reference::conv2d_forward_ref(&dims(&s), &abs(&x), &abs(&w), &zero_b, false);
        let scale: f64 = dy
            .iter()
            .zip(&mag_y)
            .map(|(&d, &m)| f64::from(d.abs()) * m)
            .sum();
        let terms = (s.cin * s.kernel * s.kernel)
            .max(s.cout * s.kernel * s.kernel)
            .max(s.batch * s.height * s.width);
        let tol = 2.0 * (terms as f64 + 2.0) * U * scale;
        let rhs_x = dot(&dx, &x);
        let rhs_w = dot(&dw, &w);
        assert!(
            (lhs - rhs_x).abs() <= tol,
            "{s:?}: <dy,y>={lhs} <dx,x>={rhs_x} tol {tol}"
        );
        assert!(
            (lhs - rhs_w).abs() <= tol,
            "{s:?}: <dy,y>={lhs} <dw,w>={rhs_w} tol {tol}"
        );
        // db is the adjoint of broadcasting the bias.
        let sum_dy: f64 = dy.iter().map(|&v| f64::from(v)).sum();
        let db_sum: f64 = db.iter().map(|&v| f64::from(v)).sum();
        let tol_b = (s.batch * s.height * s.width + 2) as f64
            * U
            * dy.iter().map(|v| f64::from(v.abs())).sum::<f64>();
        assert!((sum_dy - db_sum).abs() <= tol_b);
    }
}

/// Central finite differences of `L(w, b) = <dy, conv(x, w) + b>` match `dw`, `db`,
/// and of `L(x)` match `dx`.
#[test]
fn finite_difference_gradients() {
    let s = ConvShape {
        batch: 2,
        cin: 2,
        cout: 3,
        height: 5,
        width: 4,
        kernel: 3,
    };
    let mut rng = Rng::new(5);
    let x = rng.vec(s.input_len());
    let w = rng.vec(s.weight_len());
    let b = rng.vec(s.cout);
    let dy = rng.vec(s.output_len());
    let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
        let mut y = vec![0.0; s.output_len()];
        conv2d_forward(&s, x, w, b, false, &mut y);
        y.iter()
            .zip(&dy)
            .map(|(&p, &q)| f64::from(p) * f64::from(q))
            .sum()
    };
    let mut dw = vec![0.0; s.weight_len()];
    let mut db = vec![0.0; s.cout];
    conv2d_backward_weight(&s, &x, &dy, &mut dw, &mut db);
    let mut dx = vec![0.0; s.input_len()];
    conv2d_backward_data(&s, &dy, &w, &mut dx);

    // L is affine in each argument, so the central difference is exact up to the f32
    // rounding of the forward pass (~1e-6 * |L|); h = 0.5 is exactly representable.
    let h = 0.5f32;
    let tol = 1e-3;
    let fd = |f: &dyn Fn(f32) -> f64| (f(h) - f(-h)) / (2.0 * f64::from(h));
    for i in 0..w.len() {
        let g = fd(&|d| {
            let mut wp = w.clone();
            wp[i] += d;
            loss(&x, &wp, &b)
        });
        assert!(
            (g - f64::from(dw[i])).abs() <= tol,
            "dw[{i}]: fd {g} vs {}",
            dw[i]
        );
    }
    for i in 0..b.len() {
        let g = fd(&|d| {
            let mut bp = b.clone();
            bp[i] += d;
            loss(&x, &w, &bp)
        });
        assert!(
            (g - f64::from(db[i])).abs() <= tol,
            "db[{i}]: fd {g} vs {}",
            db[i]
        );
    }
    for i in 0..x.len() {
        let g = fd(&|d| {
            let mut xp = x.clone();
            xp[i] += d;
            loss(&xp, &w, &b)
        });
        assert!(
            (g - f64::from(dx[i])).abs() <= tol,
            "dx[{i}]: fd {g} vs {}",
            dx[i]
        );
    }
}

#[test]
fn relu_is_fused() {
    let s = ConvShape {
        batch: 3,
        cin: 4,
        cout: 6,
        height: 7,
        width: 9,
        kernel: 3,
    };
    let mut rng = Rng::new(9);
    let x = rng.vec(s.input_len());
    let w = rng.vec(s.weight_len());
    let b = rng.vec(s.cout);
    let mut y = vec![0.0; s.output_len()];
    let mut yr = vec![0.0; s.output_len()];
    conv2d_forward(&s, &x, &w, &b, false, &mut y);
    conv2d_forward(&s, &x, &w, &b, true, &mut yr);
    assert!(y.iter().any(|&v| v < 0.0) && y.iter().any(|&v| v > 0.0));
    for (&a, &r) in y.iter().zip(&yr) {
        assert_eq!(r, a.max(0.0));
    }
}

/// Results are bitwise identical across runs and rayon thread counts (batch 21 is
/// split into 11 weight-gradient chunks of 2 images).
#[test]
fn deterministic_across_thread_counts() {
    let s = ConvShape {
        batch: 21,
        cin: 8,
        cout: 16,
        height: 14,
        width: 14,
        kernel: 5,
    };
    let mut rng = Rng::new(13);
    let x = rng.vec(s.input_len());
    let w = rng.vec(s.weight_len());
    let b = rng.vec(s.cout);
    let dy = rng.vec(s.output_len());
    let run = |threads: usize, algo: Algo, plan: DataPlan| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut y = vec![0.0; s.output_len()];
            forward_with(&s, &x, &w, &b, true, &mut y, algo);
            let mut dx = vec![0.0; s.input_len()];
            backward_data_with(&s, &dy, &w, &mut dx, plan);
            let mut dw = vec![0.0; s.weight_len()];
            let mut db = vec![0.0; s.cout];
            backward_weight_with(&s, &x, &dy, &mut dw, &mut db, algo);
            (y, dx, dw, db)
        })
    };
    // Every data plan, and every algorithm, at least once.
    let algos = algos();
    for (i, plan) in data_plans().into_iter().enumerate() {
        let algo = algos[i % algos.len()];
        let a = run(1, algo, plan);
        assert!(a == run(3, algo, plan), "{algo:?} {plan:?}");
        assert!(a == run(2, algo, plan), "{algo:?} {plan:?}");
        assert!(a == run(2, algo, plan), "{algo:?} {plan:?}");
    }
}

/// The input-channel-vectorised weight gradient (3x3, ragged 20 input channels) gives
/// the same bits for any thread count, and the same as the public entry point.
#[test]
fn wgrad_ci_deterministic_across_thread_counts() {
    let s = ConvShape {
        batch: 21,
        cin: 20,
        cout: 5,
        height: 14,
        width: 13,
        kernel: 3,
    };
    let mut rng = Rng::new(17);
    let x = rng.vec(s.input_len());
    let dy = rng.vec(s.output_len());
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut dw = vec![0.0; s.weight_len()];
            let mut db = vec![0.0; s.cout];
            backward_weight_with(&s, &x, &dy, &mut dw, &mut db, Algo::Direct512Ci);
            (dw, db)
        })
    };
    let a = run(1);
    assert!(a == run(2));
    assert!(a == run(3));
    let (want, _) = reference::conv2d_backward_weight_ref(&dims(&s), &x, &dy);
    let (mag, _) = reference::conv2d_backward_weight_ref(&dims(&s), &abs(&x), &abs(&dy));
    assert_close("dw ci", &a.0, &want, &mag, s.batch * s.height * s.width + 8);
}

#[test]
fn degenerate_shapes() {
    // Zero batch / zero input channels: outputs are bias-only, gradients are zero.
    let s = ConvShape {
        batch: 2,
        cin: 0,
        cout: 3,
        height: 2,
        width: 3,
        kernel: 3,
    };
    let b = [1.0, -2.0, 3.0];
    let mut y = vec![f32::NAN; s.output_len()];
    conv2d_forward(&s, &[], &[], &b, true, &mut y);
    assert_eq!(&y[..6], &[1.0; 6]);
    assert_eq!(&y[6..12], &[0.0; 6]);
    let dy = vec![1.0; s.output_len()];
    let mut db = [f32::NAN; 3];
    conv2d_backward_weight(&s, &[], &dy, &mut [], &mut db);
    assert_eq!(db, [12.0; 3]);
    conv2d_backward_data(&s, &dy, &[], &mut []);
    let s0 = ConvShape { batch: 0, ..s };
    conv2d_forward(&s0, &[], &[], &b, false, &mut []);
}

#[test]
#[should_panic(expected = "conv2d_forward: w length")]
fn length_mismatch_panics() {
    let s = ConvShape {
        batch: 1,
        cin: 1,
        cout: 1,
        height: 2,
        width: 2,
        kernel: 3,
    };
    conv2d_forward(&s, &[0.0; 4], &[0.0; 8], &[0.0], false, &mut [0.0; 4]);
}

#[test]
#[should_panic(expected = "kernel size must be odd")]
fn even_kernel_panics() {
    let s = ConvShape {
        batch: 1,
        cin: 1,
        cout: 1,
        height: 2,
        width: 2,
        kernel: 2,
    };
    conv2d_forward(&s, &[0.0; 4], &[0.0; 4], &[0.0], false, &mut [0.0; 4]);
}

/// Throughput of the model's convolutions at batch 64:
/// `MATMUL_NUM_THREADS=1 cargo test --release -p clayflow-trainer -- --ignored --nocapture conv_timing`
#[test]
#[ignore]
fn conv_timing() {
    use std::time::Instant;
    let batch: usize = std::env::var("CONV_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let threads_list: Vec<usize> = match std::env::var("CONV_THREADS") {
        Ok(v) => vec![v.parse().unwrap()],
        Err(_) => vec![1, 2],
    };
    for threads in threads_list {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        println!("--- {threads} rayon thread(s), batch {batch}");
        pool.install(|| {
            let mut total = 0.0;
            let only: Option<usize> = std::env::var("CONV_ONLY").ok().and_then(|v| v.parse().ok());
            for (si, s) in preset_shapes(batch).into_iter().enumerate() {
                if only.is_some_and(|o| o != si) {
                    continue;
                }
                let mut rng = Rng::new(1);
                let x = rng.vec(s.input_len());
                let w = rng.vec(s.weight_len());
                let b = rng.vec(s.cout);
                let dy = rng.vec(s.output_len());
                let mut y = vec![0.0; s.output_len()];
                let mut dx = vec![0.0; s.input_len()];
                let mut dw = vec![0.0; s.weight_len()];
                let mut db = vec![0.0; s.cout];
                let secs: f64 = std::env::var("CONV_SECS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.3);
                let time = |f: &mut dyn FnMut()| {
                    f();
                    let mut best = f64::INFINITY;
                    let t0 = Instant::now();
                    let mut reps = 0;
                    while reps < 5 || (t0.elapsed().as_secs_f64() < secs && reps < 1000) {
                        let t = Instant::now();
                        f();
                        best = best.min(t.elapsed().as_secs_f64());
                        reps += 1;
                    }
                    best
                };
                let ops = std::env::var("CONV_OPS").unwrap_or_else(|_| "fdw".into());
                let time_if = |c: char, f: &mut dyn FnMut()| if ops.contains(c) { time(f) } else { f64::NAN };
                // CONV_ALGO=gemm|direct and CONV_DPLAN=col2im|flip_gemm|flip_direct
                // override the automatic choices (for tuning).
                let algo = match std::env::var("CONV_ALGO").as_deref() {
                    Ok("gemm") => Some(Algo::Gemm),
                    Ok("direct") => Some(Algo::Direct),
                    Ok("direct512") => Some(Algo::Direct512),
                    Ok("direct512co") => Some(Algo::Direct512Co),
                    Ok("direct512ci") => Some(Algo::Direct512Ci),
                    _ => None,
                };
                let plan = match std::env::var("CONV_DPLAN").as_deref() {
                    Ok("col2im") => DataPlan::Col2im,
                    Ok("flip_gemm") => DataPlan::Flipped(Algo::Gemm),
                    Ok("flip_direct") => DataPlan::Flipped(Algo::Direct),
                    Ok("flip_direct512") => DataPlan::Flipped(Algo::Direct512),
                    _ => pick_data_plan(&s),
                };
                let fa = algo.unwrap_or(pick_algo_for(s.cout, s.width, s.kernel, false));
                let wa = algo.unwrap_or(pick_wgrad_algo(&s));
                let tf = time_if('f', &mut || forward_with(&s, &x, &w, &b, true, &mut y, fa));
                let td = time_if('d', &mut || backward_data_with(&s, &dy, &w, &mut dx, plan));
                let tw = time_if('w', &mut || {
                    backward_weight_with(&s, &x, &dy, &mut dw, &mut db, wa)
                });
                let gf = s.flops() as f64 * 1e-9;
                if s.height == 14 {
                    total += tf + td + tw;
                }
                println!(
                    "{}->{} k{} {}x{}: fwd {:7.3} ms ({:5.1} GF/s)  bwd_data {:7.3} ms ({:5.1})  bwd_w {:7.3} ms ({:5.1})",
                    s.cin, s.cout, s.kernel, s.height, s.width,
                    tf * 1e3, gf / tf, td * 1e3, gf / td, tw * 1e3, gf / tw
                );
            }
            println!("MNIST preset total (3 convs x 3 ops): {:.3} ms", total * 1e3);
        });
    }
}
