//! How far a run has come ([`Progress`]): the epochs completed with their records and
//! time over all parts of the run, and the steps and epochs of this invocation (which
//! the stop options count).

use super::checkpoint::{checkpoint_name, TrainState};
use super::record::EpochRecord;

/// How far a run has come.
#[derive(Debug, Clone, Default)]
pub(super) struct Progress {
    epoch: usize,
    history: Vec<EpochRecord>,
    train_seconds: f64,
    steps_this_run: usize,
    epochs_this_run: usize,
}

impl Progress {
    /// The progress saved in `state`, with nothing done yet in this invocation.
    pub(super) fn restored(state: TrainState) -> Self {
        Progress {
            epoch: state.epoch,
            history: state.history,
            train_seconds: state.train_seconds,
            ..Default::default()
        }
    }

    /// The same run's progress for another invocation: nothing done in it yet.
    pub(super) fn continued(&self) -> Self {
        Progress {
            epoch: self.epoch,
            history: self.history.clone(),
            train_seconds: self.train_seconds,
            ..Default::default()
        }
    }

    /// Epochs completed.
    pub(super) fn epoch(&self) -> usize {
        self.epoch
    }

    /// One record per completed epoch.
    pub(super) fn history(&self) -> &[EpochRecord] {
        &self.history
    }

    /// Seconds of training and validation over all parts of the run.
    pub(super) fn train_seconds(&self) -> f64 {
        self.train_seconds
    }

    /// Optimiser steps taken by this invocation.
    pub(super) fn steps_this_run(&self) -> usize {
        self.steps_this_run
    }

    /// Epochs completed by this invocation.
    pub(super) fn epochs_this_run(&self) -> usize {
        self.epochs_this_run
    }

    /// Counts an optimiser step.
    pub(super) fn step(&mut self) {
        self.steps_this_run += 1;
    }

    /// Adds a completed epoch.
    pub(super) fn end_epoch(&mut self, record: EpochRecord) {
        self.train_seconds += record.train_seconds + record.eval_seconds;
        self.history.push(record);
        self.epoch += 1;
        self.epochs_this_run += 1;
    }

    /// The best validation mIoU and its epoch (the first of equals).
    pub(super) fn best_val_miou(&self) -> Option<(f64, usize)> {
        self.history
            .iter()
            .filter_map(|r| r.val_miou.map(|m| (m, r.epoch)))
            .fold(None, |best: Option<(f64, usize)>, x| match best {
                Some(b) if b.0 >= x.0 => Some(b),
                _ => Some(x),
            })
    }

    /// The `train_state.json` of this progress, after `steps` optimiser steps of a run
    /// seeded with `seed`.
    pub(super) fn state(&self, steps: u64, seed: u64) -> TrainState {
        TrainState {
            epoch: self.epoch,
            steps,
            seed,
            checkpoint: checkpoint_name(self.epoch),
            history: self.history.clone(),
            train_seconds: self.train_seconds,
        }
    }
}
