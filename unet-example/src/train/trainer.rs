//! The [`Trainer`]: a U-Net, its optimiser, its data and its run folder. It is built for
//! a new run, a resumed one, or a fork of another; trains epoch by epoch (each epoch: the
//! optimiser steps, validation, a record, a save) until done or told to stop
//! ([`Outcome`]); and ends with the final evaluation and `summary.json`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle::{Device, Tensor};
use datasets::Dataset;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

use super::checkpoint::{
    self, CURVES_FILE, METRICS_FILE, MODEL_FILE, PREDICTIONS_FILE, SUMMARY_FILE,
};
use super::config::{RunConfig, RunOptions, TrainConfig};
use super::data::{batch_error, Splits, TrainingData};
use super::invocation::Invocation;
use super::parallel::DataParallel;
use super::progress::Progress;
use super::record::{metrics_csv, step_times, EpochRecord};
use super::schedule::{Phase, RunSchedule, Schedule};
use super::summary::Summary;
use crate::atomic_file::{write_bytes, write_json};
use crate::data::{DataInfo, DataSpec, Normalisation};
use crate::eval::{confusion, evaluate, EvalReport};
use crate::model::UNet;
use crate::optim::AdamW;
use crate::{plot, visualise, Error, Result};

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

/// A U-Net, its optimiser, its data and its run folder, trained epoch by epoch.
pub struct Trainer {
    run: RunConfig,
    schedule: RunSchedule,
    data: TrainingData,
    model: UNet,
    opt: AdamW,
    progress: Progress,
    invocation: Invocation,
    /// This trainer's place in a data-parallel job, if any.
    parallel: Option<DataParallel>,
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
        let data = DataInfo::of(splits.train());
        let normalisation = Normalisation::measure(splits.train(), 256)?;
        let model = cfg.model_config(data.channels, data.num_classes);
        let run = RunConfig {
            train: cfg,
            model,
            data,
            normalisation,
        };
        let invocation = Invocation::new(out, options);
        invocation.start(&run)?;
        Trainer::assemble(run, splits, device, invocation, Progress::default())
    }

    /// Continues the run in `dir` from its last completed epoch. The options come from
    /// `DIR/config.json`; the data order and augmentation of the remaining epochs depend
    /// only on the seed and the epoch, so the result equals an uninterrupted run.
    pub fn resume(dir: &Path, device: &Device, options: RunOptions) -> Result<Self> {
        let run = RunConfig::read(dir)?;
        let (state, tensors, ckpt) = checkpoint::load_state(dir)?;
        let spec: DataSpec = run.train.dataset.parse()?;
        let splits = Splits::open(&spec, run.train.num_classes)?;
        if splits.train().num_classes() != run.model.num_classes {
            return Err(Error::ClassMismatch {
                data: splits.train().num_classes(),
                model: run.model.num_classes,
            });
        }
        let steps = state.steps;
        let invocation = Invocation::new(Some(dir), options);
        let mut t = Trainer::assemble(run, splits, device, invocation, Progress::restored(state))?;
        let (adam, weights): (HashMap<_, _>, HashMap<_, _>) = tensors
            .into_iter()
            .partition(|(k, _)| k.starts_with("adam."));
        t.model.set_tensors(&weights, &ckpt)?;
        t.opt.load_state(&adam, steps, &ckpt)?;
        info!(
            "resuming {} at epoch {}/{}",
            dir.display(),
            t.progress.epoch(),
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
        let invocation = Invocation::new(out, self.invocation.options().clone());
        invocation.start(&run)?;
        let device = self.model.device().clone();
        let splits = self.data.splits().clone();
        let progress = self.progress.continued();
        let mut t = Trainer::assemble(run, splits, &device, invocation, progress)?;
        let origin = Path::new("<in-memory fork>");
        t.model.set_tensors(&self.model.tensors()?, origin)?;
        t.opt
            .load_state(&self.opt.state_tensors(), self.opt.steps(), origin)?;
        t.save()?;
        Ok(t)
    }

    fn assemble(
        run: RunConfig,
        splits: Splits,
        device: &Device,
        invocation: Invocation,
        progress: Progress,
    ) -> Result<Self> {
        let model = UNet::new(
            &run.model,
            run.train.seed,
            device,
            invocation.options().layers,
        )?;
        crate::eval::check_compatible(&model, splits.train())?;
        let opt = AdamW::new(model.trainable_vars(), run.train.adamw)?;
        let data = TrainingData::new(splits, &run, device)?;
        let schedule = RunSchedule::new(&run.train, data.steps_per_epoch());
        Ok(Trainer {
            run,
            schedule,
            data,
            model,
            opt,
            progress,
            invocation,
            parallel: None,
        })
    }

    /// This trainer as one rank of a data-parallel job: rank 0's weights on every rank,
    /// each global batch (`batch_size` images) split over the ranks, gradients averaged
    /// over them, the Lovász-Softmax per batch taken over the global batch. Only rank 0
    /// writes the run folder, logs epochs and validates; batch norm keeps per-rank
    /// statistics. Every rank must build its trainer the same way (config, data, resume).
    pub fn data_parallel(mut self, parallel: DataParallel) -> Result<Self> {
        parallel.check_batch(self.run.train.batch_size)?;
        if self.run.train.sync_bn {
            self.model.synchronise_batch_norm(parallel.shared_group())?;
        }
        parallel.broadcast(&self.model.trainable_vars())?;
        if !parallel.is_lead() {
            self.invocation.without_output();
        }
        self.parallel = Some(parallel);
        Ok(self)
    }

    /// Whether this trainer logs and validates: always, but for ranks above 0 of a
    /// data-parallel job.
    fn is_lead(&self) -> bool {
        self.parallel.as_ref().is_none_or(DataParallel::is_lead)
    }

    /// The run's configuration.
    pub fn config(&self) -> &RunConfig {
        &self.run
    }

    /// The run's schedule: the loss of each epoch and the learning rate of each step.
    pub fn schedule(&self) -> &RunSchedule {
        &self.schedule
    }

    /// The network being trained.
    pub fn model(&self) -> &UNet {
        &self.model
    }

    /// Epochs completed.
    pub fn epoch(&self) -> usize {
        self.progress.epoch()
    }

    /// One record per completed epoch.
    pub fn history(&self) -> &[EpochRecord] {
        self.progress.history()
    }

    /// The run folder, if any.
    pub fn output(&self) -> Option<&Path> {
        self.invocation.out()
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
        if self.run.train.sync_bn && self.parallel.is_none() {
            return Err(Error::Usage(
                "this run synchronises batch norm over the ranks of a data-parallel job (sync_bn): train it with --ranks N or under mpirun".into(),
            ));
        }
        let target = epoch.min(self.run.train.epochs);
        if self.parallel.is_none() {
            // One process, one rank: on the CPU, the epochs on a worker of the pool the
            // layers use.
            let device = self.model.device().clone();
            return crate::device::on_compute_pool(&device, || self.epochs_until(target));
        }
        self.epochs_until(target)
    }

    /// [`Self::run_until`] after its checks, `target` capped by the run's epochs.
    fn epochs_until(&mut self, target: usize) -> Result<Option<Outcome>> {
        while self.progress.epoch() < target {
            let done = self.progress.epochs_this_run();
            if self
                .invocation
                .options()
                .stop_after_epochs
                .is_some_and(|n| done >= n)
            {
                info!("stopping after {done} epoch(s) as asked");
                let epoch = self.progress.epoch();
                return Ok(Some(Outcome::Stopped { epoch }));
            }
            if !self.train_epoch()? {
                let epoch = self.progress.epoch();
                return Ok(Some(Outcome::Interrupted { epoch }));
            }
        }
        Ok(None)
    }

    /// One epoch; `false` if a stop option interrupted it (nothing saved).
    fn train_epoch(&mut self) -> Result<bool> {
        let e = self.progress.epoch();
        let epoch_loss = self.schedule.loss(e);
        let phase = epoch_loss.phase();
        let bar = self.progress_bar(phase);
        let stop_after_steps = self.invocation.options().stop_after_steps;
        let start = Instant::now();
        let (mut loss_sum, mut ce_sum, mut lov_sum, mut steps) = (0f64, 0f64, 0f64, 0usize);
        let mut lr = self.schedule.lr_at(self.opt.steps());
        for batch in self.data.epoch(e) {
            if stop_after_steps.is_some_and(|n| self.progress.steps_this_run() >= n) {
                bar.abandon();
                info!("interrupted in epoch {} as asked", e + 1);
                return Ok(false);
            }
            let (images, masks) = batch.map_err(batch_error)?;
            let (images, masks) = match &self.parallel {
                Some(p) => p.shard(&images, &masks)?,
                None => (images, masks),
            };
            let logits = self.model.forward_t(&images, true)?;
            let batch = epoch_loss.of_batch(&logits, &masks, self.parallel.as_ref())?;
            lr = self.schedule.lr_at(self.opt.steps());
            let mut grads = batch.backward.backward()?;
            if let Some(p) = &self.parallel {
                p.average_gradients(&mut grads, &self.model.trainable_vars())?;
            }
            self.opt.step(&grads, lr)?;
            let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
            loss_sum += scalar(&batch.loss)?;
            ce_sum += scalar(&batch.ce)?;
            if let Some(l) = &batch.lovasz {
                lov_sum += scalar(l)?;
            }
            steps += 1;
            self.progress.step();
            bar.inc(1);
            bar.set_message(format!("loss {:.4}", loss_sum / steps as f64));
        }
        bar.finish_and_clear();
        let train_seconds = start.elapsed().as_secs_f64();
        let eval_start = Instant::now();
        let options = self.invocation.options();
        let cm = if self.is_lead() && self.schedule.validates(e, options.val_every) {
            let val = self.data.splits().val();
            let norm = &self.run.normalisation;
            Some(confusion(&self.model, val, norm, options.eval_batch_size)?)
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
        if self.is_lead() {
            record.log(self.run.train.epochs);
        }
        self.progress.end_epoch(record);
        self.save()?;
        Ok(true)
    }

    /// The progress bar of the current epoch (hidden unless `options.progress`).
    fn progress_bar(&self, phase: Phase) -> ProgressBar {
        if !self.invocation.options().progress || !self.is_lead() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(self.schedule.steps_per_epoch());
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(format!(
            "epoch {}/{} {}",
            self.progress.epoch() + 1,
            self.run.train.epochs,
            phase.name()
        ));
        bar
    }

    /// With a run folder: writes the checkpoint, `train_state.json`,
    /// `model.safetensors`, `metrics.csv` and `curves.png` for the current epoch.
    fn save(&self) -> Result<()> {
        let Some(dir) = self.invocation.out() else {
            return Ok(());
        };
        let train = &self.run.train;
        let state = self.progress.state(self.opt.steps(), train.seed);
        checkpoint::save_state(dir, &state, self.model.tensors()?, self.opt.state_tensors())?;
        self.model.save(&dir.join(MODEL_FILE))?;
        let history = self.progress.history();
        write_bytes(
            &dir.join(METRICS_FILE),
            metrics_csv(history, &self.run.data.class_names).as_bytes(),
        )?;
        plot::curves(
            &dir.join(CURVES_FILE),
            history,
            self.schedule.switch_epoch(),
            &format!(
                "{} on {}, seed {}",
                train.schedule.name(),
                train.dataset,
                train.seed
            ),
        )?;
        Ok(())
    }

    /// Evaluates the final model on the validation and test splits and writes
    /// `summary.json` and `predictions.png`.
    pub fn finish(&mut self) -> Result<Summary> {
        let options = self.invocation.options();
        let report = |split: &str, ds: &dyn Dataset| -> Result<EvalReport> {
            let norm = &self.run.normalisation;
            let metrics = evaluate(&self.model, ds, norm, options.eval_batch_size)?;
            EvalReport::of(&metrics, &self.run.data.class_names, split, ds.len())
        };
        let splits = self.data.splits();
        let summary = Summary {
            config: self.run.clone(),
            epochs: self.progress.epoch(),
            parameters: self.model.num_parameters(),
            device: format!(
                "{}, {} layers",
                crate::device::device_name(self.model.device()),
                self.model.layers()
            ),
            train_seconds: self.progress.train_seconds(),
            step_seconds: step_times(self.progress.history()),
            best_val_miou: self.progress.best_val_miou(),
            val: report("val", splits.val())?,
            test: report("test", splits.test())?,
        };
        if self.is_lead() {
            summary.log();
        }
        if let Some(dir) = self.invocation.out() {
            write_json(&dir.join(SUMMARY_FILE), &summary)?;
            let val = splits.val();
            let indices = visualise::spread(val.len(), options.prediction_images.min(val.len()));
            visualise::prediction_grid(
                &self.model,
                val,
                &indices,
                &self.run.normalisation,
                &self.run.data,
                &dir.join(PREDICTIONS_FILE),
            )?;
        }
        Ok(summary)
    }
}
