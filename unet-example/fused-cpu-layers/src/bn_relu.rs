//! Training-mode batch normalisation followed by ReLU as one CPU op (f32, `[C, …]` with
//! each channel's values contiguous): two passes forward, two backward, instead of the
//! dozen candle ops (and their gradient buffers) of the composed layer.
//!
//! Forward, per channel `c` over its `n` values: `x̂ = (x − μ) / √(σ² + ε)` with the
//! batch mean `μ` and biased variance `σ²`, `y = max(0, γ x̂ + β)`. Backward, with
//! `g = ∂L/∂y · [γ x̂ + β > 0]`: `∂L/∂β = Σ g`, `∂L/∂γ = Σ g x̂`,
//! `∂L/∂x = γ / √(σ² + ε) · (g − ∂L/∂β / n − x̂ ∂L/∂γ / n)`.

use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::{f32_slice, split_flat};
use super::simd::vectorised;
use super::sums::{lane_sum, pass_if, relu_grad_sums};

/// The batch statistics of one forward pass, per channel: mean, biased variance (for
/// the running averages) and `1 / √(σ² + ε)` as the forward pass used it (for the
/// backward pass, which must mask exactly where the forward ReLU did).
#[derive(Clone, Debug, Default)]
pub(crate) struct BatchStats {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    pub invstd: Vec<f32>,
}

/// `relu(batch_norm(x))` of `x` `[C, …]` f32 with scale `gamma` `[C]` and shift `beta`
/// `[C]`, on the CPU; also returns the batch statistics for the running averages.
pub(crate) fn bn_relu_cpu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle::Result<(Tensor, BatchStats)> {
    let stats = Arc::new(Mutex::new(BatchStats::default()));
    let y = x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        BnRelu {
            eps,
            stats: Arc::clone(&stats),
        },
    )?;
    let stats = stats
        .lock()
        .map_err(|_| candle::Error::msg("bn_relu: poisoned lock"))?
        .clone();
    Ok((y, stats))
}

struct BnRelu {
    eps: f64,
    stats: Arc<Mutex<BatchStats>>,
}

/// The channel count and the values per channel of `x` `[C, …]`, checked against `[C]`
/// parameters.
fn channels(x: &Layout, param: usize, param_len: usize) -> candle::Result<(usize, usize)> {
    let dims = x.shape().dims();
    let Some(&c) = dims.first() else {
        candle::bail!("bn_relu: input must have a channel dimension, got a scalar")
    };
    if param != c || param_len != c {
        candle::bail!("bn_relu: scale and shift must be [{c}], got [{param}] and [{param_len}]")
    }
    let n = x.shape().elem_count() / c.max(1);
    if n == 0 {
        candle::bail!("bn_relu: no values to normalise (input shape {dims:?})")
    }
    Ok((c, n))
}

/// Per-channel scale and shift so that `γ x̂ + β = x · s + t`.
fn affine(mean: f32, invstd: f32, gamma: f32, beta: f32) -> (f32, f32) {
    let s = gamma * invstd;
    (s, beta - mean * s)
}

impl CustomOp3 for BnRelu {
    fn name(&self) -> &'static str {
        "bn_relu"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx, "bn_relu")?;
        let gamma = f32_slice(sg, lg, "bn_relu")?;
        let beta = f32_slice(sb, lb, "bn_relu")?;
        let (c, n) = channels(lx, gamma.len(), beta.len())?;
        let mut y = vec![0f32; c * n];
        let eps = self.eps;
        let moments: Vec<(f32, f32, f32)> = y
            .par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .enumerate()
            .map(|(ch, (y, x))| {
                vectorised(
                    #[inline(always)]
                    || {
                        let mean = lane_sum(x, |v| v) / n as f64;
                        let m32 = mean as f32;
                        // Σ (x − m32)² − n (mean − m32)²: the variance about the f64 mean.
                        let dm = mean - m32 as f64;
                        let var =
                            (lane_sum(x, |v| (v - m32) * (v - m32)) / n as f64 - dm * dm).max(0.0);
                        let invstd = (1.0 / (var + eps).sqrt()) as f32;
                        let (s, t) = affine(mean as f32, invstd, gamma[ch], beta[ch]);
                        y.iter_mut()
                            .zip(x)
                            .for_each(|(y, &v)| *y = (v * s + t).max(0.0));
                        (mean as f32, var as f32, invstd)
                    },
                )
            })
            .collect();
        let mut stats = self
            .stats
            .lock()
            .map_err(|_| candle::Error::msg("bn_relu: poisoned lock"))?;
        stats.mean = moments.iter().map(|m| m.0).collect();
        stats.var = moments.iter().map(|m| m.1).collect();
        stats.invstd = moments.iter().map(|m| m.2).collect();
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self
            .stats
            .lock()
            .map_err(|_| candle::Error::msg("bn_relu: poisoned lock"))?
            .clone();
        let c = stats.mean.len();
        let params = BnReluGrad {
            mean: stats.mean,
            invstd: stats.invstd,
            gamma: gamma.to_vec1()?,
            beta: beta.to_vec1()?,
        };
        let all = x.apply_op2_no_bwd(&grad.contiguous()?, &params)?;
        let [grad_x, grad_gamma, grad_beta]: [Tensor; 3] =
            split_flat(&all, &[x.dims(), &[c], &[c]])?
                .try_into()
                .map_err(|_| candle::Error::msg("bn_relu backward: three gradients"))?;
        let grad_x = x.track_op().then_some(grad_x);
        Ok((grad_x, Some(grad_gamma), Some(grad_beta)))
    }
}

/// The backward op: `(x, ∂L/∂y)` → one flat tensor holding `∂L/∂x` (`C·n` values), then
/// `∂L/∂γ` and `∂L/∂β` (`C` each).
struct BnReluGrad {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl CustomOp2 for BnReluGrad {
    fn name(&self) -> &'static str {
        "bn_relu-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx, "bn_relu backward")?;
        let g = f32_slice(sg, lg, "bn_relu backward")?;
        let c = self.mean.len();
        if x.len() != g.len() || c == 0 || x.len() % c != 0 {
            candle::bail!(
                "bn_relu backward: {} gradient values for {} inputs in {c} channels",
                g.len(),
                x.len()
            )
        }
        let n = x.len() / c;
        let mut out = vec![0f32; c * n + 2 * c];
        let (dx, sums) = out.split_at_mut(c * n);
        let per_channel: Vec<(f32, f32)> = dx
            .par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(g.par_chunks(n)))
            .enumerate()
            .map(|(ch, (dx, (x, g)))| {
                vectorised(
                    #[inline(always)]
                    || {
                        let (mean, invstd) = (self.mean[ch], self.invstd[ch]);
                        let (s, t) = affine(mean, invstd, self.gamma[ch], self.beta[ch]);
                        // The ReLU-masked gradient's sum and its sum against x − μ.
                        let [dbeta, dg] = relu_grad_sums(x, g, (s, t, mean));
                        let dgamma = dg * invstd as f64;
                        let (mb, mg) = ((dbeta / n as f64) as f32, (dgamma / n as f64) as f32);
                        for ((dx, &v), &dy) in dx.iter_mut().zip(x).zip(g) {
                            let gy = pass_if(v * s + t > 0.0, dy);
                            *dx = s * (gy - mb - (v - mean) * invstd * mg);
                        }
                        (dgamma as f32, dbeta as f32)
                    },
                )
            })
            .collect();
        let (dgamma, dbeta) = sums.split_at_mut(c);
        for (ch, (dg, db)) in per_channel.into_iter().enumerate() {
            dgamma[ch] = dg;
            dbeta[ch] = db;
        }
        Ok((CpuStorage::F32(out), Shape::from(c * n + 2 * c)))
    }
}
