//! Segmentation data sets for [candle](https://github.com/huggingface/candle): an
//! embedded real data set, a synthetic generator, loaders for your own images, seeded
//! transforms and a batch iterator.
//!
//! | source | type | classes | channels |
//! |---|---|---|---|
//! | brain MRI slices with an anatomical atlas, compiled in (no download) | [`BrainSlices`] | 15 | 1 |
//! | random shapes, generated from a seed | [`ShapesDataset`] | any (default 6) | 3 or 1 |
//! | an `images/` + `masks/` folder | [`FolderDataset`] | yours | 3 or 1 |
//! | Pascal VOC 2012 | [`VocDataset`] | 21 | 3 |
//!
//! Every source implements [`Dataset`]: `get(i)` gives a [`Sample`] with an image f32
//! `[C, H, W]` and a mask u32 `[H, W]` whose values are class indices or [`VOID`]
//! (255, ignored). A [`Transform`] augments samples reproducibly, and a [`Batcher`]
//! turns a data set into epochs of `(images [B, C, H, W] f32, masks [B, H, W] u32)`
//! candle tensors.
//!
//! ```
//! use std::sync::Arc;
//! use datasets::{BrainSlices, Batcher, Dataset, Split, Transform, TransformConfig};
//!
//! let train = BrainSlices::load(Split::Train)?;
//! assert_eq!(train.class_names()[11], "pallidum");
//! let augment = Transform::new(TransformConfig {
//!     crop: Some((96, 96)),
//!     hflip: 0.5,
//!     scale: (0.9, 1.1),
//!     mean: vec![0.2],
//!     std: vec![0.25],
//!     ..Default::default()
//! })?;
//! let batcher = Batcher::new(Arc::new(train))
//!     .batch_size(16)
//!     .shuffle(0)
//!     .drop_last(true)
//!     .transform(augment)
//!     .device(&candle::Device::Cpu);
//! assert_eq!(batcher.num_batches(), 5); // 86 slices, the last 6 dropped
//! for batch in batcher.epoch(0).take(1) {
//!     let (images, masks) = batch?;
//!     assert_eq!(images.dims(), [16, 1, 96, 96]);
//!     assert_eq!(masks.dims(), [16, 96, 96]);
//! }
//! # Ok::<(), datasets::Error>(())
//! ```
//!
//! Errors are [`Error`] values that name the offending file; no loader panics on bad
//! data.

pub mod batcher;
pub mod brain;
mod dataset;
mod decode;
pub mod equibatch;
pub mod error;
pub mod folder;
pub mod nifti;
pub mod palette;
mod rng;
mod sample;
pub mod shapes;
pub mod transform;
pub mod voc;

pub use batcher::{Batcher, Epoch};
pub use brain::BrainSlices;
pub use dataset::{class_counts, Dataset, Split};
pub use equibatch::ClassPresence;
pub use error::{Error, Result};
pub use folder::FolderDataset;
pub use palette::{mask_to_rgb, voc_colour, voc_palette, VOC_CLASS_NAMES, VOID_COLOUR};
pub use sample::Sample;
pub use shapes::{ShapesConfig, ShapesDataset};
pub use transform::{Transform, TransformConfig};
pub use voc::VocDataset;

/// The mask value of void pixels (object borders, padding, unlabelled): ignored by the
/// losses and metrics, never a class.
pub const VOID: u32 = 255;
