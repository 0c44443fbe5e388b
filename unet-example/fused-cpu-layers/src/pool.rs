//! 2×2 max pooling (stride 2) as a CPU op on `[…, H, W]` f32 whose backward sends each
//! output's gradient to the first maximum of its window (row-major order), as PyTorch
//! does. candle's own max-pool backward scales the gradient of a window by
//! `count / 4` (`count` = tied maxima), so a unique maximum gets a quarter of it.

use candle::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::f32_slice;
use super::simd::vectorised;

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

/// Which of a window's values `[top left, top right, bottom left, bottom right]` is its
/// first maximum (row-major; a NaN is never taken over an earlier value), as four flags,
/// and that maximum. Branch-free, so that a row of windows vectorises.
#[inline(always)]
fn first_max([a, b, c, d]: [f32; 4]) -> ([bool; 4], f32) {
    let kb = b > a;
    let m = if kb { b } else { a };
    let kc = c > m;
    let m = if kc { c } else { m };
    let kd = d > m;
    let m = if kd { d } else { m };
    let is_c = kc & !kd;
    let is_b = kb & !kc & !kd;
    ([!(kb | kc | kd), is_b, is_c, kd], m)
}

/// The rows `2i` and `2i + 1` of a plane of width `w`, as pairs of columns.
#[inline(always)]
fn row_pairs(x: &[f32], w: usize, i: usize) -> (&[f32], &[f32]) {
    (&x[2 * i * w..][..w], &x[(2 * i + 1) * w..][..w])
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
                vectorised(
                    #[inline(always)]
                    || {
                        for (i, y) in y.chunks_exact_mut(ow).enumerate() {
                            let (r0, r1) = row_pairs(x, w, i);
                            let pairs = r0.chunks_exact(2).zip(r1.chunks_exact(2));
                            for (y, (t, b)) in y.iter_mut().zip(pairs) {
                                *y = first_max([t[0], t[1], b[0], b[1]]).1;
                            }
                        }
                    },
                )
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
                vectorised(
                    #[inline(always)]
                    || {
                        for (i, g) in g.chunks_exact(ow).enumerate() {
                            let (r0, r1) = row_pairs(x, w, i);
                            let (d0, d1) = dx[2 * i * w..][..2 * w].split_at_mut(w);
                            let pairs = r0.chunks_exact(2).zip(r1.chunks_exact(2));
                            let out = d0.chunks_exact_mut(2).zip(d1.chunks_exact_mut(2));
                            for ((&g, (t, b)), (d0, d1)) in g.iter().zip(pairs).zip(out) {
                                let (k, _) = first_max([t[0], t[1], b[0], b[1]]);
                                let at = |k: bool| if k { g } else { 0.0 };
                                (d0[0], d0[1], d1[0], d1[1]) =
                                    (at(k[0]), at(k[1]), at(k[2]), at(k[3]));
                            }
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(dx), lx.shape().clone()))
    }
}
