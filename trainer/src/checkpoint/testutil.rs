//! Helpers shared by the checkpoint unit tests: a tiny model, deterministic checkpoints,
//! folder listings and safetensors rewriting.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::config::{tensor_specs, MaskName, ModelConfig};

use super::{load, save, Checkpoint, TrainState};

/// A 1x4x4 image squeezed to 4x2x2, two small couplings: fast to save and load.
pub(super) fn tiny() -> ModelConfig {
    ModelConfig {
        channels: 1,
        height: 4,
        width: 4,
        squeeze: true,
        levels: 1,
        glow: false,
        masks: vec![MaskName::ChannelEven, MaskName::ChannelOdd],
        kernels: [3, 1, 3],
        hidden: [3, 2],
        bits: 8,
        logit_alpha: 0.05,
        prior: false,
        scale_floor: 0.0,
    }
}

/// The trainer's [`SplitMix64`](crate::rng::SplitMix64), with the draws these tests need.
pub(super) struct Rng(pub(super) crate::rng::SplitMix64);
impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        Rng(crate::rng::SplitMix64::new(seed))
    }
    pub(super) fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// A finite f32 with arbitrary bits (any sign, exponent, subnormals).
    pub(super) fn any_finite(&mut self) -> f32 {
        loop {
            let v = f32::from_bits(self.next() as u32);
            if v.is_finite() {
                return v;
            }
        }
    }
    pub(super) fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

pub(super) fn state(step: u64) -> TrainState {
    TrainState {
        step,
        epoch: step / 100,
        batch_in_epoch: step % 100,
        seed: 0xDEAD_BEEF_1234_5678,
        lr: 1e-3,
        lr_scale: 0.5,
        warmup_steps: 200,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        clip_norm: 100.0,
        batch_size: 64,
        world_size: 1,
        elapsed_secs: 1234.5625,
        best_val_bpd: Some(1.0625),
        last_val_bpd: None,
        dataset: "mnist:/data/mnist \"quoted\" ünïcode".to_string(),
        nonfinite_skips: 3,
        restores: 1,
        val_since_best: 0,
        val_rises: 0,
        ema: None,
    }
}

pub(super) fn make(model: ModelConfig, seed: u64, step: u64) -> Checkpoint {
    let specs = tensor_specs(&model.to_arch().unwrap());
    let mut rng = Rng::new(seed);
    let mut gen = |f: &mut dyn FnMut(&mut Rng) -> f32| -> Vec<Vec<f32>> {
        specs
            .iter()
            .map(|s| (0..s.len()).map(|_| f(&mut rng)).collect())
            .collect()
    };
    let mut params = gen(&mut |r| r.any_finite());
    // Values whose bits must survive exactly.
    params[0][0] = -0.0;
    let n = params[0].len();
    params[0][1 % n] = f32::from_bits(1); // smallest subnormal
    let adam_m = gen(&mut |r| r.unit() - 0.5);
    let adam_v = gen(&mut |r| r.unit() * 1e-3);
    Checkpoint {
        model,
        params,
        adam_m,
        adam_v,
        trained: None,
        state: state(step),
    }
}

fn bits(v: &[Vec<f32>]) -> Vec<u32> {
    v.iter().flatten().map(|x| x.to_bits()).collect()
}

pub(super) fn assert_same(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.model, b.model);
    assert_eq!(a.state, b.state);
    assert_eq!(bits(&a.params), bits(&b.params));
    assert_eq!(bits(&a.adam_m), bits(&b.adam_m));
    assert_eq!(bits(&a.adam_v), bits(&b.adam_v));
    assert_eq!(
        a.trained.as_deref().map(bits),
        b.trained.as_deref().map(bits)
    );
}

pub(super) fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub(super) fn latest_text(run: &Path) -> String {
    fs::read_to_string(run.join("checkpoints/LATEST")).unwrap()
}

pub(super) type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Rewrites a safetensors file after `f` edits its tensors and metadata.
pub(super) fn rewrite(
    path: &Path,
    f: impl FnOnce(&mut Vec<RawTensor>, &mut HashMap<String, String>),
) {
    let bytes = fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<RawTensor> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    f(&mut ts, &mut md);
    let views: Vec<(String, TensorView)> = ts
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let md = if md.is_empty() { None } else { Some(md) };
    fs::write(path, safetensors::serialize(views, &md).unwrap()).unwrap();
}

pub(super) fn saved_tiny() -> (tempfile::TempDir, PathBuf, Checkpoint) {
    let tmp = tempfile::tempdir().unwrap();
    let c = make(tiny(), 7, 500);
    let dir = save(tmp.path(), &c, 3).unwrap();
    (tmp, dir, c)
}

pub(super) fn load_err(dir: &Path) -> String {
    load(dir).unwrap_err().to_string()
}
