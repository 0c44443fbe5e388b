//! The 2×2, stride-2 transposed convolution of the U-Net's up path as one CPU op (f32,
//! `[C, B, H, W]` → `[O, B, 2H, 2W]`): `y[o, b, 2i + di, 2j + dj] = bias[o] + Σ_c
//! w[c, o, di, dj] · x[c, b, i, j]`, so the product, the interleaving permute and the
//! bias are one pass; the backward pass de-interleaves the output's gradient once and
//! computes the input's, the kernel's and the bias's gradients from it.

use candle::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::{f32_slice, split_flat};
use super::sums::{lane_dot, lane_sum};

/// `x` `[C, B, H, W]`, `weight` `[C, O, 2, 2]`, `bias` `[O]` (f32, CPU) →
/// `[O, B, 2H, 2W]`.
pub(crate) fn conv_transpose2x2_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> candle::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, UpConv)
}

struct UpConv;

/// `(C, B, H, W, O)`, the kernel and bias checked against the input.
fn dims(
    x: &Layout,
    w: &Layout,
    bias: &Layout,
) -> candle::Result<(usize, usize, usize, usize, usize)> {
    let (c, b, h, wd) = x.shape().dims4()?;
    let (wc, o, kh, kw) = w.shape().dims4()?;
    if wc != c || kh != 2 || kw != 2 || bias.shape().dims() != [o] {
        candle::bail!(
            "conv_transpose2x2: weight {:?} and bias {:?} do not fit {c} channels (expected [{c}, O, 2, 2] and [O])",
            w.shape().dims(),
            bias.shape().dims()
        )
    }
    Ok((c, b, h, wd, o))
}

impl CustomOp3 for UpConv {
    fn name(&self) -> &'static str {
        "conv_transpose2x2"
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
        let (c, b, h, w, o) = dims(lx, lw, lb)?;
        let x = f32_slice(sx, lx, "conv_transpose2x2")?;
        let k = f32_slice(sw, lw, "conv_transpose2x2")?;
        let bias = f32_slice(sb, lb, "conv_transpose2x2")?;
        let mut y = vec![0f32; o * b * 4 * h * w];
        // One task per output plane (o, b).
        y.par_chunks_mut((4 * h * w).max(1))
            .enumerate()
            .for_each(|(plane, y)| {
                let (oc, bi) = (plane / b, plane % b);
                let (mut t0, mut t1) = (vec![0f32; w], vec![0f32; w]);
                for i in 0..h {
                    for di in 0..2 {
                        t0.fill(bias[oc]);
                        t1.fill(bias[oc]);
                        for ci in 0..c {
                            let at = ((ci * o + oc) * 2 + di) * 2;
                            let (w0, w1) = (k[at], k[at + 1]);
                            let xr = &x[((ci * b + bi) * h + i) * w..][..w];
                            for ((a, b), &v) in t0.iter_mut().zip(t1.iter_mut()).zip(xr) {
                                *a += w0 * v;
                                *b += w1 * v;
                            }
                        }
                        let row = &mut y[(2 * i + di) * 2 * w..][..2 * w];
                        for (pair, (&a, &b)) in row.chunks_exact_mut(2).zip(t0.iter().zip(&t1)) {
                            pair[0] = a;
                            pair[1] = b;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((o, b, 2 * h, 2 * w))))
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
        let o = weight.dim(1)?;
        let all = grad
            .contiguous()?
            .apply_op3_no_bwd(x, weight, &UpConvGrad)?;
        let [grad_x, grad_w, grad_b]: [Tensor; 3] =
            split_flat(&all, &[&[c, b, h, w], &[c, o, 2, 2], &[o]])?
                .try_into()
                .map_err(|_| candle::Error::msg("conv_transpose2x2 backward: three gradients"))?;
        let grad_x = x.track_op().then_some(grad_x);
        Ok((grad_x, Some(grad_w), Some(grad_b)))
    }
}

/// `(∂L/∂y [O, B, 2H, 2W], x, w)` → one flat tensor: `∂L/∂x` (`C·B·H·W` values), then
/// `∂L/∂w` (`C·O·4`, layout `[C, O, 2, 2]`), then `∂L/∂bias` (`O`).
struct UpConvGrad;

impl CustomOp3 for UpConvGrad {
    fn name(&self) -> &'static str {
        "conv_transpose2x2-grad"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let (c, b, h, w) = lx.shape().dims4()?;
        let (wc, o, _, _) = lw.shape().dims4()?;
        if wc != c || lg.shape().dims() != [o, b, 2 * h, 2 * w] {
            candle::bail!(
                "conv_transpose2x2 backward: gradient {:?} does not match",
                lg.shape()
            )
        }
        let g = f32_slice(sg, lg, "conv_transpose2x2 backward")?;
        let x = f32_slice(sx, lx, "conv_transpose2x2 backward")?;
        let k = f32_slice(sw, lw, "conv_transpose2x2 backward")?;
        let hw = h * w;
        // De-interleaved gradient: gd[o, b, i, di, dj, j] = g[o, b, 2i + di, 2j + dj].
        let mut gd = vec![0f32; g.len()];
        gd.par_chunks_mut((4 * hw).max(1))
            .zip(g.par_chunks((4 * hw).max(1)))
            .for_each(|(d, s)| {
                for i in 0..h {
                    for di in 0..2 {
                        let src = &s[(2 * i + di) * 2 * w..][..2 * w];
                        let (d0, d1) = d[(i * 2 + di) * 2 * w..][..2 * w].split_at_mut(w);
                        for (j, pair) in src.chunks_exact(2).enumerate() {
                            d0[j] = pair[0];
                            d1[j] = pair[1];
                        }
                    }
                }
            });
        let nx = c * b * hw;
        let mut out = vec![0f32; nx + c * o * 4 + o];
        let (dx, params) = out.split_at_mut(nx);
        // ∂L/∂x[c, b, i, :] = Σ_{o, di, dj} w[c, o, di, dj] · gd[o, b, i, di, dj, :].
        dx.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(plane, dx)| {
                let (ci, bi) = (plane / b, plane % b);
                for i in 0..h {
                    let row = &mut dx[i * w..][..w];
                    for oc in 0..o {
                        let gr = &gd[((oc * b + bi) * h + i) * 4 * w..][..4 * w];
                        for (t, gq) in gr.chunks_exact(w).enumerate() {
                            let wv = k[(ci * o + oc) * 4 + t];
                            row.iter_mut().zip(gq).for_each(|(d, &v)| *d += wv * v);
                        }
                    }
                }
            });
        // ∂L/∂w[c, o, t] = Σ_{b, i} gd[o, b, i, t, :] · x[c, b, i, :]; ∂L/∂bias[o] = Σ g[o].
        let per_out: Vec<(Vec<f64>, f64)> = (0..o)
            .into_par_iter()
            .map(|oc| {
                let mut acc = vec![0f64; c * 4];
                for bi in 0..b {
                    for i in 0..h {
                        let gr = &gd[((oc * b + bi) * h + i) * 4 * w..][..4 * w];
                        for ci in 0..c {
                            let xr = &x[((ci * b + bi) * h + i) * w..][..w];
                            for (t, gq) in gr.chunks_exact(w).enumerate() {
                                acc[ci * 4 + t] += lane_dot(gq, xr);
                            }
                        }
                    }
                }
                let bias = lane_sum(&g[oc * b * 4 * hw..][..b * 4 * hw], |v| v);
                (acc, bias)
            })
            .collect();
        let (dw, db) = params.split_at_mut(c * o * 4);
        for (oc, (acc, bias)) in per_out.iter().enumerate() {
            for ci in 0..c {
                for t in 0..4 {
                    dw[(ci * o + oc) * 4 + t] = acc[ci * 4 + t] as f32;
                }
            }
            db[oc] = *bias as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(nx + c * o * 4 + o)))
    }
}
