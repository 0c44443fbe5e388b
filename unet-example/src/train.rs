//! Training: the loss schedule (cross-entropy first, then cross-entropy + λ·Lovász-Softmax
//! fine-tuning), an epoch loop with checkpoints after every epoch, resumption, and the
//! files a finished run leaves behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle::{Device, Tensor};
use datasets::{Batcher, Dataset, Split, Transform, TransformConfig};
use indicatif::{ProgressBar, ProgressStyle};
use lovasz_candle::{
    cross_entropy, lovasz_softmax_with_logits, Classes, CrossEntropyConfig, LovaszSoftmaxConfig,
};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::atomic_file::{read_json, write_bytes, write_json};
use crate::checkpoint::{
    self, checkpoint_name, TrainState, CONFIG_FILE, CURVES_FILE, METRICS_FILE, MODEL_FILE,
    PREDICTIONS_FILE, STATE_FILE, SUMMARY_FILE,
};
use crate::data::{open_split, DataInfo, DataSpec, Normalisation};
use crate::eval::{confusion, percent, EvalReport};
use crate::model::{Norm, UNet, UNetConfig};
use crate::optim::{cosine_lr, AdamW, AdamWConfig};
use crate::{plot, visualise, Error, Result};

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
    /// AdamW options.
    pub adamw: AdamWConfig,
    /// U-Net depth.
    pub depth: usize,
    /// U-Net base width.
    pub base_width: usize,
    /// U-Net normalisation.
    pub norm: Norm,
}

impl Default for TrainConfig {
    /// The default run on the brain slices: the pilot's network and optimiser (widths
    /// 8/16/32/64, batch norm, AdamW 4e-3 with cosine decay, batch 4, flip and
    /// scale/shift augmentation), CE then CE + Lovász for the last third of the epochs.
    fn default() -> Self {
        TrainConfig {
            dataset: "brain".to_string(),
            num_classes: None,
            schedule: Schedule::CeThenFinetune,
            epochs: 60,
            finetune_epochs: 20,
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
            adamw: AdamWConfig::default(),
            depth: 4,
            base_width: 8,
            norm: Norm::Batch,
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

    fn lovasz_config(&self) -> LovaszSoftmaxConfig {
        LovaszSoftmaxConfig {
            classes: match self.lovasz_classes {
                LovaszClasses::Present => Classes::Present,
                LovaszClasses::All => Classes::All,
            },
            per_image: self.per_image,
            ignore_index: Some(datasets::VOID),
            ..Default::default()
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
    /// Images per forward pass in evaluation.
    pub eval_batch_size: usize,
    /// Validation images shown in `predictions.png`.
    pub prediction_images: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            progress: true,
            stop_after_epochs: None,
            stop_after_steps: None,
            overwrite: false,
            eval_batch_size: 8,
            prediction_images: 6,
        }
    }
}

/// One epoch's line of `metrics.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// The loss optimised.
    pub phase: Phase,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Mean training loss (the optimised total).
    pub loss: f64,
    /// Mean cross-entropy.
    pub ce: f64,
    /// Mean Lovász-Softmax (when part of the loss).
    pub lovasz: Option<f64>,
    /// Validation mIoU.
    pub val_miou: Option<f64>,
    /// Validation pixel accuracy.
    pub val_pixel_accuracy: Option<f64>,
    /// Validation IoU per class.
    pub val_iou: Vec<Option<f64>>,
    /// Optimiser steps in the epoch.
    pub steps: usize,
    /// Seconds spent on the training steps.
    pub train_seconds: f64,
    /// Seconds spent on validation.
    pub eval_seconds: f64,
}

/// Mean seconds per training step by loss phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTime {
    /// The phase.
    pub phase: Phase,
    /// Mean seconds per optimiser step (forward, loss, backward, update).
    pub seconds: f64,
    /// Steps measured.
    pub steps: usize,
}

/// `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The run's options.
    pub config: RunConfig,
    /// Epochs completed.
    pub epochs: usize,
    /// Trainable parameters.
    pub parameters: usize,
    /// The device used by the last part of the run.
    pub device: String,
    /// Seconds of training and validation over all parts of the run.
    pub train_seconds: f64,
    /// Seconds per step by phase.
    pub step_seconds: Vec<StepTime>,
    /// Best validation mIoU and its epoch.
    pub best_val_miou: Option<(f64, usize)>,
    /// The final model on the validation split.
    pub val: EvalReport,
    /// The final model on the test split.
    pub test: EvalReport,
}

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

#[derive(Clone)]
struct Splits {
    train: Arc<dyn Dataset>,
    val: Arc<dyn Dataset>,
    test: Arc<dyn Dataset>,
}

impl Splits {
    fn open(spec: &DataSpec, num_classes: Option<usize>) -> Result<Self> {
        Ok(Splits {
            train: open_split(spec, Split::Train, num_classes)?,
            val: open_split(spec, Split::Val, num_classes)?,
            test: open_split(spec, Split::Test, num_classes)?,
        })
    }
}

/// A U-Net, its optimiser, its data and its run folder, trained epoch by epoch.
pub struct Trainer {
    run: RunConfig,
    splits: Splits,
    batcher: Batcher,
    model: UNet,
    opt: AdamW,
    epoch: usize,
    history: Vec<EpochRecord>,
    train_seconds: f64,
    out: Option<PathBuf>,
    options: RunOptions,
    steps_this_run: usize,
    epochs_this_run: usize,
}

impl Trainer {
    /// A new run of `cfg` on `device`. With `out`, the folder is created and
    /// `config.json` written; a folder that already holds a run is an error unless
    /// `options.overwrite`.
    pub fn new(
        cfg: TrainConfig,
        device: &Device,
        out: Option<&Path>,
        options: RunOptions,
    ) -> Result<Self> {
        cfg.validate()?;
        let spec: DataSpec = cfg.dataset.parse()?;
        let splits = Splits::open(&spec, cfg.num_classes)?;
        let data = DataInfo::of(&*splits.train);
        let normalisation = Normalisation::measure(&*splits.train, 256)?;
        let model = cfg.model_config(data.channels, data.num_classes);
        let run = RunConfig {
            train: cfg,
            model,
            data,
            normalisation,
        };
        if let Some(dir) = out {
            prepare_output(dir, options.overwrite)?;
            write_json(&dir.join(CONFIG_FILE), &run)?;
        }
        Trainer::assemble(run, splits, device, out, options)
    }

    /// Continues the run in `dir` from its last completed epoch. The options come from
    /// `DIR/config.json`; the data order and augmentation of the remaining epochs depend
    /// only on the seed and the epoch, so the result equals an uninterrupted run.
    pub fn resume(dir: &Path, device: &Device, options: RunOptions) -> Result<Self> {
        let run = RunConfig::read(dir)?;
        let (state, tensors, ckpt) = checkpoint::load_state(dir)?;
        let spec: DataSpec = run.train.dataset.parse()?;
        let splits = Splits::open(&spec, run.train.num_classes)?;
        if splits.train.num_classes() != run.model.num_classes {
            return Err(Error::ClassMismatch {
                data: splits.train.num_classes(),
                model: run.model.num_classes,
            });
        }
        let mut t = Trainer::assemble(run, splits, device, Some(dir), options)?;
        let (adam, weights): (HashMap<_, _>, HashMap<_, _>) = tensors
            .into_iter()
            .partition(|(k, _)| k.starts_with("adam."));
        t.model.set_tensors(&weights, &ckpt)?;
        t.opt.load_state(&adam, state.steps, &ckpt)?;
        t.epoch = state.epoch;
        t.history = state.history;
        t.train_seconds = state.train_seconds;
        info!(
            "resuming {} at epoch {}/{}",
            dir.display(),
            t.epoch,
            t.run.train.epochs
        );
        Ok(t)
    }

    /// A copy of this run's current state (weights, running statistics, optimiser
    /// moments, history) continuing under another schedule: `compare` forks the
    /// cross-entropy run at the switch epoch so both variants share the first phase.
    pub fn fork(&self, schedule: Schedule, out: Option<&Path>) -> Result<Self> {
        let mut run = self.run.clone();
        run.train.schedule = schedule;
        if let Some(dir) = out {
            prepare_output(dir, self.options.overwrite)?;
            write_json(&dir.join(CONFIG_FILE), &run)?;
        }
        let device = self.model.device().clone();
        let mut t =
            Trainer::assemble(run, self.splits.clone(), &device, out, self.options.clone())?;
        t.model
            .set_tensors(&self.model.tensors()?, Path::new("<in-memory fork>"))?;
        t.opt.load_state(
            &self.opt.state_tensors(),
            self.opt.steps(),
            Path::new("<in-memory fork>"),
        )?;
        t.epoch = self.epoch;
        t.history = self.history.clone();
        t.train_seconds = self.train_seconds;
        if t.out.is_some() {
            t.save()?;
        }
        Ok(t)
    }

    fn assemble(
        run: RunConfig,
        splits: Splits,
        device: &Device,
        out: Option<&Path>,
        options: RunOptions,
    ) -> Result<Self> {
        let cfg = &run.train;
        let model = UNet::new(&run.model, cfg.seed, device)?;
        crate::eval::check_compatible(&model, &*splits.train)?;
        let opt = AdamW::new(model.trainable_vars(), cfg.adamw)?;
        let first = splits.train.get(0)?;
        let crop = cfg.crop.or_else(|| {
            // Scale jitter needs a crop back to a fixed size (which also shifts).
            (cfg.scale != (1.0, 1.0)).then_some((first.height, first.width))
        });
        let transform = Transform::new(TransformConfig {
            crop,
            hflip: cfg.hflip,
            scale: cfg.scale,
            mean: run.normalisation.mean.clone(),
            std: run.normalisation.std.clone(),
            ..Default::default()
        })?;
        let batcher = Batcher::new(Arc::clone(&splits.train))
            .batch_size(cfg.batch_size)
            .shuffle(cfg.seed)
            .drop_last(false)
            .transform(transform)
            .device(device)
            .prefetch(true);
        Ok(Trainer {
            run,
            splits,
            batcher,
            model,
            opt,
            epoch: 0,
            history: Vec::new(),
            train_seconds: 0.0,
            out: out.map(Path::to_path_buf),
            options,
            steps_this_run: 0,
            epochs_this_run: 0,
        })
    }

    /// The run's configuration.
    pub fn config(&self) -> &RunConfig {
        &self.run
    }

    /// The network being trained.
    pub fn model(&self) -> &UNet {
        &self.model
    }

    /// Epochs completed.
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// One record per completed epoch.
    pub fn history(&self) -> &[EpochRecord] {
        &self.history
    }

    /// The run folder, if any.
    pub fn output(&self) -> Option<&Path> {
        self.out.as_deref()
    }

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

    /// One epoch; `false` if a stop option interrupted it (nothing saved).
    fn train_epoch(&mut self) -> Result<bool> {
        let cfg = self.run.train.clone();
        let e = self.epoch;
        let phase = cfg.phase(e);
        let ce_cfg = CrossEntropyConfig {
            ignore_index: Some(datasets::VOID),
            ..Default::default()
        };
        let lcfg = cfg.lovasz_config();
        let bar = if self.options.progress {
            let bar = ProgressBar::new(self.steps_per_epoch());
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(format!("epoch {}/{} {}", e + 1, cfg.epochs, phase.name()));
            bar
        } else {
            ProgressBar::hidden()
        };
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
            let (images, masks) = batch.map_err(|err| match err {
                datasets::Error::Batch(m) => Error::Usage(format!(
                    "{m} (images of this data set differ in size: pass --crop HxW)"
                )),
                other => Error::Data(other),
            })?;
            let logits = self.model.forward_t(&images, true)?;
            let (loss, ce, lovasz) = match phase {
                Phase::Ce => {
                    let ce = cross_entropy(&logits, &masks, &ce_cfg)?;
                    (ce.clone(), ce, None)
                }
                Phase::Lovasz => {
                    let ce = cross_entropy(&logits.detach(), &masks, &ce_cfg)?;
                    let lov = lovasz_softmax_with_logits(&logits, &masks, &lcfg)?;
                    ((&lov * cfg.lovasz_weight)?, ce, Some(lov))
                }
                Phase::Combined => {
                    let ce = cross_entropy(&logits, &masks, &ce_cfg)?;
                    let lov = lovasz_softmax_with_logits(&logits, &masks, &lcfg)?;
                    let loss = ((&ce * cfg.ce_weight)? + (&lov * cfg.lovasz_weight)?)?;
                    (loss, ce, Some(lov))
                }
            };
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
        let cm = confusion(
            &self.model,
            &*self.splits.val,
            &self.run.normalisation,
            self.options.eval_batch_size,
        )?;
        let eval_seconds = eval_start.elapsed().as_secs_f64();
        let n = steps.max(1) as f64;
        let record = EpochRecord {
            epoch: e + 1,
            phase,
            lr,
            loss: loss_sum / n,
            ce: ce_sum / n,
            lovasz: (phase != Phase::Ce).then_some(lov_sum / n),
            val_miou: cm.mean_iou(),
            val_pixel_accuracy: cm.pixel_accuracy(),
            val_iou: cm.iou_per_class(),
            steps,
            train_seconds,
            eval_seconds,
        };
        info!(
            "epoch {}/{} [{}] loss {:.4} (ce {:.4}{}) val mIoU {}% | {:.1}s train ({:.3}s/step), {:.1}s val",
            record.epoch,
            cfg.epochs,
            phase.name(),
            record.loss,
            record.ce,
            record.lovasz.map_or(String::new(), |l| format!(", lovasz {l:.4}")),
            percent(record.val_miou),
            train_seconds,
            train_seconds / n,
            eval_seconds
        );
        self.train_seconds += train_seconds + eval_seconds;
        self.history.push(record);
        self.epoch += 1;
        self.epochs_this_run += 1;
        if self.out.is_some() {
            self.save()?;
        }
        Ok(true)
    }

    /// Writes the checkpoint, `train_state.json`, `model.safetensors`, `metrics.csv`
    /// and `curves.png` for the current epoch.
    fn save(&self) -> Result<()> {
        let Some(dir) = &self.out else {
            return Ok(());
        };
        let state = TrainState {
            epoch: self.epoch,
            steps: self.opt.steps(),
            seed: self.run.train.seed,
            checkpoint: checkpoint_name(self.epoch),
            history: self.history.clone(),
            train_seconds: self.train_seconds,
        };
        checkpoint::save_state(dir, &state, self.model.tensors()?, self.opt.state_tensors())?;
        self.model.save(&dir.join(MODEL_FILE))?;
        write_bytes(
            &dir.join(METRICS_FILE),
            metrics_csv(&self.history, &self.run.data.class_names).as_bytes(),
        )?;
        plot::curves(
            &dir.join(CURVES_FILE),
            &self.history,
            self.run.train.switch_epoch(),
            &format!(
                "{} on {}, seed {}",
                self.run.train.schedule.name(),
                self.run.train.dataset,
                self.run.train.seed
            ),
        )?;
        Ok(())
    }

    /// Evaluates the final model on the validation and test splits and writes
    /// `summary.json` and `predictions.png`.
    pub fn finish(&mut self) -> Result<Summary> {
        let report = |split: &str, ds: &Arc<dyn Dataset>| -> Result<EvalReport> {
            let cm = confusion(
                &self.model,
                &**ds,
                &self.run.normalisation,
                self.options.eval_batch_size,
            )?;
            Ok(EvalReport::new(
                &cm,
                &self.run.data.class_names,
                split,
                ds.len(),
            ))
        };
        let val = report("val", &self.splits.val)?;
        let test = report("test", &self.splits.test)?;
        let best_val_miou = self
            .history
            .iter()
            .filter_map(|r| r.val_miou.map(|m| (m, r.epoch)))
            .fold(None, |best: Option<(f64, usize)>, x| match best {
                Some(b) if b.0 >= x.0 => Some(b),
                _ => Some(x),
            });
        let summary = Summary {
            config: self.run.clone(),
            epochs: self.epoch,
            parameters: self.model.num_parameters(),
            device: crate::device::device_name(self.model.device()),
            train_seconds: self.train_seconds,
            step_seconds: step_times(&self.history),
            best_val_miou,
            val,
            test,
        };
        info!(
            "done: {} epochs, test mIoU {}%, val mIoU {}%",
            self.epoch,
            percent(summary.test.mean_iou),
            percent(summary.val.mean_iou)
        );
        if let Some(dir) = &self.out {
            write_json(&dir.join(SUMMARY_FILE), &summary)?;
            let k = self.options.prediction_images.min(self.splits.val.len());
            let indices = spread(self.splits.val.len(), k);
            visualise::prediction_grid(
                &self.model,
                &*self.splits.val,
                &indices,
                &self.run.normalisation,
                &self.run.data.palette,
                &dir.join(PREDICTIONS_FILE),
            )?;
        }
        Ok(summary)
    }
}

/// `k` indices spread evenly over `0..n`.
pub fn spread(n: usize, k: usize) -> Vec<usize> {
    if k == 0 || n == 0 {
        return Vec::new();
    }
    (0..k.min(n))
        .map(|i| (2 * i + 1) * n / (2 * k.min(n)))
        .collect()
}

fn prepare_output(dir: &Path, overwrite: bool) -> Result<()> {
    if dir.join(STATE_FILE).exists() || dir.join(CONFIG_FILE).exists() {
        if !overwrite {
            return Err(Error::Usage(format!(
                "{} already holds a run: continue it with `train --resume {}`, pick another --output, or pass --overwrite",
                dir.display(),
                dir.display()
            )));
        }
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let ours = name.is_some_and(|n| {
                n.starts_with("checkpoint-epoch")
                    || [
                        CONFIG_FILE,
                        STATE_FILE,
                        MODEL_FILE,
                        METRICS_FILE,
                        SUMMARY_FILE,
                        CURVES_FILE,
                        PREDICTIONS_FILE,
                    ]
                    .contains(&n.as_str())
            });
            if ours && path.is_file() {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Mean seconds per step for each phase present in `history`.
pub fn step_times(history: &[EpochRecord]) -> Vec<StepTime> {
    let mut out: Vec<StepTime> = Vec::new();
    for r in history {
        match out.iter_mut().find(|s| s.phase == r.phase) {
            Some(s) => {
                s.seconds = (s.seconds * s.steps as f64 + r.train_seconds)
                    / (s.steps + r.steps).max(1) as f64;
                s.steps += r.steps;
            }
            None => out.push(StepTime {
                phase: r.phase,
                seconds: r.train_seconds / r.steps.max(1) as f64,
                steps: r.steps,
            }),
        }
    }
    out
}

/// `metrics.csv`: one line per epoch, IoU columns named after the classes.
pub fn metrics_csv(history: &[EpochRecord], class_names: &[String]) -> String {
    let opt = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.6}"));
    let mut s = String::from(
        "epoch,phase,lr,loss,ce,lovasz,val_miou,val_pixel_accuracy,train_seconds,eval_seconds",
    );
    for name in class_names {
        s += &format!(",iou_{}", name.replace([',', '"', ' '], "_"));
    }
    s.push('\n');
    for r in history {
        s += &format!(
            "{},{},{:.6e},{:.6},{:.6},{},{},{},{:.3},{:.3}",
            r.epoch,
            r.phase.name(),
            r.lr,
            r.loss,
            r.ce,
            opt(r.lovasz),
            opt(r.val_miou),
            opt(r.val_pixel_accuracy),
            r.train_seconds,
            r.eval_seconds
        );
        for iou in &r.val_iou {
            s += &format!(",{}", opt(*iou));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_of_the_default_schedule() {
        let cfg = TrainConfig {
            epochs: 6,
            finetune_epochs: 2,
            ..Default::default()
        };
        let phases: Vec<Phase> = (0..6).map(|e| cfg.phase(e)).collect();
        assert_eq!(phases[..4], [Phase::Ce; 4]);
        assert_eq!(phases[4..], [Phase::Combined; 2]);
        assert_eq!(cfg.switch_epoch(), Some(4));
        let ce = TrainConfig {
            schedule: Schedule::Ce,
            ..cfg
        };
        assert_eq!(ce.switch_epoch(), None);
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
                finetune_epochs: 61,
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
        ];
        for c in cases {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }

    #[test]
    fn spread_picks_distinct_indices() {
        assert_eq!(spread(30, 3), vec![5, 15, 25]);
        assert_eq!(spread(2, 5), vec![0, 1]);
        assert!(spread(0, 3).is_empty());
    }

    #[test]
    fn csv_has_a_column_per_class() {
        let r = EpochRecord {
            epoch: 1,
            phase: Phase::Combined,
            lr: 1e-3,
            loss: 1.0,
            ce: 0.5,
            lovasz: Some(0.5),
            val_miou: Some(0.25),
            val_pixel_accuracy: None,
            val_iou: vec![Some(0.5), None],
            steps: 3,
            train_seconds: 1.0,
            eval_seconds: 0.5,
        };
        let csv = metrics_csv(&[r], &["bg".into(), "thing one".into()]);
        let lines: Vec<&str> = csv.lines().collect();
        assert!(lines[0].ends_with("iou_bg,iou_thing_one"));
        assert_eq!(lines[0].split(',').count(), lines[1].split(',').count());
        assert!(lines[1].starts_with("1,ce+lovasz,"));
    }
}
