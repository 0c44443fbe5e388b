//! The training schedule: which loss each epoch optimises (cross-entropy first, then
//! cross-entropy + λ·Lovász-Softmax fine-tuning, or one loss throughout), the terms and
//! weights of that loss, the learning rate of each optimiser step, and the epochs that end
//! with a validation. [`RunSchedule`] answers all of these for a run; nothing else
//! computes them.

use candle::Tensor;
use lovasz_candle::{
    cross_entropy, lovasz_softmax_with_logits, Classes, CrossEntropyConfig, LovaszSoftmaxConfig,
};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use crate::optim::cosine_lr;
use crate::Result;

/// Which loss each epoch optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Cross-entropy, then cross-entropy + λ·Lovász for the last `finetune_epochs`.
    CeThenFinetune,
    /// Cross-entropy only.
    Ce,
    /// λ·Lovász-Softmax only.
    Lovasz,
    /// `ce_weight`·cross-entropy + λ·Lovász from the start.
    Combined,
}

impl Schedule {
    /// The kebab-case name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::CeThenFinetune => "ce-then-finetune",
            Schedule::Ce => "ce",
            Schedule::Lovasz => "lovasz",
            Schedule::Combined => "combined",
        }
    }
}

/// The loss of one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Cross-entropy.
    Ce,
    /// λ·Lovász-Softmax.
    Lovasz,
    /// `ce_weight`·cross-entropy + λ·Lovász-Softmax.
    #[serde(rename = "ce+lovasz")]
    Combined,
}

impl Phase {
    /// `ce`, `lovasz` or `ce+lovasz`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Ce => "ce",
            Phase::Lovasz => "lovasz",
            Phase::Combined => "ce+lovasz",
        }
    }
}

/// Which classes the Lovász-Softmax averages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LovaszClasses {
    /// Classes present in the ground truth of the group (the reference's default).
    Present,
    /// Every class.
    All,
}

/// A run's schedule under its [`TrainConfig`]: the phase and loss of each epoch, the
/// learning rate of each optimiser step, and the epochs that end with a validation.
#[derive(Debug, Clone)]
pub struct RunSchedule {
    schedule: Schedule,
    epochs: usize,
    finetune_epochs: usize,
    lr: f64,
    finetune_lr: Option<f64>,
    steps_per_epoch: u64,
    ce_weight: f64,
    lovasz_weight: f64,
    lovasz: LovaszSoftmaxConfig,
}

impl RunSchedule {
    /// The schedule of `cfg` with `steps_per_epoch` optimiser steps in every epoch.
    pub fn new(cfg: &TrainConfig, steps_per_epoch: usize) -> Self {
        RunSchedule {
            schedule: cfg.schedule,
            epochs: cfg.epochs,
            finetune_epochs: cfg.finetune_epochs,
            lr: cfg.lr,
            finetune_lr: cfg.finetune_lr,
            steps_per_epoch: steps_per_epoch as u64,
            ce_weight: cfg.ce_weight,
            lovasz_weight: cfg.lovasz_weight,
            lovasz: LovaszSoftmaxConfig {
                classes: match cfg.lovasz_classes {
                    LovaszClasses::Present => Classes::Present,
                    LovaszClasses::All => Classes::All,
                },
                per_image: cfg.per_image,
                ignore_index: Some(datasets::VOID),
                ..Default::default()
            },
        }
    }

    /// Optimiser steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// The loss of epoch `epoch` (from 0).
    pub fn phase(&self, epoch: usize) -> Phase {
        match self.schedule {
            Schedule::Ce => Phase::Ce,
            Schedule::Lovasz => Phase::Lovasz,
            Schedule::Combined => Phase::Combined,
            Schedule::CeThenFinetune => {
                if epoch + self.finetune_epochs >= self.epochs {
                    Phase::Combined
                } else {
                    Phase::Ce
                }
            }
        }
    }

    /// The first epoch of the fine-tuning phase (`ce-then-finetune`), for plots.
    pub fn switch_epoch(&self) -> Option<usize> {
        (self.schedule == Schedule::CeThenFinetune && self.finetune_epochs > 0)
            .then(|| self.epochs - self.finetune_epochs)
    }

    /// The learning rate of optimiser step `step` (from 0): one cosine over all steps,
    /// or, with a fine-tuning learning rate, a second cosine from the switch epoch on.
    pub fn lr_at(&self, step: u64) -> f64 {
        let spe = self.steps_per_epoch;
        let total = self.epochs as u64 * spe;
        match (self.switch_epoch(), self.finetune_lr) {
            (Some(switch), Some(ft_lr)) if step >= switch as u64 * spe => {
                let start = switch as u64 * spe;
                cosine_lr(ft_lr, step - start, total - start)
            }
            _ => cosine_lr(self.lr, step, total),
        }
    }

    /// Whether epoch `epoch` (from 0) ends with a validation: every `every`-th epoch, the
    /// last one, and the last before the fine-tuning phase.
    pub fn validates(&self, epoch: usize, every: usize) -> bool {
        let n = epoch + 1;
        n.is_multiple_of(every.max(1)) || n == self.epochs || self.switch_epoch() == Some(n)
    }

    /// The loss epoch `epoch` (from 0) optimises: its phase's terms and their weights.
    pub(super) fn loss(&self, epoch: usize) -> EpochLoss {
        EpochLoss {
            phase: self.phase(epoch),
            ce: CrossEntropyConfig {
                ignore_index: Some(datasets::VOID),
                ..Default::default()
            },
            lovasz: self.lovasz.clone(),
            ce_weight: self.ce_weight,
            lovasz_weight: self.lovasz_weight,
        }
    }
}

/// The loss an epoch optimises and the options of its terms.
pub(super) struct EpochLoss {
    phase: Phase,
    ce: CrossEntropyConfig,
    lovasz: LovaszSoftmaxConfig,
    ce_weight: f64,
    lovasz_weight: f64,
}

impl EpochLoss {
    /// The phase this loss belongs to.
    pub(super) fn phase(&self) -> Phase {
        self.phase
    }

    /// The optimised loss, the cross-entropy (detached when not optimised) and the
    /// Lovász-Softmax (when part of the loss) of one batch's logits.
    pub(super) fn of_batch(
        &self,
        logits: &Tensor,
        masks: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        Ok(match self.phase {
            Phase::Ce => {
                let ce = cross_entropy(logits, masks, &self.ce)?;
                (ce.clone(), ce, None)
            }
            Phase::Lovasz => {
                let ce = cross_entropy(&logits.detach(), masks, &self.ce)?;
                let lov = lovasz_softmax_with_logits(logits, masks, &self.lovasz)?;
                ((&lov * self.lovasz_weight)?, ce, Some(lov))
            }
            Phase::Combined => {
                let ce = cross_entropy(logits, masks, &self.ce)?;
                let lov = lovasz_softmax_with_logits(logits, masks, &self.lovasz)?;
                let loss = ((&ce * self.ce_weight)? + (&lov * self.lovasz_weight)?)?;
                (loss, ce, Some(lov))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default options with `epochs` epochs, the last `finetune_epochs` fine-tuning.
    fn finetuning(epochs: usize, finetune_epochs: usize) -> TrainConfig {
        TrainConfig {
            epochs,
            finetune_epochs,
            ..Default::default()
        }
    }

    #[test]
    fn phases_of_the_default_schedule() {
        let cfg = finetuning(6, 2);
        let schedule = RunSchedule::new(&cfg, 1);
        let phases: Vec<Phase> = (0..6).map(|e| schedule.phase(e)).collect();
        assert_eq!(phases[..4], [Phase::Ce; 4]);
        assert_eq!(phases[4..], [Phase::Combined; 2]);
        assert_eq!(schedule.switch_epoch(), Some(4));
        let ce = TrainConfig {
            schedule: Schedule::Ce,
            ..cfg
        };
        assert_eq!(RunSchedule::new(&ce, 1).switch_epoch(), None);
    }

    #[test]
    fn the_finetuning_lr_restarts_the_cosine_at_the_switch() {
        let cfg = TrainConfig {
            lr: 4e-3,
            ..finetuning(4, 2)
        };
        let one_cosine = RunSchedule::new(&cfg, 10);
        assert_eq!(one_cosine.lr_at(0), 4e-3);
        assert_eq!(one_cosine.lr_at(20), cosine_lr(4e-3, 20, 40));
        let restarted = RunSchedule::new(
            &TrainConfig {
                finetune_lr: Some(1e-3),
                ..cfg
            },
            10,
        );
        assert_eq!(restarted.lr_at(19), cosine_lr(4e-3, 19, 40));
        assert_eq!(restarted.lr_at(20), 1e-3);
        assert_eq!(restarted.lr_at(30), cosine_lr(1e-3, 10, 20));
    }

    #[test]
    fn validation_every_nth_epoch_the_last_and_before_finetuning() {
        let schedule = RunSchedule::new(&finetuning(7, 2), 1);
        let validated: Vec<usize> = (0..7).filter(|&e| schedule.validates(e, 3)).collect();
        assert_eq!(validated, [2, 4, 5, 6]);
    }
}
