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
//! Every file is written to a temporary name and renamed over the old one, so readers
//! see the old or the new version, never a partial one. The checkpoint file has a new
//! name each epoch and `train_state.json`, renamed last, says which one is current: a
//! crash between the two renames leaves the previous state valid.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::train::EpochRecord;
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

/// Calls `write` with a temporary path next to `path`, then renames it to `path`.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_string());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result =
        write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::json(path, e))?;
    write_bytes(path, (text + "\n").as_bytes())
}

/// Reads JSON from `path`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::json(path, e))
}

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
    fn atomic_write_replaces_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_bytes(&p, b"one").unwrap();
        write_bytes(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let failed = write_atomically(&p, |_| Err(Error::Usage("boom".into())));
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_state_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_state(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a training run folder"), "{err}");
    }
}
