//! The configuration of a run: [`TrainConfig`] (the options that define the results,
//! with their validation), [`RunConfig`] (`config.json`: those options and what the data
//! and model turned out to be) and [`RunOptions`] (options of one invocation that do not
//! change the results).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::checkpoint::CONFIG_FILE;
use super::schedule::{LovaszClasses, Schedule};
use crate::atomic_file::read_json;
use crate::data::{DataInfo, Normalisation};
use crate::model::{Layers, Norm, UNetConfig};
use crate::optim::AdamWConfig;
use crate::{Error, Result};

/// How each epoch's batches are drawn from the training split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Sampling {
    /// The paper's equibatch (`datasets::equibatch`): every class in each batch as far
    /// as the data allows, every image once per epoch. The default.
    Equibatch,
    /// A plain shuffle (what runs written before this option used).
    Shuffle,
}

impl Sampling {
    /// The sampling of a `config.json` that does not name one: those runs shuffled.
    fn before_the_option() -> Self {
        Sampling::Shuffle
    }
}

/// Everything that defines a training run (saved as `config.json` → `train`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Data set: `brain`, `shapes[:SIZE[:LEN]]`, `folder:PATH` or `voc:PATH`.
    pub dataset: String,
    /// Number of classes (required for folders; checked against other sources).
    pub num_classes: Option<usize>,
    /// Loss schedule.
    pub schedule: Schedule,
    /// Total epochs.
    pub epochs: usize,
    /// The last this many epochs fine-tune with CE + λ·Lovász (`ce-then-finetune` only).
    pub finetune_epochs: usize,
    /// Peak learning rate of the cosine schedule over all epochs.
    pub lr: f64,
    /// If set, the fine-tuning phase restarts a cosine from this rate instead of
    /// continuing the main schedule.
    pub finetune_lr: Option<f64>,
    /// λ, the weight of the Lovász-Softmax loss.
    pub lovasz_weight: f64,
    /// The weight of cross-entropy in the combined loss.
    pub ce_weight: f64,
    /// Lovász-Softmax per image (else over the whole batch).
    pub per_image: bool,
    /// Classes the Lovász-Softmax averages over.
    pub lovasz_classes: LovaszClasses,
    /// Images per batch.
    pub batch_size: usize,
    /// Training crop `(height, width)`; `None` trains on whole images.
    pub crop: Option<(usize, usize)>,
    /// Probability of a horizontal flip.
    pub hflip: f32,
    /// Scale jitter range; with a crop (or the whole image size as crop) it also shifts.
    pub scale: (f32, f32),
    /// Seed of the weights, data order and augmentation.
    pub seed: u64,
    /// How batches are drawn; configs written before this option read as `Shuffle`.
    #[serde(default = "Sampling::before_the_option")]
    pub sampling: Sampling,
    /// AdamW options.
    pub adamw: AdamWConfig,
    /// U-Net depth.
    pub depth: usize,
    /// U-Net base width.
    pub base_width: usize,
    /// U-Net normalisation.
    pub norm: Norm,
    /// In data-parallel training, batch norm with the statistics of the global batch
    /// (synchronised over the ranks) instead of each rank's shard's. Configs written
    /// before this option read as `false`.
    #[serde(default)]
    pub sync_bn: bool,
}

impl Default for TrainConfig {
    /// The default run on the brain slices: a U-Net of widths 12/24/48/96 with batch norm,
    /// the pilot's optimiser and batches (AdamW 4e-3 with cosine decay, batch 4, flip and
    /// scale/shift augmentation), equibatch sampling, 180 epochs: CE, then CE + Lovász for
    /// the last half. The network's shape is [`UNetConfig::default`]'s.
    fn default() -> Self {
        let model = UNetConfig::default();
        TrainConfig {
            dataset: "brain".to_string(),
            num_classes: None,
            schedule: Schedule::CeThenFinetune,
            epochs: 180,
            finetune_epochs: 90,
            lr: 4e-3,
            finetune_lr: None,
            lovasz_weight: 1.0,
            ce_weight: 1.0,
            per_image: false,
            lovasz_classes: LovaszClasses::Present,
            batch_size: 4,
            crop: None,
            hflip: 0.5,
            scale: (0.9, 1.1),
            seed: 0,
            sampling: Sampling::Equibatch,
            adamw: AdamWConfig::default(),
            depth: model.depth,
            base_width: model.base_width,
            norm: model.norm,
            sync_bn: false,
        }
    }
}

impl TrainConfig {
    /// Checks the options that do not need the data.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Usage(m));
        if self.epochs == 0 {
            return bad("--epochs must be at least 1".to_string());
        }
        if self.schedule == Schedule::CeThenFinetune && self.finetune_epochs > self.epochs {
            return bad(format!(
                "--finetune-epochs {} is more than --epochs {}",
                self.finetune_epochs, self.epochs
            ));
        }
        for (name, v) in [
            ("--lr", self.lr),
            ("--finetune-lr", self.finetune_lr.unwrap_or(1.0)),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} must be a positive number, got {v}"));
            }
        }
        for (name, v) in [
            ("--lambda", self.lovasz_weight),
            ("--ce-weight", self.ce_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} must be >= 0, got {v}"));
            }
        }
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1".to_string());
        }
        if !(0.0..=1.0).contains(&self.hflip) {
            return bad(format!("--hflip {} is not a probability", self.hflip));
        }
        let (lo, hi) = self.scale;
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return bad(format!("scale range {lo}..{hi} is not 0 < min <= max"));
        }
        if self.sync_bn && self.norm != Norm::Batch {
            return bad(format!(
                "--sync-bn synchronises batch-norm statistics, and --norm {:?} has none",
                self.norm
            ));
        }
        self.model_config(1, 2).validate()?;
        if let Some((h, w)) = self.crop {
            let m = 1 << (self.depth.clamp(1, 8) - 1);
            if h == 0 || w == 0 || h % m != 0 || w % m != 0 {
                return bad(format!(
                    "--crop {h}x{w}: a U-Net of depth {} needs sides that are positive multiples of {m}",
                    self.depth
                ));
            }
        }
        Ok(())
    }

    /// The U-Net for `channels` input channels and `classes` classes.
    pub fn model_config(&self, channels: usize, classes: usize) -> UNetConfig {
        UNetConfig {
            in_channels: channels,
            num_classes: classes,
            depth: self.depth,
            base_width: self.base_width,
            norm: self.norm,
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_written_before_the_sampling_option_shuffle() {
        let mut json = serde_json::to_value(TrainConfig::default()).unwrap();
        json.as_object_mut().unwrap().remove("sampling");
        let cfg: TrainConfig = serde_json::from_value(json).unwrap();
        assert_eq!(cfg.sampling, Sampling::Shuffle);
        let cfg = TrainConfig {
            sampling: Sampling::Equibatch,
            ..cfg
        };
        assert_eq!(cfg, TrainConfig::default());
    }

    #[test]
    fn validation_rejects_bad_options() {
        let ok = TrainConfig::default();
        assert!(ok.validate().is_ok());
        let cases = [
            TrainConfig {
                epochs: 0,
                ..ok.clone()
            },
            TrainConfig {
                finetune_epochs: ok.epochs + 1,
                ..ok.clone()
            },
            TrainConfig {
                lr: -1.0,
                ..ok.clone()
            },
            TrainConfig {
                batch_size: 0,
                ..ok.clone()
            },
            TrainConfig {
                crop: Some((100, 96)),
                ..ok.clone()
            },
            TrainConfig {
                depth: 0,
                ..ok.clone()
            },
            TrainConfig {
                lovasz_weight: f64::NAN,
                ..ok.clone()
            },
            TrainConfig {
                sync_bn: true,
                norm: Norm::Group { groups: 4 },
                ..ok.clone()
            },
        ];
        for c in cases {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
