//! Training: the loss schedule (cross-entropy first, then cross-entropy + λ·Lovász-Softmax
//! fine-tuning), an epoch loop with checkpoints after every epoch, resumption, and the
//! files a finished run leaves behind.
//!
//! - `config.rs`: [`TrainConfig`] (the options that define the results, and their
//!   validation) with [`Sampling`], [`RunConfig`] (`config.json`) and [`RunOptions`]
//!   (options of one invocation that do not change the results);
//! - `schedule.rs`: [`Schedule`], [`Phase`], [`LovaszClasses`] and [`RunSchedule`]: for
//!   each epoch its phase, its loss (the terms and their weights) and whether it ends
//!   with a validation, and for each optimiser step its learning rate;
//! - `trainer.rs`: the [`Trainer`]: a new, resumed or forked run, the epoch loop
//!   ([`Trainer::run`], [`Trainer::run_until`]) with the state saved after each epoch,
//!   [`Outcome`], and the final evaluation ([`Trainer::finish`]);
//! - `data.rs`: the trainer's splits and training batches, and the check of the crop
//!   against the training images;
//! - `progress.rs`: how far a run has come (epochs, history, time, and what this
//!   invocation did) and its `train_state.json`;
//! - `invocation.rs`: the run folder and options of one invocation, and the preparation
//!   of a folder for a new run;
//! - `record.rs`: [`EpochRecord`] (a line of the log and of `metrics.csv`), [`StepTime`],
//!   [`step_times`] and [`metrics_csv`];
//! - `summary.rs`: [`Summary`] (`summary.json`);
//! - `parallel.rs`: [`DataParallel`]: a rank's shard of each global batch, rank 0's
//!   weights broadcast, gradients averaged over the ranks in buckets;
//! - [`checkpoint`]: the run folder's files, the training state and its checkpoints,
//!   written so that a crash at any moment leaves a resumable run.

pub mod checkpoint;
mod config;
mod data;
mod invocation;
mod parallel;
mod progress;
mod record;
mod schedule;
mod summary;
mod trainer;

pub use config::{RunConfig, RunOptions, Sampling, TrainConfig};
pub use parallel::{DataParallel, BUCKET_VALUES};
pub use record::{metrics_csv, step_times, EpochRecord, StepTime};
pub use schedule::{LovaszClasses, Phase, RunSchedule, Schedule};
pub use summary::Summary;
pub use trainer::{Outcome, Trainer};
