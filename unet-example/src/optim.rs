//! AdamW whose moments can be saved and restored (candle-nn's cannot export its state,
//! and a resumed run must continue exactly where it stopped), and the cosine learning
//! rate schedule.

use std::collections::HashMap;
use std::path::Path;

use candle::backprop::GradStore;
use candle::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Options of [`AdamW`]; `Default` gives PyTorch's `torch.optim.AdamW` defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Exponential decay of the first moment. Default 0.9.
    pub beta1: f64,
    /// Exponential decay of the second moment. Default 0.999.
    pub beta2: f64,
    /// Added to the denominator. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay, multiplied by the learning rate. Default 0.01.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW (Loshchilov & Hutter) over named variables, PyTorch's update rule:
///
/// `θ ← θ(1 − lr·wd)`, `m ← β₁m + (1 − β₁)g`, `v ← β₂v + (1 − β₂)g²`,
/// `θ ← θ − lr · m̂ / (√v̂ + ε)` with bias-corrected `m̂`, `v̂`.
///
/// The learning rate is passed to every [`AdamW::step`], so a schedule lives outside.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: u64,
}

impl AdamW {
    /// An optimiser of `params` (name, variable) with zero moments.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<candle::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(AdamW {
            cfg,
            params,
            m,
            v,
            steps: 0,
        })
    }

    /// The number of updates made so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with learning rate `lr`. Variables without a gradient in `grads` are
    /// left alone (their moments do not decay either).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            let m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?.detach();
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?.detach();
            let denom = ((&v / bc2)?.sqrt()? + eps)?;
            let update = ((&m / bc1)? / denom)?;
            let theta = var.as_tensor().detach();
            let theta = ((theta * (1.0 - lr * weight_decay))? - (update * lr)?)?;
            var.set(&theta)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments by name: `adam.m.<param>` and `adam.v.<param>`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("adam.m.{name}"), self.m[i].clone());
            out.insert(format!("adam.v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores the moments saved by [`AdamW::state_tensors`] and the step count.
    /// `source` names the file for the error when a moment is missing or misshapen.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps: u64,
        source: &Path,
    ) -> Result<()> {
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("adam.{kind}.{name}");
                let t = tensors.get(&key).ok_or_else(|| Error::CheckpointMismatch {
                    path: source.to_path_buf(),
                    detail: format!("optimiser moment {key} is missing"),
                })?;
                if t.dims() != var.dims() {
                    return Err(Error::CheckpointMismatch {
                        path: source.to_path_buf(),
                        detail: format!(
                            "optimiser moment {key} has shape {:?} but the parameter has {:?}",
                            t.dims(),
                            var.dims()
                        ),
                    });
                }
                *slot = t.to_device(var.device())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Cosine decay from `peak` at `step = 0` to 0 at `step = total` (PyTorch's
/// `CosineAnnealingLR` with `eta_min = 0`, stepped per batch).
pub fn cosine_lr(peak: f64, step: u64, total: u64) -> f64 {
    if total == 0 {
        return peak;
    }
    let progress = (step.min(total) as f64) / total as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn matches_the_adamw_formula_on_one_scalar() {
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f64], &dev).unwrap();
        let cfg = AdamWConfig::default();
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).unwrap();
        let (mut theta, mut m, mut v) = (1.0f64, 0.0, 0.0);
        for t in 1..=3 {
            let loss = p.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.1).unwrap();
            let g = 2.0 * theta;
            theta *= 1.0 - 0.1 * cfg.weight_decay;
            m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
            v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
            let mh = m / (1.0 - cfg.beta1.powi(t));
            let vh = v / (1.0 - cfg.beta2.powi(t));
            theta -= 0.1 * mh / (vh.sqrt() + cfg.eps);
            let got = p.as_tensor().to_vec1::<f64>().unwrap()[0];
            assert!((got - theta).abs() < 1e-12, "step {t}: {got} vs {theta}");
        }
    }

    #[test]
    fn saved_moments_continue_identically() {
        let dev = Device::Cpu;
        let run = |split: Option<u64>| -> Vec<f32> {
            let p = Var::new(&[0.5f32, -2.0, 3.0], &dev).unwrap();
            let mut opt =
                AdamW::new(vec![("w".into(), p.clone())], AdamWConfig::default()).unwrap();
            for step in 0..6u64 {
                if split == Some(step) {
                    let state = opt.state_tensors();
                    let steps = opt.steps();
                    opt =
                        AdamW::new(vec![("w".into(), p.clone())], AdamWConfig::default()).unwrap();
                    opt.load_state(&state, steps, Path::new("mem")).unwrap();
                }
                let loss = (p.as_tensor().sqr().unwrap() * 0.5)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                opt.step(&loss.backward().unwrap(), 0.05).unwrap();
            }
            p.as_tensor().to_vec1().unwrap()
        };
        assert_eq!(run(None), run(Some(3)));
    }

    #[test]
    fn cosine_schedule_endpoints() {
        assert_eq!(cosine_lr(4e-3, 0, 100), 4e-3);
        assert!((cosine_lr(4e-3, 50, 100) - 2e-3).abs() < 1e-12);
        assert!(cosine_lr(4e-3, 100, 100).abs() < 1e-12);
        assert!(cosine_lr(4e-3, 200, 100).abs() < 1e-12);
    }
}
