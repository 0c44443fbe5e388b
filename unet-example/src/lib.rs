//! A U-Net in [candle](https://github.com/huggingface/candle) trained with cross-entropy
//! and then fine-tuned with cross-entropy + λ·Lovász-Softmax, the recipe of the paper's
//! FAQ ("optimize with cross-entropy first and fine-tune with the Lovász loss, or combine
//! the two"), on embedded brain MRI slices by default.
//!
//! The binary (`unet-example train | compare | eval | predict`) is a thin layer over this
//! library, so tests drive the same code:
//!
//! - [`model`]: the U-Net (depth, width, batch or group norm, transposed-conv up path):
//!   its configuration, its blocks, the seeded initialiser, and the two sets of
//!   [`Layers`](model::Layers) it runs on (the `fused-cpu-layers` crate's ops on the CPU,
//!   candle's own ops everywhere);
//! - [`optim`]: AdamW with exportable moments and the cosine schedule;
//! - [`train`]: the loss schedule and options, the trainer (new, resumed or forked
//!   runs), the epoch loop, the per-epoch records, the final summary, and the run
//!   folder's files ([`train::checkpoint`]: the training state and its checkpoints);
//! - [`compare`]: CE vs CE → CE+Lovász vs CE+Lovász on the test split, over seeds;
//! - [`eval`], [`visualise`], [`plot`]: metrics, prediction images and curves;
//! - [`atomic_file`]: writing files atomically (temporary name + rename), reading JSON;
//! - [`data`], [`device`]: data set and device choice;
//! - [`cli`]: the command line's arguments and its commands.
//!
//! ```no_run
//! use unet_example::train::{RunOptions, TrainConfig, Trainer};
//! let cfg = TrainConfig { dataset: "shapes:32:64".into(), epochs: 4, finetune_epochs: 2, ..Default::default() };
//! let mut trainer = Trainer::new(cfg, &candle::Device::Cpu, Some("runs/demo".as_ref()), RunOptions::default())?;
//! trainer.run()?;
//! # Ok::<(), unet_example::Error>(())
//! ```

pub mod atomic_file;
pub mod cli;
pub mod compare;
pub mod data;
pub mod device;
mod error;
pub mod eval;
pub mod model;
pub mod optim;
pub mod plot;
pub mod train;
pub mod visualise;

pub use error::{Error, Result};
