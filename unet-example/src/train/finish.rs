//! The end of a run: [`Trainer::finish`] evaluates the final model on the validation
//! and test splits and writes `summary.json` ([`Summary`]) and `predictions.png`.

use std::sync::Arc;

use datasets::Dataset;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::record::{step_times, StepTime};
use super::run_config::RunConfig;
use super::trainer::Trainer;
use crate::atomic_file::write_json;
use crate::checkpoint::{PREDICTIONS_FILE, SUMMARY_FILE};
use crate::eval::{evaluate, percent, EvalReport};
use crate::visualise::{self, spread};
use crate::Result;

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

impl Trainer {
    /// Evaluates the final model on the validation and test splits and writes
    /// `summary.json` and `predictions.png`.
    pub fn finish(&mut self) -> Result<Summary> {
        let report = |split: &str, ds: &Arc<dyn Dataset>| -> Result<EvalReport> {
            let metrics = evaluate(
                &self.model,
                &**ds,
                &self.run.normalisation,
                self.options.eval_batch_size,
            )?;
            EvalReport::of(&metrics, &self.run.data.class_names, split, ds.len())
        };
        let val = report("val", &self.splits.val)?;
        let test = report("test", &self.splits.test)?;
        let best_val_miou = self
            .history
            .iter()
            .filter_map(|r| r.val_miou.map(|m| (m, r.epoch)))
            .fold(None, |best: Option<(f64, usize)>, x| match best {
                Some(b) if b.0 >= x.0 => Some(b),
                _ => Some(x),
            });
        let summary = Summary {
            config: self.run.clone(),
            epochs: self.epoch,
            parameters: self.model.num_parameters(),
            device: format!(
                "{}, {} layers",
                crate::device::device_name(self.model.device()),
                self.model.layers()
            ),
            train_seconds: self.train_seconds,
            step_seconds: step_times(&self.history),
            best_val_miou,
            val,
            test,
        };
        let fine = summary.test.fine_grained.as_ref();
        info!(
            "done: {} epochs, test mIoU {}% (per image {}%, per class {}%), val mIoU {}%",
            self.epoch,
            percent(summary.test.mean_iou),
            percent(fine.and_then(|f| f.miou_image)),
            percent(fine.and_then(|f| f.miou_class)),
            percent(summary.val.mean_iou)
        );
        if let Some(dir) = &self.out {
            write_json(&dir.join(SUMMARY_FILE), &summary)?;
            let k = self.options.prediction_images.min(self.splits.val.len());
            let indices = spread(self.splits.val.len(), k);
            visualise::prediction_grid(
                &self.model,
                &*self.splits.val,
                &indices,
                &self.run.normalisation,
                &self.run.data,
                &dir.join(PREDICTIONS_FILE),
            )?;
        }
        Ok(summary)
    }
}
