//! 2×2 max pooling (stride 2) as a CPU op on `[…, H, W]` f32 whose backward sends each
//! output's gradient to the first maximum of its window (row-major order), as PyTorch
//! does. candle's own max-pool backward scales the gradient of a window by
//! `count / 4` (`count` = tied maxima), so a unique maximum gets a quarter of it.

use candle::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::f32_slice;

/// Max pooling of `x` `[…, H, W]` f32 (even `H`, `W`) on the CPU → `[…, H/2, W/2]`.
pub(crate) fn max_pool2x2_cpu(x: &Tensor) -> candle::Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool)
}

struct MaxPool;

/// `(planes, H, W)` of a `[…, H, W]` layout with even `H` and `W`.
fn planes(l: &Layout) -> candle::Result<(usize, usize, usize)> {
    let dims = l.shape().dims();
    if dims.len() < 2 {
        candle::bail!("max_pool2x2: input must be [.., H, W], got {dims:?}")
    }
    let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if h % 2 != 0 || w % 2 != 0 || h == 0 || w == 0 {
        candle::bail!("max_pool2x2: H and W must be even and non-zero, got {h}x{w}")
    }
    Ok((l.shape().elem_count() / (h * w), h, w))
}

/// The index within `x` of the first maximum of the window at output `(i, j)` of a
/// plane `x` of width `w`.
#[inline]
fn argmax(x: &[f32], w: usize, i: usize, j: usize) -> usize {
    let top = 2 * i * w + 2 * j;
    let mut best = top;
    for idx in [top + 1, top + w, top + w + 1] {
        if x[idx] > x[best] {
            best = idx;
        }
    }
    best
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max_pool2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "max_pool2x2")?;
        let (p, h, w) = planes(l)?;
        let (oh, ow) = (h / 2, w / 2);
        let mut y = vec![0f32; p * oh * ow];
        y.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(y, x)| {
                for i in 0..oh {
                    for j in 0..ow {
                        y[i * ow + j] = x[argmax(x, w, i, j)];
                    }
                }
            });
        let mut dims = l.shape().dims().to_vec();
        let r = dims.len();
        dims[r - 2] = oh;
        dims[r - 1] = ow;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle::Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolGrad)?,
        ))
    }
}

/// `(x, ∂L/∂y)` → `∂L/∂x`: each output's gradient at its window's first maximum.
struct MaxPoolGrad;

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "max_pool2x2-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx, "max_pool2x2 backward")?;
        let g = f32_slice(sg, lg, "max_pool2x2 backward")?;
        let (p, h, w) = planes(lx)?;
        let (oh, ow) = (h / 2, w / 2);
        if g.len() != p * oh * ow {
            candle::bail!(
                "max_pool2x2 backward: {} gradient values for {p} planes of {oh}x{ow}",
                g.len()
            )
        }
        let mut dx = vec![0f32; p * h * w];
        dx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(g.par_chunks(oh * ow)))
            .for_each(|(dx, (x, g))| {
                for i in 0..oh {
                    for j in 0..ow {
                        dx[argmax(x, w, i, j)] = g[i * ow + j];
                    }
                }
            });
        Ok((CpuStorage::F32(dx), lx.shape().clone()))
    }
}
