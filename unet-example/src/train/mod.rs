//! Training: the loss schedule (cross-entropy first, then cross-entropy + λ·Lovász-Softmax
//! fine-tuning), an epoch loop with checkpoints after every epoch, resumption, and the
//! files a finished run leaves behind.
//!
//! - `schedule.rs`: [`Schedule`], [`Phase`], [`LovaszClasses`] and [`TrainConfig`] (the
//!   training options, their validation, the loss of each epoch);
//! - `run_config.rs`: [`RunConfig`] (`config.json`) and [`RunOptions`] (options of one
//!   invocation that do not change the results);
//! - `record.rs`: [`EpochRecord`] (a line of `metrics.csv`), [`StepTime`],
//!   [`step_times`] and [`metrics_csv`];
//! - `trainer.rs`: the [`Trainer`]: a new, resumed or forked run, and the state saved
//!   after each epoch;
//! - `epoch.rs`: the epoch loop ([`Trainer::run`], [`Trainer::run_until`]), the
//!   learning rate of each step, and [`Outcome`];
//! - `finish.rs`: [`Trainer::finish`], the final evaluation, and [`Summary`]
//!   (`summary.json`).

mod epoch;
mod finish;
pub(crate) mod record;
mod run_config;
pub(crate) mod schedule;
mod trainer;

pub use epoch::Outcome;
pub use finish::Summary;
pub use record::{metrics_csv, step_times, EpochRecord, StepTime};
pub use run_config::{RunConfig, RunOptions};
pub use schedule::{LovaszClasses, Phase, Sampling, Schedule, TrainConfig};
pub use trainer::Trainer;
// `spread` lives with the prediction grids; `train::spread` keeps working.
pub use crate::visualise::spread;
