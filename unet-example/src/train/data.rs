//! The data a run trains and evaluates on: the three [`Splits`] and the training
//! batches ([`TrainingData`]: equibatch or shuffled, augmented, normalised, on the
//! model's device), with the checks of the training crop against the images.

use std::sync::Arc;

use candle::Device;
use datasets::{Batcher, ClassPresence, Dataset, Epoch, Split, Transform, TransformConfig};

use super::config::{RunConfig, Sampling};
use crate::data::{open_split, DataSpec};
use crate::{Error, Result};

/// The training, validation and test splits of a data set.
#[derive(Clone)]
pub(super) struct Splits {
    train: Arc<dyn Dataset>,
    val: Arc<dyn Dataset>,
    test: Arc<dyn Dataset>,
}

impl Splits {
    /// Opens the three splits of `spec` (`num_classes`: see [`open_split`]).
    pub(super) fn open(spec: &DataSpec, num_classes: Option<usize>) -> Result<Self> {
        Ok(Splits {
            train: open_split(spec, Split::Train, num_classes)?,
            val: open_split(spec, Split::Val, num_classes)?,
            test: open_split(spec, Split::Test, num_classes)?,
        })
    }

    /// The training split.
    pub(super) fn train(&self) -> &dyn Dataset {
        &*self.train
    }

    /// The validation split.
    pub(super) fn val(&self) -> &dyn Dataset {
        &*self.val
    }

    /// The test split.
    pub(super) fn test(&self) -> &dyn Dataset {
        &*self.test
    }
}

/// The splits and the batches of the training split.
pub(super) struct TrainingData {
    splits: Splits,
    batcher: Batcher,
}

impl TrainingData {
    /// The batches of `splits`' training split under `run`'s options (batch size, crop,
    /// augmentation, normalisation, sampling, seed), delivered on `device`.
    pub(super) fn new(splits: Splits, run: &RunConfig, device: &Device) -> Result<Self> {
        let cfg = &run.train;
        let first = splits.train.get(0)?;
        // One pass over the training images serves the crop check and equibatch.
        let scan = (cfg.crop.is_some() || cfg.sampling == Sampling::Equibatch)
            .then(|| TrainingScan::of(splits.train()))
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
        Ok(TrainingData { splits, batcher })
    }

    /// The three splits.
    pub(super) fn splits(&self) -> &Splits {
        &self.splits
    }

    /// Batches per epoch.
    pub(super) fn steps_per_epoch(&self) -> usize {
        self.batcher.num_batches()
    }

    /// The batches of epoch `epoch` (from 0).
    pub(super) fn epoch(&self, epoch: usize) -> Epoch {
        self.batcher.epoch(epoch)
    }
}

/// A batching error as the user's error, with the fix for images that differ in size.
pub(super) fn batch_error(err: datasets::Error) -> Error {
    match err {
        datasets::Error::Batch(m) => Error::Usage(format!(
            "{m} (images of this data set differ in size: pass --crop HxW)"
        )),
        other => Error::Data(other),
    }
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
