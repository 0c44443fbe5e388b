//! The epoch loop: [`Trainer::run`] and [`Trainer::run_until`] train epoch by epoch
//! (each epoch: the optimiser steps, validation, a record, a save), the learning rate of
//! each step, and how a run ended ([`Outcome`]).

use std::time::Instant;

use candle::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use lovasz_candle::{
    cross_entropy, lovasz_softmax_with_logits, CrossEntropyConfig, LovaszSoftmaxConfig,
};
use tracing::info;

use super::finish::Summary;
use super::record::EpochRecord;
use super::schedule::{Phase, TrainConfig};
use super::trainer::Trainer;
use crate::eval::{confusion, percent};
use crate::optim::cosine_lr;
use crate::{Error, Result};

/// How [`Trainer::run`] ended.
#[derive(Debug)]
pub enum Outcome {
    /// All epochs done; summary and figures written.
    Finished(Box<Summary>),
    /// Stopped after an epoch as asked (`stop_after_epochs`); resumable.
    Stopped {
        /// Epochs completed.
        epoch: usize,
    },
    /// Stopped mid-epoch as asked (`stop_after_steps`); resumable from the last epoch.
    Interrupted {
        /// Epochs completed (the interrupted one is not).
        epoch: usize,
    },
}

impl Trainer {
    /// Trains until all epochs are done (then writes the summary and figures), or until
    /// a stop option says to stop.
    pub fn run(&mut self) -> Result<Outcome> {
        let total = self.run.train.epochs;
        if let Some(o) = self.run_until(total)? {
            return Ok(o);
        }
        Ok(Outcome::Finished(Box::new(self.finish()?)))
    }

    /// Trains until `epoch` epochs are completed; `Some` when a stop option cut it short.
    pub fn run_until(&mut self, epoch: usize) -> Result<Option<Outcome>> {
        let target = epoch.min(self.run.train.epochs);
        while self.epoch < target {
            if self
                .options
                .stop_after_epochs
                .is_some_and(|n| self.epochs_this_run >= n)
            {
                info!("stopping after {} epoch(s) as asked", self.epochs_this_run);
                return Ok(Some(Outcome::Stopped { epoch: self.epoch }));
            }
            if !self.train_epoch()? {
                return Ok(Some(Outcome::Interrupted { epoch: self.epoch }));
            }
        }
        Ok(None)
    }

    fn steps_per_epoch(&self) -> u64 {
        self.batcher.num_batches() as u64
    }

    /// The learning rate of optimiser step `step` (from 0).
    pub fn lr_at(&self, step: u64) -> f64 {
        let cfg = &self.run.train;
        let spe = self.steps_per_epoch();
        let total = cfg.epochs as u64 * spe;
        match (cfg.switch_epoch(), cfg.finetune_lr) {
            (Some(switch), Some(ft_lr)) if step >= switch as u64 * spe => {
                let start = switch as u64 * spe;
                cosine_lr(ft_lr, step - start, total - start)
            }
            _ => cosine_lr(cfg.lr, step, total),
        }
    }

    /// Whether epoch `e` (from 0) ends with a validation: every `val_every`-th epoch, the
    /// last one, and the last before the fine-tuning phase.
    fn validates(&self, e: usize) -> bool {
        let n = e + 1;
        let cfg = &self.run.train;
        n.is_multiple_of(self.options.val_every.max(1))
            || n == cfg.epochs
            || cfg.switch_epoch() == Some(n)
    }

    /// One epoch; `false` if a stop option interrupted it (nothing saved).
    fn train_epoch(&mut self) -> Result<bool> {
        let cfg = self.run.train.clone();
        let e = self.epoch;
        let phase = cfg.phase(e);
        let epoch_loss = EpochLoss::new(&cfg, phase);
        let bar = self.progress_bar(phase);
        let start = Instant::now();
        let (mut loss_sum, mut ce_sum, mut lov_sum, mut steps) = (0f64, 0f64, 0f64, 0usize);
        let mut lr = self.lr_at(self.opt.steps());
        for batch in self.batcher.epoch(e) {
            if self
                .options
                .stop_after_steps
                .is_some_and(|n| self.steps_this_run >= n)
            {
                bar.abandon();
                info!("interrupted in epoch {} as asked", e + 1);
                return Ok(false);
            }
            let (images, masks) = batch.map_err(batch_error)?;
            let logits = self.model.forward_t(&images, true)?;
            let (loss, ce, lovasz) = epoch_loss.of_batch(&logits, &masks)?;
            lr = self.lr_at(self.opt.steps());
            let grads = loss.backward()?;
            self.opt.step(&grads, lr)?;
            let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
            loss_sum += scalar(&loss)?;
            ce_sum += scalar(&ce)?;
            if let Some(l) = &lovasz {
                lov_sum += scalar(l)?;
            }
            steps += 1;
            self.steps_this_run += 1;
            bar.inc(1);
            bar.set_message(format!("loss {:.4}", loss_sum / steps as f64));
        }
        bar.finish_and_clear();
        let train_seconds = start.elapsed().as_secs_f64();
        let eval_start = Instant::now();
        let cm = if self.validates(e) {
            Some(confusion(
                &self.model,
                &*self.splits.val,
                &self.run.normalisation,
                self.options.eval_batch_size,
            )?)
        } else {
            None
        };
        let eval_seconds = eval_start.elapsed().as_secs_f64();
        let n = steps.max(1) as f64;
        let record = EpochRecord {
            epoch: e + 1,
            phase,
            lr,
            loss: loss_sum / n,
            ce: ce_sum / n,
            lovasz: (phase != Phase::Ce).then_some(lov_sum / n),
            val_miou: cm.as_ref().and_then(|cm| cm.mean_iou()),
            val_pixel_accuracy: cm.as_ref().and_then(|cm| cm.pixel_accuracy()),
            val_iou: cm.map_or_else(
                || vec![None; self.run.data.num_classes],
                |cm| cm.iou_per_class(),
            ),
            steps,
            train_seconds,
            eval_seconds,
        };
        log_epoch(&record, cfg.epochs);
        self.end_epoch(record)?;
        Ok(true)
    }

    /// The progress bar of the current epoch (hidden unless `options.progress`).
    fn progress_bar(&self, phase: Phase) -> ProgressBar {
        if self.options.progress {
            let bar = ProgressBar::new(self.steps_per_epoch());
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(format!(
                "epoch {}/{} {}",
                self.epoch + 1,
                self.run.train.epochs,
                phase.name()
            ));
            bar
        } else {
            ProgressBar::hidden()
        }
    }

    /// Adds a completed epoch to the history and, with a run folder, saves the run.
    fn end_epoch(&mut self, record: EpochRecord) -> Result<()> {
        self.train_seconds += record.train_seconds + record.eval_seconds;
        self.history.push(record);
        self.epoch += 1;
        self.epochs_this_run += 1;
        if self.out.is_some() {
            self.save()?;
        }
        Ok(())
    }
}

/// The loss an epoch optimises and the options of its terms.
struct EpochLoss {
    phase: Phase,
    ce: CrossEntropyConfig,
    lovasz: LovaszSoftmaxConfig,
    ce_weight: f64,
    lovasz_weight: f64,
}

impl EpochLoss {
    /// The loss of `phase` under the weights and Lovász options of `cfg`.
    fn new(cfg: &TrainConfig, phase: Phase) -> Self {
        EpochLoss {
            phase,
            ce: CrossEntropyConfig {
                ignore_index: Some(datasets::VOID),
                ..Default::default()
            },
            lovasz: cfg.lovasz_config(),
            ce_weight: cfg.ce_weight,
            lovasz_weight: cfg.lovasz_weight,
        }
    }

    /// The optimised loss, the cross-entropy (detached when not optimised) and the
    /// Lovász-Softmax (when part of the loss) of one batch's logits.
    fn of_batch(
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

/// A batching error as the user's error, with the fix for images that differ in size.
fn batch_error(err: datasets::Error) -> Error {
    match err {
        datasets::Error::Batch(m) => Error::Usage(format!(
            "{m} (images of this data set differ in size: pass --crop HxW)"
        )),
        other => Error::Data(other),
    }
}

/// Logs an epoch's losses, validation mIoU and times (of `epochs` in the run).
fn log_epoch(record: &EpochRecord, epochs: usize) {
    let n = record.steps.max(1) as f64;
    info!(
        "epoch {}/{} [{}] loss {:.4} (ce {:.4}{}){} | {:.1}s train ({:.3}s/step), {:.1}s val",
        record.epoch,
        epochs,
        record.phase.name(),
        record.loss,
        record.ce,
        record
            .lovasz
            .map_or(String::new(), |l| format!(", lovasz {l:.4}")),
        record.val_miou.map_or(String::new(), |m| format!(
            " val mIoU {}%",
            percent(Some(m))
        )),
        record.train_seconds,
        record.train_seconds / n,
        record.eval_seconds
    );
}
