//! The files of a run folder and how they are written so that a crash at any moment
//! leaves a resumable run.
//!
//! ```text
//! config.json                    what was trained on what (written once)
//! model.safetensors              the latest weights + batch-norm statistics (eval, predict)
//! checkpoint-epochNNNN.safetensors   weights + AdamW moments after epoch NNNN
//! train_state.json               epochs done, optimiser steps, metrics history, and the
//!                                name of the checkpoint file above: the commit point
//! metrics.csv, summary.json, curves.png, predictions.png
//! ```
//!
//! Every file is written to a temporary name and renamed over the old one (see
//! [`crate::atomic_file`]), so readers see the old or the new version, never a partial
//! one. The checkpoint file has a new name each epoch and `train_state.json`, renamed
//! last, says which one is current: a crash between the two renames leaves the previous
//! state valid.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::EpochRecord;
use crate::atomic_file::{read_json, write_atomically, write_json};
use crate::{Error, Result};

/// `config.json`.
pub const CONFIG_FILE: &str = "config.json";
/// `model.safetensors`.
pub const MODEL_FILE: &str = "model.safetensors";
/// `train_state.json`.
pub const STATE_FILE: &str = "train_state.json";
/// `metrics.csv`.
pub const METRICS_FILE: &str = "metrics.csv";
/// `summary.json`.
pub const SUMMARY_FILE: &str = "summary.json";
/// `curves.png`.
pub const CURVES_FILE: &str = "curves.png";
/// `predictions.png`.
pub const PREDICTIONS_FILE: &str = "predictions.png";

/// `train_state.json`: everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    /// AdamW updates made (the position in the learning-rate schedule).
    pub steps: u64,
    /// The training seed; with `epoch` it fixes the data order and augmentation of
    /// every later epoch, so no other random state needs saving.
    pub seed: u64,
    /// The checkpoint file (weights + AdamW moments) of this state, in the run folder.
    pub checkpoint: String,
    /// One record per completed epoch.
    pub history: Vec<EpochRecord>,
    /// Seconds of training so far (over all interrupted parts).
    pub train_seconds: f64,
}

/// Saves a training state: the checkpoint file (model tensors and optimiser moments)
/// under a fresh name, then `train_state.json`, then removes the previous checkpoint.
pub fn save_state(
    dir: &Path,
    state: &TrainState,
    model: HashMap<String, Tensor>,
    optimiser: HashMap<String, Tensor>,
) -> Result<()> {
    let mut tensors = model;
    tensors.extend(optimiser);
    let path = dir.join(&state.checkpoint);
    write_atomically(&path, |tmp| Ok(candle::safetensors::save(&tensors, tmp)?))?;
    let previous: Option<TrainState> = read_json(&dir.join(STATE_FILE)).ok();
    write_json(&dir.join(STATE_FILE), state)?;
    if let Some(prev) = previous {
        if prev.checkpoint != state.checkpoint {
            let _ = std::fs::remove_file(dir.join(prev.checkpoint));
        }
    }
    Ok(())
}

/// Reads `train_state.json` and its checkpoint's tensors (on the CPU).
pub fn load_state(dir: &Path) -> Result<(TrainState, HashMap<String, Tensor>, PathBuf)> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.is_file() {
        return Err(Error::NotARun {
            path: dir.to_path_buf(),
            detail: format!("no {STATE_FILE} (nothing to resume: was a first epoch finished?)"),
        });
    }
    let state: TrainState = read_json(&state_path)?;
    let ckpt = dir.join(&state.checkpoint);
    let tensors =
        candle::safetensors::load(&ckpt, &Device::Cpu).map_err(|e| Error::CheckpointMismatch {
            path: ckpt.clone(),
            detail: format!("cannot read the checkpoint named by {STATE_FILE} ({e})"),
        })?;
    Ok((state, tensors, ckpt))
}

/// The checkpoint file name of epoch `epoch`.
pub fn checkpoint_name(epoch: usize) -> String {
    format!("checkpoint-epoch{epoch:04}.safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_state_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_state(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a training run folder"), "{err}");
    }
}
