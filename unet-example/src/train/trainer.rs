//! The [`Trainer`]: a U-Net, its optimiser, its data and its run folder. This file
//! builds one (a new run, a resumed one, or a fork of another), gives access to its
//! parts, and saves its state after an epoch; the epoch loop is in `epoch.rs` and the
//! final evaluation in `finish.rs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle::Device;
use datasets::{Batcher, ClassPresence, Dataset, Split, Transform, TransformConfig};
use tracing::info;

use super::record::{metrics_csv, EpochRecord};
use super::run_config::{RunConfig, RunOptions};
use super::schedule::{Sampling, Schedule, TrainConfig};
use crate::atomic_file::{write_bytes, write_json};
use crate::checkpoint::{
    self, checkpoint_name, TrainState, CONFIG_FILE, CURVES_FILE, METRICS_FILE, MODEL_FILE,
    PREDICTIONS_FILE, STATE_FILE, SUMMARY_FILE,
};
use crate::data::{open_split, DataInfo, DataSpec, Normalisation};
use crate::model::UNet;
use crate::optim::AdamW;
use crate::{plot, Error, Result};

#[derive(Clone)]
pub(super) struct Splits {
    pub(super) train: Arc<dyn Dataset>,
    pub(super) val: Arc<dyn Dataset>,
    pub(super) test: Arc<dyn Dataset>,
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
    pub(super) run: RunConfig,
    pub(super) splits: Splits,
    pub(super) batcher: Batcher,
    pub(super) model: UNet,
    pub(super) opt: AdamW,
    pub(super) epoch: usize,
    pub(super) history: Vec<EpochRecord>,
    pub(super) train_seconds: f64,
    pub(super) out: Option<PathBuf>,
    pub(super) options: RunOptions,
    pub(super) steps_this_run: usize,
    pub(super) epochs_this_run: usize,
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
        let model = UNet::new(&run.model, cfg.seed, device, options.layers)?;
        crate::eval::check_compatible(&model, &*splits.train)?;
        let opt = AdamW::new(model.trainable_vars(), cfg.adamw)?;
        let first = splits.train.get(0)?;
        // One pass over the training images serves the crop check and equibatch.
        let scan = (cfg.crop.is_some() || cfg.sampling == Sampling::Equibatch)
            .then(|| TrainingScan::of(&*splits.train))
            .transpose()?;
        if let (Some(crop), Some(scan)) = (cfg.crop, &scan) {
            scan.check_crop_fits(crop)?;
        }
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
            .shuffle(cfg.seed);
        let batcher = match (cfg.sampling, scan) {
            (Sampling::Equibatch, Some(scan)) => batcher.equibatch_with(scan.classes, cfg.seed)?,
            _ => batcher,
        };
        let batcher = batcher
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

    /// Writes the checkpoint, `train_state.json`, `model.safetensors`, `metrics.csv`
    /// and `curves.png` for the current epoch.
    pub(super) fn save(&self) -> Result<()> {
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
}

/// Creates the run folder `dir`; one that already holds a run is an error unless
/// `overwrite`, which deletes the run's files.
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

/// What one pass over the training images finds: the largest height and width, and the
/// classes of each image.
struct TrainingScan {
    max_size: (usize, usize),
    classes: ClassPresence,
}

impl TrainingScan {
    fn of(train: &dyn Dataset) -> Result<Self> {
        let k = train.num_classes();
        let (mut max_h, mut max_w) = (0, 0);
        let mut classes = Vec::with_capacity(train.len());
        for i in 0..train.len() {
            let s = train.get(i)?;
            (max_h, max_w) = (max_h.max(s.height), max_w.max(s.width));
            classes.push(ClassPresence::of_mask(&s.mask, k));
        }
        Ok(Self {
            max_size: (max_h, max_w),
            classes: ClassPresence::new(classes, k),
        })
    }

    /// Fails when the training crop `(h, w)` is taller or wider than every training
    /// image: such a crop would be mostly padding (the transform pads smaller images),
    /// a mistake rather than a choice. A crop larger than only some images (as for
    /// Pascal VOC) is allowed; those images are padded.
    fn check_crop_fits(&self, (h, w): (usize, usize)) -> Result<()> {
        let (max_h, max_w) = self.max_size;
        if h > max_h || w > max_w {
            return Err(Error::Usage(format!(
                "--crop {h}x{w} is larger than every training image (at most {max_h}x{max_w}): pass a crop that fits the data"
            )));
        }
        Ok(())
    }
}
