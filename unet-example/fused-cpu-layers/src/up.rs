//! The 2×2, stride-2 transposed convolution of the U-Net's up path as one CPU op (f32,
//! `[C, B, H, W]` → `[O, B, 2H, 2W]`): `y[o, b, 2i + di, 2j + dj] = bias[o] + Σ_c
//! w[c, o, di, dj] · x[c, b, i, j]`, so the product, the interleaving permute and the
//! bias are one pass; the backward pass de-interleaves the output's gradient once and
//! computes the input's, the kernel's and the bias's gradients from it.

use candle::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::{f32_slice, split_flat};
use super::simd::vectorised;
use super::sums::{lane_dots4, lane_sum};

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
        let hw = h * w;
        let mut y = vec![0f32; o * b * 4 * hw];
        // One task per output plane (o, b): the four planes `[di, dj]` of
        // `bias + Σ_c w[c, o, di, dj] · x[c, b]` summed whole, then interleaved.
        y.par_chunks_mut((4 * hw).max(1))
            .enumerate()
            .for_each(|(plane, y)| {
                let (oc, bi) = (plane / b, plane % b);
                vectorised(
                    #[inline(always)]
                    || {
                        let mut acc = vec![bias[oc]; 4 * hw];
                        for ci in 0..c {
                            let xr = &x[(ci * b + bi) * hw..][..hw];
                            let wt = &k[(ci * o + oc) * 4..][..4];
                            for (a, &wv) in acc.chunks_exact_mut(hw.max(1)).zip(wt) {
                                a.iter_mut().zip(xr).for_each(|(a, &v)| *a += wv * v);
                            }
                        }
                        for i in 0..h {
                            for di in 0..2 {
                                let row = &mut y[(2 * i + di) * 2 * w..][..2 * w];
                                let a0 = &acc[2 * di * hw + i * w..][..w];
                                let a1 = &acc[(2 * di + 1) * hw + i * w..][..w];
                                for (pair, (&u, &v)) in
                                    row.chunks_exact_mut(2).zip(a0.iter().zip(a1))
                                {
                                    pair[0] = u;
                                    pair[1] = v;
                                }
                            }
                        }
                    },
                )
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
        // De-interleaved gradient: gd[o, b, di, dj, i, j] = g[o, b, 2i + di, 2j + dj].
        let mut gd = vec![0f32; g.len()];
        gd.par_chunks_mut((4 * hw).max(1))
            .zip(g.par_chunks((4 * hw).max(1)))
            .for_each(|(d, s)| {
                let (d01, d23) = d.split_at_mut(2 * hw);
                for (di, d) in [d01, d23].into_iter().enumerate() {
                    let (d0, d1) = d.split_at_mut(hw);
                    for i in 0..h {
                        let src = &s[(2 * i + di) * 2 * w..][..2 * w];
                        let (d0, d1) = (&mut d0[i * w..][..w], &mut d1[i * w..][..w]);
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
        // ∂L/∂x[c, b] = Σ_o Σ_{di, dj} w[c, o, di, dj] · gd[o, b, di, dj], whole planes.
        dx.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(plane, dx)| {
                let (ci, bi) = (plane / b, plane % b);
                vectorised(
                    #[inline(always)]
                    || {
                        for oc in 0..o {
                            let gp = &gd[(oc * b + bi) * 4 * hw..][..4 * hw];
                            let wt = &k[(ci * o + oc) * 4..][..4];
                            for (gq, &wv) in gp.chunks_exact(hw.max(1)).zip(wt) {
                                dx.iter_mut().zip(gq).for_each(|(d, &v)| *d += wv * v);
                            }
                        }
                    },
                )
            });
        // ∂L/∂w[c, o, t] = Σ_{b, i} (Σ_j gd[o, b, t, i, j] · x[c, b, i, j]), a lane dot
        // per row; ∂L/∂bias[o] = Σ g[o].
        let dots4 = lane_dots4();
        let per_out: Vec<(Vec<f64>, f64)> = (0..o)
            .into_par_iter()
            .map(|oc| {
                let mut acc = vec![0f64; c * 4];
                for bi in 0..b {
                    let gp = &gd[(oc * b + bi) * 4 * hw..][..4 * hw];
                    for i in 0..h {
                        let gq = [0, 1, 2, 3].map(|t| &gp[t * hw + i * w..][..w]);
                        for ci in 0..c {
                            let xr = &x[((ci * b + bi) * h + i) * w..][..w];
                            for (a, d) in acc[ci * 4..][..4].iter_mut().zip(dots4(xr, gq)) {
                                *a += d;
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
