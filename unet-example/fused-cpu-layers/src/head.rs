//! The U-Net's 1×1 classification head as one CPU op (f32): `x` `[C, B, H, W]` (the
//! channel-first layout inside the network) → logits `[B, K, H, W]` (the usual layout
//! outside), `y[b, k, p] = bias[k] + Σ_c w[k, c] · x[c, b, p]`, so the matmul, the bias
//! broadcast and the transpose back to `[B, K, H, W]` are one pass, and so are their
//! gradients.

use candle::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::{f32_slice, split_flat};
use super::sums::{lane_dot, lane_dots4, lane_sum};

/// `x` `[C, B, H, W]`, `weight` `[K, C, 1, 1]`, `bias` `[K]` (f32, CPU) → `[B, K, H, W]`.
pub(crate) fn head_cpu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Head)
}

struct Head;

/// `(C, B, P)` of `x` and `K` of the weight, checked against each other and the bias.
fn dims(x: &Layout, w: &Layout, bias: &Layout) -> candle::Result<(usize, usize, usize, usize)> {
    let (c, b, h, wd) = x.shape().dims4()?;
    let (k, wc, one, one2) = w.shape().dims4()?;
    if wc != c || one != 1 || one2 != 1 || bias.shape().dims() != [k] {
        candle::bail!(
            "head: weight {:?} and bias {:?} do not fit {c} channels (expected [K, {c}, 1, 1] and [K])",
            w.shape().dims(),
            bias.shape().dims()
        )
    }
    Ok((c, b, h * wd, k))
}

impl CustomOp3 for Head {
    fn name(&self) -> &'static str {
        "head1x1"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let (c, b, p, k) = dims(lx, lw, lb)?;
        let x = f32_slice(sx, lx, "head")?;
        let w = f32_slice(sw, lw, "head")?;
        let bias = f32_slice(sb, lb, "head")?;
        let mut y = vec![0f32; b * k * p];
        // One task per (image, class) row of the output.
        y.par_chunks_mut(p.max(1)).enumerate().for_each(|(row, y)| {
            let (bi, ki) = (row / k, row % k);
            y.fill(bias[ki]);
            for ci in 0..c {
                let wv = w[ki * c + ci];
                let xr = &x[(ci * b + bi) * p..][..p];
                y.iter_mut().zip(xr).for_each(|(y, &v)| *y += wv * v);
            }
        });
        let (_, _, h, wd) = lx.shape().dims4()?;
        Ok((CpuStorage::F32(y), Shape::from((b, k, h, wd))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (c, b, h, w) = x.dims4()?;
        let k = weight.dim(0)?;
        let grad = grad.contiguous()?;
        let params = grad.apply_op2_no_bwd(x, &HeadParamGrad)?;
        let [grad_w, grad_b]: [Tensor; 2] = split_flat(&params, &[&[k, c, 1, 1], &[k]])?
            .try_into()
            .map_err(|_| candle::Error::msg("head backward: two gradients"))?;
        let grad_x = if x.track_op() {
            Some(grad.apply_op2_no_bwd(weight, &HeadInputGrad { c, b, h, w })?)
        } else {
            None
        };
        Ok((grad_x, Some(grad_w), Some(grad_b)))
    }
}

/// `(∂L/∂y [B, K, H, W], x [C, B, H, W])` → `∂L/∂w` (`K·C` values) then `∂L/∂bias`
/// (`K`), in one flat tensor.
struct HeadParamGrad;

impl CustomOp2 for HeadParamGrad {
    fn name(&self) -> &'static str {
        "head1x1-param-grad"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sx: &CpuStorage,
        lx: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let (c, b, h, w) = lx.shape().dims4()?;
        let (gb, k, gh, gw) = lg.shape().dims4()?;
        if (gb, gh, gw) != (b, h, w) {
            candle::bail!(
                "head backward: gradient {:?} does not match the output",
                lg.shape()
            )
        }
        let p = h * w;
        let g = f32_slice(sg, lg, "head backward")?;
        let x = f32_slice(sx, lx, "head backward")?;
        // Per class: Σ_{b,p} g·x for each channel and Σ g (lane sums, f64 totals).
        // Four channels at a time share each load of the gradient.
        let dots4 = lane_dots4();
        let rows: Vec<Vec<f64>> = (0..k)
            .into_par_iter()
            .map(|ki| {
                let mut acc = vec![0f64; c + 1];
                for bi in 0..b {
                    let gr = &g[(bi * k + ki) * p..][..p];
                    let xr = |ci: usize| &x[(ci * b + bi) * p..][..p];
                    let quads = c / 4 * 4;
                    for c0 in (0..quads).step_by(4) {
                        let d = dots4(gr, [xr(c0), xr(c0 + 1), xr(c0 + 2), xr(c0 + 3)]);
                        for (a, d) in acc[c0..][..4].iter_mut().zip(d) {
                            *a += d;
                        }
                    }
                    for (ci, a) in acc.iter_mut().enumerate().take(c).skip(quads) {
                        *a += lane_dot(gr, xr(ci));
                    }
                    acc[c] += lane_sum(gr, |v| v);
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; k * c + k];
        for (ki, acc) in rows.iter().enumerate() {
            for ci in 0..c {
                out[ki * c + ci] = acc[ci] as f32;
            }
            out[k * c + ki] = acc[c] as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(k * c + k)))
    }
}

/// `(∂L/∂y [B, K, H, W], w [K, C, 1, 1])` → `∂L/∂x [C, B, H, W]`,
/// `∂L/∂x[c, b, p] = Σ_k w[k, c] · ∂L/∂y[b, k, p]`.
struct HeadInputGrad {
    c: usize,
    b: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for HeadInputGrad {
    fn name(&self) -> &'static str {
        "head1x1-input-grad"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let HeadInputGrad { c, b, h, w } = *self;
        let p = h * w;
        let k = lw.shape().dims4()?.0;
        let g = f32_slice(sg, lg, "head backward")?;
        let wt = f32_slice(sw, lw, "head backward")?;
        if g.len() != b * k * p || wt.len() != k * c {
            candle::bail!(
                "head backward: {} gradient values for [{b}, {k}, {h}, {w}]",
                g.len()
            )
        }
        let mut dx = vec![0f32; c * b * p];
        dx.par_chunks_mut(p.max(1))
            .enumerate()
            .for_each(|(row, dx)| {
                let (ci, bi) = (row / b, row % b);
                for ki in 0..k {
                    let wv = wt[ki * c + ci];
                    let gr = &g[(bi * k + ki) * p..][..p];
                    dx.iter_mut().zip(gr).for_each(|(d, &v)| *d += wv * v);
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((c, b, h, w))))
    }
}
