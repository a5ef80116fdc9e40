//! The kernel and the trainer against PyTorch golden vectors (float64 reference).
//!
//! `tests/fixtures/pytorch_{mnist,mnist_f16,color}.safetensors` come from
//! `tools/reference/make_fixtures.py`: the PyTorch model of `tools/reference/flow.py` run in
//! float64 on a fixed batch of real images from `data/`, with the dequantisation noise fixed
//! (the fixtures store `u` itself) and every input an exact f32 value, so the only difference
//! between the two sides is that clayflow computes in f32. Checked here:
//!
//! * kernel, MNIST trained weights (f32 blob and f16 blob) and the colour preset
//!   (closed-form weights): `forward` (z and the log-det), `log_prob_u`, `bits_per_dim`,
//!   `inverse` of a fixed latent, and its quantised pixels;
//! * trainer (`Flow` on the CPU backend), MNIST and colour: per-image log p, the loss
//!   (mean bits/dim), the inverse, and the gradient of the loss w.r.t. the parameters (every
//!   one for MNIST; for colour a documented subset plus a norm and a signed projection of
//!   every tensor, see make_fixtures.py).
//!
//! No bit equality is asked for: SIMD paths chosen by target flags (FMA, other summation
//! orders) change results by ~1e-6 relative, and every tolerance below leaves room for that.
//!
//! Tolerances, and why (ε = 2^-24 ≈ 6e-8, the f32 unit roundoff):
//! * log p / log-det (nats): |err| <= 2e-6 * (|log_det| + |z|^2/2 + D). Each of the 12
//!   couplings' log-det is a sum of D/2 terms `s` computed from convs with up to 49*64 = 3136
//!   products, so rounding grows like ε times the summed magnitudes; the scale of the terms
//!   is the log-det's own size plus D. Observed: <= 5e-7 of that scale. Dropping one
//!   coupling's log-det in the kernel (tried once) put log p off by 6e-4 (colour) and 4e-2
//!   (MNIST) of that scale: 300x and 20,000x the bound.
//! * z: max |err| <= 1e-4 * (1 + max |z|). z passes through 12 couplings, each
//!   multiplying by exp(s) with |s| <= scale (≈1 to 3 for the trained model), so relative
//!   rounding compounds to ~1e-5 worst case; observed <= 2e-5 (trained MNIST).
//! * inverse: max |u err| <= 1e-4 (u is in [0, 1]; same compounding as z); quantised pixels
//!   must agree except where the reference value is within 1e-4 of a level boundary.
//! * bits/dim and the loss: the log p bound divided by D ln 2 (bits/dim is
//!   `-log p / (D ln 2) + 8`), plus 2e-6 for the f32 rounding of the kernel's
//!   `bits_per_dim` (~8 ε at values near 8). Observed: up to 3.2e-6 against ~2e-5.
//! * gradients: measured against PyTorch's *own* float32 error on the same loss, stored in
//!   the fixture as `torch_f32_grad_err[k] = ||g_torch_f32 - g_f64||` per tensor. The
//!   trained MNIST model's loss is ill-conditioned: PyTorch in f32 is 1.7e-3 (relative to
//!   the norm) away from its f64 gradient, and so are we (observed 1.7e-3, about 1.0x
//!   PyTorch's error in every tensor), while the colour model's closed-form weights give
//!   ~1e-7 (PyTorch f32: 1.2e-6).
//!   Per tensor: ||g - g_ref|| <= 4 * torch_f32_grad_err + 1e-4 * ||g_ref|| + 1e-6 * (mean
//!   tensor norm): up to four times the error of PyTorch's own f32, plus a small relative
//!   and absolute allowance (for tensors where PyTorch's rounding happens to be tiny, and
//!   the 6e-8 of the fixtures' f32 storage). All values together: at most 3x PyTorch's f32
//!   error plus 1e-4 relative. A wrong gradient (a missing term, a transposed kernel) is off
//!   by O(1) of the norm, 100x or more over these bounds; dropping one coupling's log-det
//!   gradient in the trainer (tried once) gave 10x to 4000x.
//!
//! The f16 MNIST fixture has its own reference (computed from the f16 weights widened
//! exactly), so the same f32 tolerances apply.
//!
//! The fixture reader and the checks are in `tests/golden/mod.rs`, shared with
//! `tests/pytorch_golden_glow.rs` (the Glow model, under these same tolerances).
//!
//! If a fixture no longer matches its model (the committed blob was re-exported, or the math
//! changed on purpose), regenerate with `tools/reference/make_fixtures.py`; never to make a
//! failing test pass.

mod golden;

use clayflow_kernel::{blob_len, write_blob, Arch, DType, Model, COLOR, MNIST};
use clayflow_trainer::config::tensor_specs;
use golden::{
    check_inputs, check_kernel, check_trainer, hash_signs, hash_uniform, read_blob, root, Checks,
    Fixture,
};

/// The colour fixture's weights (make_fixtures.py `color_params`): scales 0.5 + 0.5 r,
/// conv0/conv1 (2r - 1) / sqrt(fan_in), conv2 0.5 (2r - 1) / sqrt(fan_in), in f64, rounded
/// once to f32. A bias uses its conv's fan-in (the weight just before it in blob order).
fn color_params(arch: &Arch) -> Vec<Vec<f32>> {
    let mut fan_in = 1usize;
    tensor_specs(arch)
        .iter()
        .enumerate()
        .map(|(t, spec)| {
            let name = spec.name.as_str();
            if name.ends_with(".weight") {
                fan_in = spec.shape[1..].iter().product();
            }
            let gain = if name.contains(".conv2.") { 0.5 } else { 1.0 };
            (0..spec.len())
                .map(|i| {
                    let r = hash_uniform(t, i);
                    let v = if name.ends_with(".scale") {
                        0.5 + 0.5 * r
                    } else {
                        (2.0 * r - 1.0) * (gain / (fan_in as f64).sqrt())
                    };
                    v as f32
                })
                .collect()
        })
        .collect()
}

/// Parameters per tensor from a blob, in blob order.
fn blob_params(model: &Model<'_>) -> Vec<Vec<f32>> {
    (0..model.arch().couplings)
        .flat_map(|i| {
            model
                .coupling(i)
                .unwrap()
                .in_blob_order()
                .map(|t| t.iter().collect::<Vec<f32>>())
        })
        .collect()
}

#[test]
fn mnist_trained_kernel_and_trainer_match_pytorch() {
    let f = Fixture::open("mnist");
    let blob = read_blob("tools/firmware/model-f32.cfw", &f.meta("blob_crc"));
    let model = Model::from_blob(&blob).unwrap();
    assert!(
        model.arch() == &MNIST,
        "the committed blob is the MNIST preset"
    );
    let ds = clayflow_trainer::data::load_idx_images(
        &root().join("data/mnist8k-train-images-idx3-ubyte.gz"),
    )
    .unwrap();
    let idx = f.i64s("indices");
    check_inputs(
        &f,
        |px| {
            px.chunks(MNIST.dim())
                .zip(&idx)
                .all(|(p, &i)| ds.get(i as usize) == Some(p))
        },
        &MNIST,
    );
    let mut checks = Checks::default();
    check_kernel(&f, &blob, &mut checks);
    check_trainer(&f, MNIST, &blob_params(&model), &mut checks);
    checks.finish("MNIST, trained f32 weights");
}

#[test]
fn mnist_f16_kernel_matches_pytorch() {
    let f = Fixture::open("mnist_f16");
    let blob = read_blob("tools/firmware/model-f16.cfw", &f.meta("blob_crc"));
    let mut checks = Checks::default();
    check_kernel(&f, &blob, &mut checks);
    checks.finish("MNIST, trained f16 weights (kernel)");
}

#[test]
fn color_kernel_and_trainer_match_pytorch() {
    let f = Fixture::open("color");
    let arch = COLOR;
    let params = color_params(&arch);
    // Our copy of the weight formula gives PyTorch's weights: norm and signed projection
    // of every tensor (f32 values summed in f64: agreement to ~1e-12 relative).
    let (pn, pp) = (f.f64s("param_norm"), f.f64s("param_proj"));
    for (t, p) in params.iter().enumerate() {
        let n = p.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        let s: f64 = p
            .iter()
            .zip(hash_signs(t, p.len()))
            .map(|(&x, s)| f64::from(x) * s)
            .sum();
        assert!(
            (n - pn[t]).abs() <= 1e-9 * pn[t] && (s - pp[t]).abs() <= 1e-9 * pn[t],
            "tensor {t}: closed-form weights differ from make_fixtures.py's"
        );
    }
    check_inputs(&f, |px| colour_crops_match(&f, px), &arch);
    let flat: Vec<f32> = params.concat();
    let mut blob = vec![0u8; blob_len(&arch, DType::F32)];
    write_blob(&arch, DType::F32, &flat, &mut blob).unwrap();
    let mut checks = Checks::default();
    check_kernel(&f, &blob, &mut checks);
    check_trainer(&f, arch, &params, &mut checks);
    checks.finish("colour preset, closed-form weights");
}

/// The colour pixels are 32x32 crops of data/photos (rows of `crops`: file index in the
/// sorted names [astronaut.png, coffee.png], top, left), decoded here with the `image`
/// crate, independently of make_fixtures.py's PNG reader.
fn colour_crops_match(f: &Fixture, px: &[u8]) -> bool {
    let files = ["astronaut.png", "coffee.png"];
    let crops = f.i64s("crops");
    let d = COLOR.dim();
    crops.chunks(3).zip(px.chunks(d)).all(|(c, p)| {
        let (fi, top, left) = (c[0] as usize, c[1] as u32, c[2] as u32);
        let img = image::open(root().join("data/photos").join(files[fi]))
            .unwrap()
            .to_rgb8();
        (0..3).all(|ch| {
            (0..32).all(|y| {
                (0..32).all(|x| {
                    img.get_pixel(left + x, top + y)[ch]
                        == p[ch * 1024 + (y as usize) * 32 + x as usize]
                })
            })
        })
    })
}
