//! The per-pixel negative log-likelihood of the softmax over the class axis,
//! `−log softmax(z)_y = log Σ_c e^{z_c} − z_y`, as one CPU op (f32 or f64, contiguous):
//! one pass over the logits forward, keeping the probabilities for a backward pass that
//! is `∂/∂z_c = g · (p_c − [c = y])` per pixel, without exponentials. Void pixels get a
//! loss of 0 and no gradient. [`crate::cross_entropy`] weights and reduces its output.

use std::sync::{Arc, Mutex};

use candle::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::input::VOID;
use crate::kernel::{ChannelOrder, Real};

/// `−log softmax(logits)_label` per pixel of `logits` (`[B, C, *spatial]`, or
/// `[B, *spatial, C]` with `ChannelOrder::Last`), f32 or f64 on the CPU; `labels` holds
/// `B·S` class indices, [`VOID`] for void pixels. Returns `[B, *spatial]`.
pub(crate) fn softmax_nll(
    logits: &Tensor,
    labels: Vec<u32>,
    order: ChannelOrder,
    class_axis: usize,
) -> Result<Tensor> {
    let dims = logits.dims();
    let (b, c) = (dims[0], dims[class_axis]);
    let s = logits.elem_count() / (b * c).max(1);
    if labels.len() != b * s {
        bail!(
            "cross_entropy: {} labels for {} pixels",
            labels.len(),
            b * s
        )
    }
    let mut out_dims = dims.to_vec();
    out_dims.remove(class_axis);
    logits.contiguous()?.apply_op1(SoftmaxNll {
        labels: Arc::new(labels),
        dims: (b, c, s),
        order,
        out_dims,
        probs: Mutex::new(None),
    })
}

struct SoftmaxNll {
    labels: Arc<Vec<u32>>,
    dims: (usize, usize, usize),
    order: ChannelOrder,
    out_dims: Vec<usize>,
    /// The softmax of the forward pass, for the backward pass.
    probs: Mutex<Option<Arc<CpuStorage>>>,
}

/// `e^x` for the softmax: `f64::exp` in f64; in f32 a branch-free Cephes-style
/// polynomial (range reduction by `ln 2`, degree-7 minimax on `[−ln 2 / 2, ln 2 / 2]`,
/// within 2 ulp of `f32::exp`) that the compiler turns into vector code.
pub(crate) trait SoftmaxExp: Real {
    fn softmax_exp(self) -> Self;
}

impl SoftmaxExp for f64 {
    #[inline]
    fn softmax_exp(self) -> f64 {
        self.exp()
    }
}

impl SoftmaxExp for f32 {
    #[inline]
    fn softmax_exp(self) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        // Below ~-87.3 the result is subnormal: flush to 0 (the softmax's terms are ≤ 1).
        let x = self.clamp(-87.3, 88.0);
        // Round to nearest by the 1.5·2²³ trick (no libm call, so the loop vectorises).
        const ROUND: f32 = 12_582_912.0;
        let n = (x * LOG2E + ROUND) - ROUND;
        let r = x - n * LN2_HI - n * LN2_LO;
        let p = 1.987_569_1e-4_f32;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 0.166_666_65;
        let p = p * r + 0.5;
        let e = p * r * r + r + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
        let v = e * scale;
        if self < -87.3 {
            0.0
        } else if self.is_nan() {
            self
        } else {
            v
        }
    }
}

/// The softmax of `z` and each pixel's `log Σ e^{z} − z_y` (0 at void pixels).
fn forward<T: SoftmaxExp>(
    z: &[T],
    labels: &[u32],
    (_, c_n, s_n): (usize, usize, usize),
    order: ChannelOrder,
) -> (Vec<T>, Vec<T>) {
    let mut p = vec![T::zero(); z.len()];
    let mut nll = vec![T::zero(); labels.len()];
    p.par_chunks_mut(c_n * s_n)
        .zip(z.par_chunks(c_n * s_n))
        .zip(nll.par_chunks_mut(s_n).zip(labels.par_chunks(s_n)))
        .for_each(|((p, z), (nll, labels))| {
            let (max, sum) = match order {
                ChannelOrder::First => exp_rows(p, z, s_n),
                ChannelOrder::Last => exp_pixels(p, z, c_n),
            };
            for (i, ((nll, &y), (&m, &s))) in nll
                .iter_mut()
                .zip(labels)
                .zip(max.iter().zip(&sum))
                .enumerate()
            {
                if y != VOID {
                    let zy = match order {
                        ChannelOrder::First => z[y as usize * s_n + i],
                        ChannelOrder::Last => z[i * c_n + y as usize],
                    };
                    *nll = T::from_f64(s.to_f64().ln()) + m - zy;
                }
            }
        });
    (p, nll)
}

/// One image `[C, S]`: `p = softmax(z)` over the rows, and each pixel's max and
/// `Σ e^{z − max}`, row by row so that every loop runs along contiguous pixels.
fn exp_rows<T: SoftmaxExp>(p: &mut [T], z: &[T], s_n: usize) -> (Vec<T>, Vec<T>) {
    let mut max = z[..s_n].to_vec();
    for row in z.chunks(s_n).skip(1) {
        for (m, &v) in max.iter_mut().zip(row) {
            // NaN propagates: it never compares greater, so keep it once seen.
            if v > *m || v.is_nan() {
                *m = v;
            }
        }
    }
    let mut sum = vec![T::zero(); s_n];
    for (prow, zrow) in p.chunks_mut(s_n).zip(z.chunks(s_n)) {
        for (((pv, &zv), &m), s) in prow.iter_mut().zip(zrow).zip(&max).zip(sum.iter_mut()) {
            *pv = (zv - m).softmax_exp();
            *s += *pv;
        }
    }
    let inv: Vec<T> = sum.iter().map(|&s| T::one() / s).collect();
    for prow in p.chunks_mut(s_n) {
        for (pv, &r) in prow.iter_mut().zip(&inv) {
            *pv *= r;
        }
    }
    (max, sum)
}

/// One image `[S, C]`: as [`exp_rows`], pixel by pixel.
fn exp_pixels<T: SoftmaxExp>(p: &mut [T], z: &[T], c_n: usize) -> (Vec<T>, Vec<T>) {
    let pixels = z.len() / c_n;
    let (mut max, mut sum) = (Vec::with_capacity(pixels), Vec::with_capacity(pixels));
    for (p, z) in p.chunks_mut(c_n).zip(z.chunks(c_n)) {
        let mut m = z[0];
        for &v in &z[1..] {
            if v > m || v.is_nan() {
                m = v;
            }
        }
        let mut s = T::zero();
        for (pv, &zv) in p.iter_mut().zip(z) {
            *pv = (zv - m).softmax_exp();
            s += *pv;
        }
        let r = T::one() / s;
        p.iter_mut().for_each(|pv| *pv *= r);
        max.push(m);
        sum.push(s);
    }
    (max, sum)
}

fn contiguous<'a, T: candle::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => bail!("cross_entropy: logits must be contiguous"),
    }
}

impl CustomOp1 for SoftmaxNll {
    fn name(&self) -> &'static str {
        "softmax-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (p, nll) = match s {
            CpuStorage::F32(_) => {
                let (p, nll) = forward(
                    contiguous::<f32>(s, l)?,
                    &self.labels,
                    self.dims,
                    self.order,
                );
                (CpuStorage::F32(p), CpuStorage::F32(nll))
            }
            CpuStorage::F64(_) => {
                let (p, nll) = forward(
                    contiguous::<f64>(s, l)?,
                    &self.labels,
                    self.dims,
                    self.order,
                );
                (CpuStorage::F64(p), CpuStorage::F64(nll))
            }
            _ => bail!("cross_entropy: the fused CPU op takes f32 or f64 logits"),
        };
        *self
            .probs
            .lock()
            .map_err(|_| candle::Error::msg("cross_entropy: poisoned lock"))? = Some(Arc::new(p));
        Ok((nll, Shape::from(self.out_dims.clone())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let probs = self
            .probs
            .lock()
            .map_err(|_| candle::Error::msg("cross_entropy: poisoned lock"))?
            .clone();
        let Some(probs) = probs else {
            bail!("cross_entropy: backward pass before the forward pass")
        };
        let grad_z = grad.contiguous()?.apply_op1_no_bwd(&SoftmaxNllGrad {
            labels: Arc::clone(&self.labels),
            dims: self.dims,
            order: self.order,
            probs,
        })?;
        Ok(Some(grad_z.reshape(arg.shape())?))
    }
}

/// `∂L/∂nll` `[B·S]` → `∂L/∂z = ∂L/∂nll · (p − onehot(y))`, 0 at void pixels.
struct SoftmaxNllGrad {
    labels: Arc<Vec<u32>>,
    dims: (usize, usize, usize),
    order: ChannelOrder,
    probs: Arc<CpuStorage>,
}

fn backward<T: Real>(
    p: &[T],
    g: &[T],
    labels: &[u32],
    (_, c_n, s_n): (usize, usize, usize),
    order: ChannelOrder,
) -> Vec<T> {
    let mut dz = vec![T::zero(); p.len()];
    dz.par_chunks_mut(c_n * s_n)
        .zip(p.par_chunks(c_n * s_n))
        .zip(g.par_chunks(s_n).zip(labels.par_chunks(s_n)))
        .for_each(|((dz, p), (g, labels))| match order {
            ChannelOrder::First => {
                for (dz, p) in dz.chunks_mut(s_n).zip(p.chunks(s_n)) {
                    for (((d, &pv), &gv), &y) in dz.iter_mut().zip(p).zip(g).zip(labels) {
                        if y != VOID {
                            *d = gv * pv;
                        }
                    }
                }
                for (i, (&gv, &y)) in g.iter().zip(labels).enumerate() {
                    if y != VOID {
                        dz[y as usize * s_n + i] -= gv;
                    }
                }
            }
            ChannelOrder::Last => {
                for (((dz, p), &gv), &y) in dz.chunks_mut(c_n).zip(p.chunks(c_n)).zip(g).zip(labels)
                {
                    if y != VOID {
                        for (d, &pv) in dz.iter_mut().zip(p) {
                            *d = gv * pv;
                        }
                        dz[y as usize] -= gv;
                    }
                }
            }
        });
    dz
}

impl CustomOp1 for SoftmaxNllGrad {
    fn name(&self) -> &'static str {
        "softmax-nll-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, sp) = self.dims;
        if l.shape().elem_count() != b * sp {
            bail!(
                "cross_entropy backward: {} gradient values for {} pixels",
                l.shape().elem_count(),
                b * sp
            )
        }
        let dz = match (s, &*self.probs) {
            (CpuStorage::F32(_), CpuStorage::F32(p)) => CpuStorage::F32(backward(
                p,
                contiguous::<f32>(s, l)?,
                &self.labels,
                self.dims,
                self.order,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(p)) => CpuStorage::F64(backward(
                p,
                contiguous::<f64>(s, l)?,
                &self.labels,
                self.dims,
                self.order,
            )),
            _ => bail!("cross_entropy backward: the gradient's dtype differs from the logits'"),
        };
        Ok((dz, Shape::from(b * c * sp)))
    }
}

#[cfg(test)]
mod tests {
    use super::SoftmaxExp;

    #[test]
    fn f32_exp_is_within_two_ulp_of_the_standard_one() {
        let mut worst = 0u32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (a, b) = (x.softmax_exp(), x.exp());
            worst = worst.max(a.to_bits().abs_diff(b.to_bits()));
        }
        assert!(worst <= 2, "worst difference {worst} ulp");
        assert_eq!((-100f32).softmax_exp(), 0.0);
        assert_eq!(0f32.softmax_exp(), 1.0);
        assert!(f32::NAN.softmax_exp().is_nan());
    }
}
