//! `summary.json` ([`Summary`]): a finished run's options, time, best validation and the
//! final model's evaluation on the validation and test splits.

use serde::{Deserialize, Serialize};
use tracing::info;

use super::config::RunConfig;
use super::record::StepTime;
use crate::eval::{percent, EvalReport};

/// `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The run's options.
    pub config: RunConfig,
    /// Epochs completed.
    pub epochs: usize,
    /// Trainable parameters.
    pub parameters: usize,
    /// The device and layers used by the last part of the run (e.g. `cpu (2 threads),
    /// fused layers`).
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

impl Summary {
    /// Logs the run's end: epochs, test mIoU (also per image and per class) and val mIoU.
    pub(super) fn log(&self) {
        let fine = self.test.fine_grained.as_ref();
        info!(
            "done: {} epochs, test mIoU {}% (per image {}%, per class {}%), val mIoU {}%",
            self.epochs,
            percent(self.test.mean_iou),
            percent(fine.and_then(|f| f.miou_image)),
            percent(fine.and_then(|f| f.miou_class)),
            percent(self.val.mean_iou)
        );
    }
}
