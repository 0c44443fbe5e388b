//! The records of a run's epochs: one [`EpochRecord`] per epoch (a line of the log, of
//! `metrics.csv` and of the history in `train_state.json`) and the mean step time per
//! phase computed from them.

use serde::{Deserialize, Serialize};
use tracing::info;

use super::schedule::Phase;
use crate::eval::percent;

/// One epoch's line of `metrics.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// The loss optimised.
    pub phase: Phase,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Mean training loss (the optimised total).
    pub loss: f64,
    /// Mean cross-entropy.
    pub ce: f64,
    /// Mean Lovász-Softmax (when part of the loss).
    pub lovasz: Option<f64>,
    /// Validation mIoU.
    pub val_miou: Option<f64>,
    /// Validation pixel accuracy.
    pub val_pixel_accuracy: Option<f64>,
    /// Validation IoU per class.
    pub val_iou: Vec<Option<f64>>,
    /// Optimiser steps in the epoch.
    pub steps: usize,
    /// Seconds spent on the training steps.
    pub train_seconds: f64,
    /// Seconds spent on validation.
    pub eval_seconds: f64,
}

impl EpochRecord {
    /// Logs the epoch's losses, validation mIoU and times (of `epochs` in the run).
    pub(super) fn log(&self, epochs: usize) {
        let n = self.steps.max(1) as f64;
        info!(
            "epoch {}/{} [{}] loss {:.4} (ce {:.4}{}){} | {:.1}s train ({:.3}s/step), {:.1}s val",
            self.epoch,
            epochs,
            self.phase.name(),
            self.loss,
            self.ce,
            self.lovasz
                .map_or(String::new(), |l| format!(", lovasz {l:.4}")),
            self.val_miou.map_or(String::new(), |m| format!(
                " val mIoU {}%",
                percent(Some(m))
            )),
            self.train_seconds,
            self.train_seconds / n,
            self.eval_seconds
        );
    }
}

/// Mean seconds per training step by loss phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTime {
    /// The phase.
    pub phase: Phase,
    /// Mean seconds per optimiser step (forward, loss, backward, update).
    pub seconds: f64,
    /// Steps measured.
    pub steps: usize,
}

/// Mean seconds per step for each phase present in `history`.
pub fn step_times(history: &[EpochRecord]) -> Vec<StepTime> {
    let mut out: Vec<StepTime> = Vec::new();
    for r in history {
        match out.iter_mut().find(|s| s.phase == r.phase) {
            Some(s) => {
                s.seconds = (s.seconds * s.steps as f64 + r.train_seconds)
                    / (s.steps + r.steps).max(1) as f64;
                s.steps += r.steps;
            }
            None => out.push(StepTime {
                phase: r.phase,
                seconds: r.train_seconds / r.steps.max(1) as f64,
                steps: r.steps,
            }),
        }
    }
    out
}

/// `metrics.csv`: one line per epoch, IoU columns named after the classes.
pub fn metrics_csv(history: &[EpochRecord], class_names: &[String]) -> String {
    let opt = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.6}"));
    let mut s = String::from(
        "epoch,phase,lr,loss,ce,lovasz,val_miou,val_pixel_accuracy,train_seconds,eval_seconds",
    );
    for name in class_names {
        s += &format!(",iou_{}", name.replace([',', '"', ' '], "_"));
    }
    s.push('\n');
    for r in history {
        s += &format!(
            "{},{},{:.6e},{:.6},{:.6},{},{},{},{:.3},{:.3}",
            r.epoch,
            r.phase.name(),
            r.lr,
            r.loss,
            r.ce,
            opt(r.lovasz),
            opt(r.val_miou),
            opt(r.val_pixel_accuracy),
            r.train_seconds,
            r.eval_seconds
        );
        for iou in &r.val_iou {
            s += &format!(",{}", opt(*iou));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_a_column_per_class() {
        let r = EpochRecord {
            epoch: 1,
            phase: Phase::Combined,
            lr: 1e-3,
            loss: 1.0,
            ce: 0.5,
            lovasz: Some(0.5),
            val_miou: Some(0.25),
            val_pixel_accuracy: None,
            val_iou: vec![Some(0.5), None],
            steps: 3,
            train_seconds: 1.0,
            eval_seconds: 0.5,
        };
        let csv = metrics_csv(&[r], &["bg".into(), "thing one".into()]);
        let lines: Vec<&str> = csv.lines().collect();
        assert!(lines[0].ends_with("iou_bg,iou_thing_one"));
        assert_eq!(lines[0].split(',').count(), lines[1].split(',').count());
        assert!(lines[1].starts_with("1,ce+lovasz,"));
    }
}
