//! A run's `config.json` ([`RunConfig`]: the training options and what the data and
//! model turned out to be) and the options of one invocation that do not change the
//! results ([`RunOptions`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::schedule::TrainConfig;
use crate::atomic_file::read_json;
use crate::checkpoint::CONFIG_FILE;
use crate::data::{DataInfo, Normalisation};
use crate::model::{Layers, UNetConfig};
use crate::{Error, Result};

/// `config.json`: the training options and what the data and model turned out to be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The training options.
    pub train: TrainConfig,
    /// The network.
    pub model: UNetConfig,
    /// Classes, names, colours and channels of the data.
    pub data: DataInfo,
    /// The intensity normalisation measured on the training split.
    pub normalisation: Normalisation,
}

impl RunConfig {
    /// Reads `DIR/config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            return Err(Error::NotARun {
                path: dir.to_path_buf(),
                detail: format!("no {CONFIG_FILE}"),
            });
        }
        read_json(&path)
    }
}

/// Options of one invocation that do not change the results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// Show an indicatif progress bar per epoch.
    pub progress: bool,
    /// Stop (resumably) after this many epochs of this invocation.
    pub stop_after_epochs: Option<usize>,
    /// Stop in the middle of an epoch after this many optimiser steps of this
    /// invocation, without saving (simulates a crash, for tests).
    pub stop_after_steps: Option<usize>,
    /// Start over in an output folder that already holds a run.
    pub overwrite: bool,
    /// Validate after every this many epochs (from 1), and always after the last epoch
    /// and the last epoch before fine-tuning. 1 (every epoch) by default here; the
    /// command line's `--val-every` defaults to 5.
    pub val_every: usize,
    /// Images per forward pass in evaluation.
    pub eval_batch_size: usize,
    /// Validation images shown in `predictions.png`.
    pub prediction_images: usize,
    /// The layers the model runs on; `None`: the device's default (see
    /// [`Layers::resolve`]). Either set resumes the other's checkpoints.
    pub layers: Option<Layers>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            progress: true,
            stop_after_epochs: None,
            stop_after_steps: None,
            overwrite: false,
            val_every: 1,
            eval_batch_size: 8,
            prediction_images: 6,
            layers: None,
        }
    }
}
