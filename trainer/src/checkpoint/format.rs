//! The on-disk encoding: `state.json`'s envelope, f32 safetensors files and the model file's
//! metadata.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, TensorSpec};

use super::{CheckpointError, TrainState, METADATA_FORMAT};

#[derive(Serialize)]
pub(super) struct StateFileOut<'a> {
    pub(super) format_version: u64,
    pub(super) model: &'a ModelConfig,
    pub(super) state: &'a TrainState,
}

#[derive(Deserialize)]
pub(super) struct StateFileIn {
    pub(super) model: ModelConfig,
    pub(super) state: TrainState,
}

pub(super) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A safetensors file of f32 tensors named `prefix + spec.name`.
pub(super) fn encode_tensors(
    specs: &[TensorSpec],
    prefix: &str,
    tensors: &[Vec<f32>],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, CheckpointError> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| f32_bytes(t)).collect();
    let mut views = Vec::with_capacity(specs.len());
    for (s, b) in specs.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, s.shape.clone(), b)
            .map_err(|e| CheckpointError::Invalid(format!("tensor {prefix}{}: {e}", s.name)))?;
        views.push((format!("{prefix}{}", s.name), view));
    }
    safetensors::serialize(views, &Some(metadata))
        .map_err(|e| CheckpointError::Invalid(format!("cannot encode safetensors: {e}")))
}

pub(super) fn model_metadata(
    model: &ModelConfig,
) -> Result<HashMap<String, String>, CheckpointError> {
    let config = serde_json::to_string(model)
        .map_err(|e| CheckpointError::Invalid(format!("cannot encode the model config: {e}")))?;
    Ok(HashMap::from([
        ("format".to_string(), METADATA_FORMAT.to_string()),
        ("config".to_string(), config),
    ]))
}
