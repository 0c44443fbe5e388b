//! [`Batcher`]: shuffled, transformed mini-batches as candle tensors, optionally
//! prepared on a background thread.

use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle::{Device, Tensor};
use rand::seq::SliceRandom;

use crate::rng::rng_for;
use crate::{ClassPresence, Dataset, Error, Result, Transform};

/// Stream tags, so the shuffle and the augmentation draw from unrelated generators.
const SHUFFLE_STREAM: u64 = 1;
const AUGMENT_STREAM: u64 = 2;

/// Iterates a [`Dataset`] in mini-batches of candle tensors.
///
/// Each epoch yields `(images, masks)`: images f32 `[B, C, H, W]` and masks u32
/// `[B, H, W]` on the chosen device. With [`Batcher::shuffle`] the sample order of epoch
/// `e` depends only on `(seed, e)`, and sample `i`'s augmentation in epoch `e` only on
/// `(seed, e, i)`: a run is reproducible, and resumable at an epoch boundary, whatever
/// the batch size or prefetching. All samples of a batch must have one size: give
/// variable-size data sets (VOC, your folders) a [`Transform`] with a crop.
///
/// ```
/// use std::sync::Arc;
/// use datasets::{Batcher, ShapesConfig, ShapesDataset, Transform, TransformConfig};
/// let ds = ShapesDataset::new(ShapesConfig { len: 10, ..Default::default() });
/// let flip = Transform::new(TransformConfig { hflip: 0.5, ..Default::default() })?;
/// let batcher = Batcher::new(Arc::new(ds))
///     .batch_size(4)
///     .shuffle(42)
///     .drop_last(false)
///     .transform(flip)
///     .device(&candle::Device::Cpu)
///     .prefetch(true);
/// assert_eq!(batcher.num_batches(), 3);
/// for batch in batcher.epoch(0) {
///     let (images, masks) = batch?;
///     assert_eq!(images.dims()[1..], [3, 64, 64]);
///     assert_eq!(masks.dtype(), candle::DType::U32);
/// }
/// # Ok::<(), datasets::Error>(())
/// ```
#[derive(Clone)]
pub struct Batcher {
    dataset: Arc<dyn Dataset>,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    drop_last: bool,
    transform: Option<Transform>,
    device: Device,
    prefetch: bool,
    /// With equibatch sampling: the classes of each sample.
    equibatch: Option<Arc<ClassPresence>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("len", &self.dataset.len())
            .field("batch_size", &self.batch_size)
            .field("shuffle", &self.shuffle)
            .field("seed", &self.seed)
            .field("drop_last", &self.drop_last)
            .field("transform", &self.transform)
            .field("device", &self.device)
            .field("prefetch", &self.prefetch)
            .field("equibatch", &self.equibatch.is_some())
            .finish()
    }
}

impl Batcher {
    /// Batches of 8 from `dataset`, in order, keeping the last partial batch, no
    /// transform, on the CPU, without prefetching.
    pub fn new(dataset: Arc<dyn Dataset>) -> Self {
        Batcher {
            dataset,
            batch_size: 8,
            shuffle: false,
            seed: 0,
            drop_last: false,
            transform: None,
            device: Device::Cpu,
            prefetch: false,
            equibatch: None,
        }
    }

    /// Samples per batch `B` (at least 1; 0 makes [`Batcher::epoch`] yield an error).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Shuffles every epoch, with an order determined by `(seed, epoch)`; also seeds
    /// the augmentation (see [`Batcher::seed`]).
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.shuffle = true;
        self.seed = seed;
        self
    }

    /// Seeds the augmentation without enabling shuffling. Default 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Drops the last batch of an epoch when it has fewer than `B` samples. Default false.
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Applies `transform` to every sample, with a generator seeded by
    /// `(seed, epoch, sample index)`.
    pub fn transform(mut self, transform: Transform) -> Self {
        self.transform = Some(transform);
        self
    }

    /// Where the batch tensors are created. Default CPU.
    pub fn device(mut self, device: &Device) -> Self {
        self.device = device.clone();
        self
    }

    /// Loads and transforms the next batch on a background thread while the current
    /// one is in use. Default false.
    pub fn prefetch(mut self, prefetch: bool) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Equibatch sampling ([`crate::equibatch`]): each epoch's order, drawn from
    /// `(seed, epoch)` like a shuffle, puts every class in each batch as far as the data
    /// allows. Reads every sample's mask once, here, to know its classes (a training
    /// crop may leave some of them out of a batch); [`Batcher::equibatch_with`] takes
    /// classes already known.
    pub fn equibatch(self, seed: u64) -> Result<Self> {
        let k = self.dataset.num_classes();
        let classes = (0..self.dataset.len())
            .map(|i| Ok(ClassPresence::of_mask(&self.dataset.get(i)?.mask, k)))
            .collect::<Result<Vec<_>>>()?;
        self.equibatch_with(ClassPresence::new(classes, k), seed)
    }

    /// [`Batcher::equibatch`] with the classes of every sample given; fails unless there
    /// is one entry per sample of the data set.
    pub fn equibatch_with(mut self, presence: ClassPresence, seed: u64) -> Result<Self> {
        if presence.len() != self.dataset.len() {
            return Err(Error::Config(format!(
                "equibatch: classes of {} samples for a data set of {}",
                presence.len(),
                self.dataset.len()
            )));
        }
        self.equibatch = Some(Arc::new(presence));
        self.shuffle = true;
        self.seed = seed;
        Ok(self)
    }

    /// The data set being batched.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    /// The number of batches in an epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.batch_size.max(1));
        if self.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample indices of epoch `epoch`, in the order they are batched.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        if let Some(presence) = &self.equibatch {
            let mut rng = rng_for(self.seed, &[SHUFFLE_STREAM, epoch as u64]);
            return presence.order(self.batch_size, &mut rng);
        }
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.shuffle {
            order.shuffle(&mut rng_for(self.seed, &[SHUFFLE_STREAM, epoch as u64]));
        }
        order
    }

    /// The batches of epoch `epoch` (counting from 0): an iterator of
    /// `Result<(images f32 [B, C, H, W], masks u32 [B, H, W])>`.
    pub fn epoch(&self, epoch: usize) -> Epoch {
        if self.batch_size == 0 {
            return Epoch {
                device: self.device.clone(),
                source: Source::Failed(Some(Error::Config(
                    "batch_size must be at least 1".to_string(),
                ))),
            };
        }
        let order = self.order(epoch);
        let mut chunks: Vec<Vec<usize>> = order
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        if self.drop_last && chunks.last().is_some_and(|c| c.len() < self.batch_size) {
            chunks.pop();
        }
        let job = Job {
            dataset: Arc::clone(&self.dataset),
            transform: self.transform.clone(),
            seed: self.seed,
            epoch: epoch as u64,
        };
        let source = if self.prefetch {
            let total = chunks.len();
            // Capacity 1: one finished batch waits while the worker prepares the next.
            let (tx, rx) = mpsc::sync_channel(1);
            let handle = std::thread::spawn(move || {
                for chunk in chunks {
                    let batch = job.prepare(&chunk);
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            });
            Source::Prefetch {
                rx,
                handle: Some(handle),
                remaining: total,
            }
        } else {
            Source::Inline {
                job,
                chunks: chunks.into_iter(),
            }
        };
        Epoch {
            device: self.device.clone(),
            source,
        }
    }
}

/// Batch preparation state, shared with the prefetch thread.
struct Job {
    dataset: Arc<dyn Dataset>,
    transform: Option<Transform>,
    seed: u64,
    epoch: u64,
}

/// A batch on the host: images f32 `[B, C, H, W]`, masks u32 `[B, H, W]` flattened.
struct HostBatch {
    images: Vec<f32>,
    masks: Vec<u32>,
    shape: (usize, usize, usize, usize),
}

impl Job {
    fn prepare(&self, indices: &[usize]) -> Result<HostBatch> {
        let mut images = Vec::new();
        let mut masks = Vec::new();
        let mut shape: Option<(usize, usize, usize, usize)> = None;
        let mut first = 0;
        for &i in indices {
            let mut sample = self.dataset.get(i)?;
            if let Some(t) = &self.transform {
                let mut rng = rng_for(self.seed, &[AUGMENT_STREAM, self.epoch, i as u64]);
                sample = t.apply(sample, &mut rng)?;
            }
            sample.check()?;
            let dims = (sample.channels, sample.height, sample.width);
            match shape {
                None => {
                    shape = Some((indices.len(), dims.0, dims.1, dims.2));
                    first = i;
                    images.reserve(indices.len() * sample.image.len());
                    masks.reserve(indices.len() * sample.mask.len());
                }
                Some((_, c, h, w)) if (c, h, w) != dims => {
                    return Err(Error::Batch(format!(
                        "samples of one batch differ in shape: sample {first} is [{c}, {h}, {w}] but sample {i} is [{}, {}, {}]; add a Transform with a crop",
                        dims.0, dims.1, dims.2
                    )));
                }
                Some(_) => {}
            }
            images.extend_from_slice(&sample.image);
            masks.extend_from_slice(&sample.mask);
        }
        let shape = shape.ok_or_else(|| Error::Batch("empty batch".to_string()))?;
        Ok(HostBatch {
            images,
            masks,
            shape,
        })
    }
}

enum Source {
    Inline {
        job: Job,
        chunks: std::vec::IntoIter<Vec<usize>>,
    },
    Prefetch {
        rx: Receiver<Result<HostBatch>>,
        handle: Option<JoinHandle<()>>,
        remaining: usize,
    },
    Failed(Option<Error>),
}

/// The batches of one epoch, from [`Batcher::epoch`]. Dropping it early stops the
/// prefetch thread after at most one more batch.
pub struct Epoch {
    device: Device,
    source: Source,
}

impl Epoch {
    fn to_tensors(&self, batch: HostBatch) -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = batch.shape;
        let images = Tensor::from_vec(batch.images, (b, c, h, w), &self.device)?;
        let masks = Tensor::from_vec(batch.masks, (b, h, w), &self.device)?;
        Ok((images, masks))
    }
}

impl Iterator for Epoch {
    type Item = Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = match &mut self.source {
            Source::Failed(err) => return err.take().map(Err),
            Source::Inline { job, chunks } => {
                let chunk = chunks.next()?;
                let batch = job.prepare(&chunk);
                if batch.is_err() {
                    // Stop at the first error, as the prefetch thread does.
                    *chunks = Vec::new().into_iter();
                }
                batch
            }
            Source::Prefetch {
                rx,
                handle,
                remaining,
            } => {
                if *remaining == 0 {
                    return None;
                }
                match rx.recv() {
                    Ok(batch) => {
                        *remaining = if batch.is_err() { 0 } else { *remaining - 1 };
                        batch
                    }
                    Err(_) => {
                        // The worker hung up before sending every batch: it panicked.
                        *remaining = 0;
                        let reason = match handle.take().map(JoinHandle::join) {
                            Some(Err(panic)) => panic
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "panicked".to_string()),
                            _ => "stopped early".to_string(),
                        };
                        Err(Error::Worker(reason))
                    }
                }
            }
        };
        Some(batch.and_then(|b| self.to_tensors(b)))
    }
}
