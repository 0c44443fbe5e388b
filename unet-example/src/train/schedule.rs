//! The training schedule: which loss each epoch optimises (cross-entropy first, then
//! cross-entropy + λ·Lovász-Softmax fine-tuning, or one loss throughout), the terms and
//! weights of that loss, the learning rate of each optimiser step, and the epochs that end
//! with a validation. [`RunSchedule`] answers all of these for a run; nothing else
//! computes them.

use candle::Tensor;
use lovasz_candle::distributed::{self, ReduceBuffer};
use lovasz_candle::{
    cross_entropy, lovasz_softmax_with_logits, Classes, CrossEntropyConfig, LovaszSoftmaxConfig,
};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::parallel::DataParallel;
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

    /// One batch's losses from its logits. With `parallel`, the batch is this rank's
    /// shard and every value is the one over the global batch: the cross-entropy's mean
    /// over the global batch's valid pixels and the Lovász-Softmax per batch over all of
    /// them. [`BatchLoss::backward`] weighs each term so that the mean of the ranks'
    /// gradients is the global loss's gradient.
    pub(super) fn of_batch(
        &self,
        logits: &Tensor,
        masks: &Tensor,
        parallel: Option<&DataParallel>,
    ) -> Result<BatchLoss> {
        Ok(match self.phase {
            Phase::Ce => {
                let ce = self.cross_entropy(logits, masks, parallel)?;
                BatchLoss {
                    loss: ce.value.clone(),
                    backward: ce.backward,
                    ce: ce.value,
                    lovasz: None,
                }
            }
            Phase::Lovasz => {
                let ce = self.cross_entropy(&logits.detach(), masks, parallel)?;
                let lov = self.lovasz(logits, masks, parallel)?;
                BatchLoss {
                    loss: (&lov.value * self.lovasz_weight)?,
                    backward: (&lov.backward * self.lovasz_weight)?,
                    ce: ce.value,
                    lovasz: Some(lov.value),
                }
            }
            Phase::Combined => {
                let ce = self.cross_entropy(logits, masks, parallel)?;
                let lov = self.lovasz(logits, masks, parallel)?;
                let (wc, wl) = (self.ce_weight, self.lovasz_weight);
                BatchLoss {
                    loss: ((&ce.value * wc)? + (&lov.value * wl)?)?,
                    backward: ((&ce.backward * wc)? + (&lov.backward * wl)?)?,
                    ce: ce.value,
                    lovasz: Some(lov.value),
                }
            }
        })
    }

    /// The cross-entropy. With `parallel`: the mean over the global batch's valid pixels
    /// (one all-reduce of this shard's count and sum), and for the backward pass this
    /// shard's mean times its share of the valid pixels times the number of ranks.
    fn cross_entropy(
        &self,
        logits: &Tensor,
        masks: &Tensor,
        parallel: Option<&DataParallel>,
    ) -> Result<Term> {
        let ce = cross_entropy(logits, masks, &self.ce)?;
        let Some(p) = parallel else {
            return Ok(Term {
                value: ce.clone(),
                backward: ce,
            });
        };
        let labels: Vec<u32> = masks.flatten_all()?.to_vec1()?;
        let valid = labels.iter().filter(|&&l| l != datasets::VOID).count() as f64;
        let mean = if valid > 0.0 {
            ce.to_scalar::<f32>()? as f64
        } else {
            0.0
        };
        let mut sums = [valid, mean * valid];
        p.group().all_reduce_sum(ReduceBuffer::F64(&mut sums))?;
        let [all_valid, sum] = sums;
        let global = if all_valid > 0.0 {
            sum / all_valid
        } else {
            0.0
        };
        let value = Tensor::new(global as f32, logits.device())?;
        let backward = if valid > 0.0 {
            (&ce * (valid * p.group().world_size() as f64 / all_valid))?
        } else {
            ce.detach().zeros_like()?
        };
        Ok(Term { value, backward })
    }

    /// The Lovász-Softmax. With `parallel`, over the global batch (per batch), and for the
    /// backward pass times the number of ranks; per image, the shard's mean for the
    /// backward pass (the mean of the ranks' gradients is then the global mean's).
    fn lovasz(
        &self,
        logits: &Tensor,
        masks: &Tensor,
        parallel: Option<&DataParallel>,
    ) -> Result<Term> {
        let Some(p) = parallel else {
            let lov = lovasz_softmax_with_logits(logits, masks, &self.lovasz)?;
            return Ok(Term {
                value: lov.clone(),
                backward: lov,
            });
        };
        let group = p.group();
        let lov = distributed::lovasz_softmax_with_logits(logits, masks, &self.lovasz, group)?;
        if !self.lovasz.per_image {
            return Ok(Term {
                backward: (&lov * group.world_size() as f64)?,
                value: lov,
            });
        }
        // Per image the loss is the shard's mean (no communication); the value logged is
        // the mean over the ranks (equal shards), the global batch's mean.
        let mut mean = [lov.to_scalar::<f32>()? as f64];
        group.all_reduce_sum(ReduceBuffer::F64(&mut mean))?;
        let global = mean[0] / group.world_size() as f64;
        Ok(Term {
            value: Tensor::new(global as f32, logits.device())?,
            backward: lov,
        })
    }
}

/// A loss term: its value, and what this rank differentiates for it.
struct Term {
    value: Tensor,
    backward: Tensor,
}

/// The losses of one batch.
pub(super) struct BatchLoss {
    /// The optimised loss.
    pub loss: Tensor,
    /// What this rank differentiates: `loss`, with a global Lovász term scaled by the
    /// number of ranks in data-parallel training.
    pub backward: Tensor,
    /// The cross-entropy (detached when not optimised).
    pub ce: Tensor,
    /// The Lovász-Softmax, when part of the loss.
    pub lovasz: Option<Tensor>,
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
