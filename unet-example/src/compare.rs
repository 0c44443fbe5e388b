//! The experiment of record: with one seed and one epoch budget, (a) cross-entropy only,
//! (b) cross-entropy then CE + λ·Lovász fine-tuning, forked from (a) at the switch epoch
//! so both share the initial weights, the data order and the whole first phase, and (c)
//! CE + λ·Lovász from the start; test-split IoU per class and mIoU for each, over one or
//! more seeds, with paired differences.

use std::path::Path;
use std::time::Instant;

use candle::Device;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::atomic_file::{write_bytes, write_json};
use crate::eval::EvalReport;
use crate::train::{Outcome, RunOptions, Schedule, Summary, TrainConfig, Trainer};
use crate::{Error, Result};

/// The three variants, in table order.
pub const VARIANTS: [(&str, Schedule); 3] = [
    ("a: CE", Schedule::Ce),
    ("b: CE → CE+λ·Lovász", Schedule::CeThenFinetune),
    ("c: CE+λ·Lovász", Schedule::Combined),
];

/// One seed's results, test split, in [`VARIANTS`] order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedResult {
    /// The training seed.
    pub seed: u64,
    /// Test reports of variants a, b, c.
    pub test: Vec<EvalReport>,
    /// Final validation mIoU of a, b, c.
    pub val_miou: Vec<Option<f64>>,
    /// Seconds of training of a, b (its own epochs only) and c.
    pub seconds: Vec<f64>,
}

/// `compare.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareReport {
    /// The shared options (the schedule field is per variant).
    pub config: TrainConfig,
    /// Variant names.
    pub variants: Vec<String>,
    /// Class names.
    pub class_names: Vec<String>,
    /// Per-seed results.
    pub seeds: Vec<SeedResult>,
    /// Wall time of the whole comparison in seconds.
    pub wall_seconds: f64,
    /// The device.
    pub device: String,
}

/// Runs the comparison for `seeds` seeds (`base.seed`, `base.seed + 1`, ...), each
/// variant in `out/seed-S/<schedule>/`, and writes `out/compare.json` and
/// `out/compare.md`.
pub fn compare(
    base: &TrainConfig,
    seeds: usize,
    device: &Device,
    out: &Path,
    options: &RunOptions,
) -> Result<CompareReport> {
    if seeds == 0 {
        return Err(Error::Usage("--seeds must be at least 1".to_string()));
    }
    if base.finetune_epochs == 0 || base.finetune_epochs >= base.epochs {
        return Err(Error::Usage(format!(
            "compare needs 0 < --finetune-epochs < --epochs, got {} and {}",
            base.finetune_epochs, base.epochs
        )));
    }
    let start = Instant::now();
    let switch = base.epochs - base.finetune_epochs;
    let mut results = Vec::with_capacity(seeds);
    let finished = |o: Outcome| -> Result<Summary> {
        match o {
            Outcome::Finished(s) => Ok(*s),
            _ => Err(Error::Usage(
                "compare runs cannot be stopped early".to_string(),
            )),
        }
    };
    for k in 0..seeds {
        let seed = base.seed + k as u64;
        let dir = out.join(format!("seed-{seed}"));
        let cfg = |schedule| TrainConfig {
            schedule,
            seed,
            ..base.clone()
        };
        info!("seed {seed}: (a) cross-entropy, epochs 1-{switch}");
        let mut a = Trainer::new(
            cfg(Schedule::Ce),
            device,
            Some(&dir.join(Schedule::Ce.name())),
            options.clone(),
        )?;
        if a.run_until(switch)?.is_some() {
            return Err(Error::Usage(
                "compare runs cannot be stopped early".to_string(),
            ));
        }
        let mut b = a.fork(
            Schedule::CeThenFinetune,
            Some(&dir.join(Schedule::CeThenFinetune.name())),
        )?;
        let shared_seconds: f64 = a
            .history()
            .iter()
            .map(|r| r.train_seconds + r.eval_seconds)
            .sum();
        info!(
            "seed {seed}: (a) cross-entropy, epochs {}-{}",
            switch + 1,
            base.epochs
        );
        let sa = finished(a.run()?)?;
        info!("seed {seed}: (b) CE + Lovász fine-tuning from (a) at epoch {switch}");
        let sb = finished(b.run()?)?;
        info!("seed {seed}: (c) CE + Lovász from the start");
        let mut c = Trainer::new(
            cfg(Schedule::Combined),
            device,
            Some(&dir.join(Schedule::Combined.name())),
            options.clone(),
        )?;
        let sc = finished(c.run()?)?;
        let class_names = sa.config.data.class_names.clone();
        let seconds = |s: &Summary| s.train_seconds;
        let result = SeedResult {
            seed,
            val_miou: vec![sa.val.mean_iou, sb.val.mean_iou, sc.val.mean_iou],
            seconds: vec![seconds(&sa), seconds(&sb) - shared_seconds, seconds(&sc)],
            test: vec![sa.test, sb.test, sc.test],
        };
        results.push(result);
        let partial = CompareReport {
            config: base.clone(),
            variants: VARIANTS.iter().map(|v| v.0.to_string()).collect(),
            class_names,
            seeds: results.clone(),
            wall_seconds: start.elapsed().as_secs_f64(),
            device: crate::device::device_name(device),
        };
        write_json(&out.join("compare.json"), &partial)?;
        write_bytes(&out.join("compare.md"), partial.markdown().as_bytes())?;
        println!("{}", partial.markdown());
    }
    read_back(out)
}

fn read_back(out: &Path) -> Result<CompareReport> {
    crate::atomic_file::read_json(&out.join("compare.json"))
}

/// Mean and sample standard deviation (0 for one value); `None` when empty.
pub fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Some((mean, var.sqrt()))
}

fn cell(values: &[f64]) -> String {
    match mean_std(values) {
        None => "-".to_string(),
        Some((m, _)) if values.len() == 1 => format!("{:.1}", 100.0 * m),
        Some((m, s)) => format!("{:.1} ± {:.1}", 100.0 * m, 100.0 * s),
    }
}

impl CompareReport {
    /// Test IoU per class and mIoU (percent, mean ± std over seeds) per variant, then the
    /// paired mIoU differences per seed, as a Markdown table.
    pub fn markdown(&self) -> String {
        let n = self.seeds.len();
        let mut s = format!(
            "Test split, {} seed(s) ({}), {} epochs (fine-tuning: last {}), λ = {}, {} Lovász, lr {} cosine, batch {}; IoU in %{}.\n\n",
            n,
            self.seeds.iter().map(|r| r.seed.to_string()).collect::<Vec<_>>().join(", "),
            self.config.epochs,
            self.config.finetune_epochs,
            self.config.lovasz_weight,
            if self.config.per_image { "per-image" } else { "per-batch" },
            self.config.lr,
            self.config.batch_size,
            if n > 1 { ", mean ± std over seeds" } else { "" }
        );
        s += "| class |";
        for v in &self.variants {
            s += &format!(" {v} |");
        }
        s += "\n|---|";
        s += &"---|".repeat(self.variants.len());
        s.push('\n');
        let column = |v: usize, f: &dyn Fn(&EvalReport) -> Option<f64>| -> Vec<f64> {
            self.seeds
                .iter()
                .filter_map(|r| r.test.get(v).and_then(f))
                .collect()
        };
        for (c, name) in self.class_names.iter().enumerate() {
            s += &format!("| {name} |");
            for v in 0..self.variants.len() {
                s += &format!(
                    " {} |",
                    cell(&column(v, &|r| r.classes.get(c).and_then(|x| x.iou)))
                );
            }
            s.push('\n');
        }
        s += "| **mIoU** |";
        for v in 0..self.variants.len() {
            s += &format!(" **{}** |", cell(&column(v, &|r| r.mean_iou)));
        }
        s += "\n\nPaired mIoU differences (points):\n\n| seed | b − a | c − a |\n|---|---|---|\n";
        let mut diffs = (Vec::new(), Vec::new());
        for r in &self.seeds {
            let m = |v: usize| r.test.get(v).and_then(|t| t.mean_iou);
            let (ba, ca) = match (m(0), m(1), m(2)) {
                (Some(a), Some(b), Some(c)) => (b - a, c - a),
                _ => continue,
            };
            diffs.0.push(ba);
            diffs.1.push(ca);
            s += &format!("| {} | {:+.1} | {:+.1} |\n", r.seed, 100.0 * ba, 100.0 * ca);
        }
        if let (true, Some((mb, sb)), Some((mc, sc))) =
            (n > 1, mean_std(&diffs.0), mean_std(&diffs.1))
        {
            s += &format!(
                "| mean ± std | {:+.1} ± {:.1} | {:+.1} ± {:.1} |\n",
                100.0 * mb,
                100.0 * sb,
                100.0 * mc,
                100.0 * sc
            );
        }
        s += &format!(
            "\nWall time {:.0} s on {}.\n",
            self.wall_seconds, self.device
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean_std(&[]), None);
        assert_eq!(mean_std(&[2.0]), Some((2.0, 0.0)));
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]).unwrap();
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
        assert_eq!(cell(&[0.5]), "50.0");
        assert_eq!(cell(&[0.4, 0.6]), "50.0 ± 14.1");
    }
}
