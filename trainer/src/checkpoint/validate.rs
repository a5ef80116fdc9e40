//! Validation shared by save and load: finite state and tensor values, and comparing a
//! checkpoint's architecture with the requested one.

use std::path::Path;

use crate::config::{tensor_specs, ModelConfig, TensorSpec};

use super::{Checkpoint, CheckpointError, TrainState};

/// Checks the state's floating-point fields are usable (JSON cannot hold NaN or infinity,
/// and an infinite learning rate would wreck the run).
pub(super) fn check_state(s: &TrainState) -> Result<(), String> {
    let f32s = [
        ("lr", s.lr),
        ("lr_scale", s.lr_scale),
        ("beta1", s.beta1),
        ("beta2", s.beta2),
        ("eps", s.eps),
        ("clip_norm", s.clip_norm),
    ];
    for (name, v) in f32s {
        if !v.is_finite() {
            return Err(format!("{name} is {v}, not a finite number"));
        }
    }
    let f64s = [
        ("elapsed_secs", Some(s.elapsed_secs)),
        ("best_val_bpd", s.best_val_bpd),
        ("last_val_bpd", s.last_val_bpd),
    ];
    for (name, v) in f64s {
        if let Some(v) = v.filter(|v| !v.is_finite()) {
            return Err(format!("{name} is {v}, not a finite number"));
        }
    }
    if let Some(d) = s.ema.filter(|d| !(*d > 0.0 && *d < 1.0)) {
        return Err(format!("ema is {d}, not a decay between 0 and 1"));
    }
    Ok(())
}

/// Which values a tensor group may hold.
#[derive(Clone, Copy)]
pub(super) enum Values {
    /// Finite values.
    Finite,
    /// Finite, non-negative values (Adam's second moment).
    NonNegative,
}

/// The first bad value of `data`, as `(index, value)`.
pub(super) fn bad_value(data: &[f32], allowed: Values) -> Option<(usize, f32)> {
    data.iter()
        .copied()
        .enumerate()
        .find(|&(_, v)| match allowed {
            Values::Finite => !v.is_finite(),
            Values::NonNegative => !v.is_finite() || v < 0.0,
        })
}

pub(super) fn describe_bad(index: usize, value: f32, allowed: Values) -> String {
    let want = match allowed {
        Values::Finite => "finite",
        Values::NonNegative => "finite and non-negative",
    };
    format!("value {value} at index {index} (values must be {want})")
}

/// The fields where `a` and `b` differ, as `field a vs b` items.
pub(super) fn config_diff(a: &ModelConfig, b: &ModelConfig) -> String {
    let mut d = Vec::new();
    let mut field = |name: &str, x: String, y: String| {
        if x != y {
            d.push(format!("{name} {x} vs {y}"));
        }
    };
    field("channels", a.channels.to_string(), b.channels.to_string());
    field("height", a.height.to_string(), b.height.to_string());
    field("width", a.width.to_string(), b.width.to_string());
    field("squeeze", a.squeeze.to_string(), b.squeeze.to_string());
    field(
        "couplings",
        a.masks.len().to_string(),
        b.masks.len().to_string(),
    );
    let n = a.masks.len().min(b.masks.len());
    let masks = |m: &[crate::config::MaskName]| {
        let names: Vec<String> = m
            .iter()
            .map(|m| serde_json::to_value(m).map_or_else(|_| format!("{m:?}"), |v| v.to_string()))
            .map(|s| s.trim_matches('"').to_string())
            .collect();
        format!("[{}]", names.join(", "))
    };
    if a.masks[..n] != b.masks[..n] {
        field("masks", masks(&a.masks), masks(&b.masks));
    }
    field(
        "kernels",
        format!("{:?}", a.kernels),
        format!("{:?}", b.kernels),
    );
    field(
        "hidden",
        format!("{:?}", a.hidden),
        format!("{:?}", b.hidden),
    );
    field("bits", a.bits.to_string(), b.bits.to_string());
    if a.logit_alpha.to_bits() != b.logit_alpha.to_bits() {
        d.push(format!(
            "logit_alpha {} vs {}",
            a.logit_alpha, b.logit_alpha
        ));
    }
    if d.is_empty() {
        "the configurations differ".to_string()
    } else {
        d.join(", ")
    }
}

/// Verifies a checkpoint against the architecture a command asked for. The error names
/// `path` and every differing field, checkpoint value first, e.g. `couplings 8 vs 12,
/// hidden [8, 64] vs [16, 128]`.
pub fn check_arch(
    ckpt: &Checkpoint,
    expected: &ModelConfig,
    path: &Path,
) -> Result<(), CheckpointError> {
    if ckpt.model == *expected {
        Ok(())
    } else {
        Err(CheckpointError::ArchMismatch {
            path: path.to_path_buf(),
            diff: config_diff(&ckpt.model, expected),
        })
    }
}

/// Checks an in-memory checkpoint before it is written; returns the tensor specs.
pub(super) fn validate_for_save(ckpt: &Checkpoint) -> Result<Vec<TensorSpec>, CheckpointError> {
    let arch = ckpt
        .model
        .to_arch()
        .map_err(|e| CheckpointError::Invalid(format!("model configuration: {e}")))?;
    let specs = tensor_specs(&arch);
    if ckpt.trained.is_some() != ckpt.state.ema.is_some() {
        return Err(CheckpointError::Invalid(format!(
            "the state says the run {} a weight average, but the checkpoint {} the trained \
             weights beside it",
            if ckpt.state.ema.is_some() {
                "keeps"
            } else {
                "keeps no"
            },
            if ckpt.trained.is_some() {
                "has"
            } else {
                "lacks"
            }
        )));
    }
    let mut groups = vec![
        ("params", "", &ckpt.params, Values::Finite),
        ("adam_m", "m.", &ckpt.adam_m, Values::Finite),
        ("adam_v", "v.", &ckpt.adam_v, Values::NonNegative),
    ];
    if let Some(w) = &ckpt.trained {
        groups.push(("trained", "w.", w, Values::Finite));
    }
    for (group, prefix, tensors, allowed) in groups {
        if tensors.len() != specs.len() {
            return Err(CheckpointError::Invalid(format!(
                "{group} has {} tensors, the model has {}",
                tensors.len(),
                specs.len()
            )));
        }
        for (t, s) in tensors.iter().zip(&specs) {
            if t.len() != s.len() {
                return Err(CheckpointError::Invalid(format!(
                    "{group}: tensor {prefix}{} has {} values, its shape {:?} needs {}",
                    s.name,
                    t.len(),
                    s.shape,
                    s.len()
                )));
            }
            if let Some((i, v)) = bad_value(t, allowed) {
                return Err(CheckpointError::Invalid(format!(
                    "{group}: tensor {prefix}{}: {}",
                    s.name,
                    describe_bad(i, v, allowed)
                )));
            }
        }
    }
    check_state(&ckpt.state).map_err(|e| CheckpointError::Invalid(format!("state: {e}")))?;
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::config::MaskName;

    #[test]
    fn check_arch_names_both_architectures() {
        let model = ModelConfig::preset("mnist").unwrap();
        let c = Checkpoint {
            model: model.clone(),
            params: Vec::new(),
            adam_m: Vec::new(),
            adam_v: Vec::new(),
            trained: None,
            state: state(1),
        };
        let path = Path::new("RUN/checkpoints/step-00000001");
        check_arch(&c, &model, path).unwrap();
        let mut want = model.clone();
        want.masks.truncate(8);
        want.hidden = [16, 128];
        let e = check_arch(&c, &want, path).unwrap_err().to_string();
        assert_eq!(
            e,
            "checkpoint RUN/checkpoints/step-00000001: architecture differs from the \
             requested model: couplings 12 vs 8, hidden [8, 64] vs [16, 128]"
        );
        let mut want = model.clone();
        want.masks[3] = MaskName::CheckerEven;
        want.logit_alpha = 0.1;
        let e = check_arch(&c, &want, path).unwrap_err().to_string();
        assert!(e.contains("masks [channel-even, channel-odd"), "{e}");
        assert!(e.contains("checker-even"), "{e}");
        assert!(e.contains("logit_alpha 0.05 vs 0.1"), "{e}");
    }
}
