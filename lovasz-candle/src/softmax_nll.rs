//! The per-pixel negative log-likelihood of the softmax over the class axis,
//! `−log softmax(z)_y = log Σ_c e^{z_c} − z_y`, as one CPU op (f32 or f64, contiguous):
//! one pass over the logits forward, keeping the probabilities for a backward pass that
//! is `∂/∂z_c = g · (p_c − [c = y])` per pixel, without exponentials. Void pixels get a
//! loss of 0 and no gradient. [`crate::cross_entropy`] weights and reduces its output.

use std::sync::{Arc, Mutex};

use candle::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::input::VOID;
use crate::kernel::softmax::softmax_image;
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

/// The softmax of `z` and each pixel's `log Σ e^{z} − z_y` (0 at void pixels).
fn forward<T: Real>(
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
            let (max, sum) = softmax_image(p, z, (c_n, s_n), order);
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
    use super::forward;
    use crate::input::VOID;
    use crate::kernel::softmax::softmax;
    use crate::kernel::{ChannelOrder, Real};

    /// The cross-entropy's forward pass keeps the probabilities of the one channel
    /// softmax that the Lovász-Softmax from logits takes: the same bits.
    fn same_probabilities<T: Real>(scale: f64) {
        let mut rng = crate::test_rng::Lcg(11);
        let dims = (3, 5, 37);
        let n = dims.0 * dims.1 * dims.2;
        let z: Vec<T> = (0..n)
            .map(|_| T::from_f64((f64::from(rng.next_f32()) - 0.5) * scale))
            .collect();
        let labels: Vec<u32> = (0..dims.0 * dims.2)
            .map(|i| if i % 7 == 0 { VOID } else { (i % 5) as u32 })
            .collect();
        for order in [ChannelOrder::First, ChannelOrder::Last] {
            let (p, _) = forward(&z, &labels, dims, order);
            let q = softmax(&z, dims, order);
            let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p), bits(&q), "{order:?}");
        }
    }

    #[test]
    fn cross_entropy_and_the_lovasz_softmax_see_the_same_probabilities() {
        for scale in [1.0, 30.0, 300.0] {
            same_probabilities::<f32>(scale);
            same_probabilities::<f64>(scale);
        }
    }
}
