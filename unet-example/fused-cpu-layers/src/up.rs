//! The 2×2, stride-2 transposed convolution of the U-Net's up path as one CPU op (f32,
//! `[C, B, H, W]` → `[O, B, 2H, 2W]`): `y[o, b, 2i + di, 2j + dj] = bias[o] + Σ_c
//! w[c, o, di, dj] · x[c, b, i, j]`, so the product, the interleaving permute and the
//! bias are one pass; the backward pass de-interleaves the output's gradient once and
//! computes the input's, the kernel's and the bias's gradients from it.

use candle::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, threads_for, View};
use super::im2col::{f32_slice, split_flat};
use super::sums::lane_sum;

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
        // Y' [4O, N] = Wᵀ [4O, C] · X [C, N] (the kernel `[C, O, 2, 2]` read as `[C, 4O]`),
        // then each (o, tap) row interleaved into the output, plus the bias.
        let n = b * h * w;
        let mut taps = vec![0f32; 4 * o * n];
        let wt = View {
            data: k,
            rs: 1,
            cs: 4 * o,
        };
        let flops = 4 * o * c * n;
        matmul(
            &mut taps,
            (4 * o, n, c),
            wt,
            View::rows(x, n),
            false,
            threads_for(flops),
        )?;
        let mut y = vec![0f32; o * b * 4 * h * w];
        // One task per output plane (o, b).
        y.par_chunks_mut((4 * h * w).max(1))
            .enumerate()
            .for_each(|(plane, y)| {
                let (oc, bi) = (plane / b, plane % b);
                let tap = |t: usize| &taps[(oc * 4 + t) * n + bi * h * w..][..h * w];
                let (t0, t1, t2, t3) = (tap(0), tap(1), tap(2), tap(3));
                for i in 0..h {
                    let (top, bottom) = y[2 * i * 2 * w..][..4 * w].split_at_mut(2 * w);
                    for j in 0..w {
                        let at = i * w + j;
                        top[2 * j] = t0[at] + bias[oc];
                        top[2 * j + 1] = t1[at] + bias[oc];
                        bottom[2 * j] = t2[at] + bias[oc];
                        bottom[2 * j + 1] = t3[at] + bias[oc];
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
        // De-interleaved gradient, one row per (o, tap): gd[o, 2di + dj, b, i, j] =
        // g[o, b, 2i + di, 2j + dj], so that both products below are plain GEMMs over
        // the n = B·H·W input positions.
        let n = b * hw;
        let mut gd = vec![0f32; g.len()];
        gd.par_chunks_mut((4 * n).max(1))
            .zip(g.par_chunks((4 * n).max(1)))
            .for_each(|(d, s)| {
                let (d01, d23) = d.split_at_mut(2 * n);
                let (d0, d1) = d01.split_at_mut(n);
                let (d2, d3) = d23.split_at_mut(n);
                for bi in 0..b {
                    for i in 0..h {
                        let at = (bi * h + i) * w;
                        let top = &s[(bi * 2 * h + 2 * i) * 2 * w..][..2 * w];
                        let bottom = &s[(bi * 2 * h + 2 * i + 1) * 2 * w..][..2 * w];
                        for (j, (t, u)) in
                            top.chunks_exact(2).zip(bottom.chunks_exact(2)).enumerate()
                        {
                            d0[at + j] = t[0];
                            d1[at + j] = t[1];
                            d2[at + j] = u[0];
                            d3[at + j] = u[1];
                        }
                    }
                }
            });
        let nx = c * n;
        let mut out = vec![0f32; nx + c * o * 4 + o];
        let (dx, params) = out.split_at_mut(nx);
        let (dw, db) = params.split_at_mut(c * o * 4);
        let flops = c * o * 4 * n;
        // ∂L/∂x [C, N] = W [C, 4O] · GD [4O, N] (the kernel `[C, O, 2, 2]` is `[C, 4O]`).
        let gd_rows = View::rows(&gd, n);
        matmul(
            dx,
            (c, n, 4 * o),
            View::rows(k, 4 * o),
            gd_rows,
            false,
            threads_for(flops),
        )?;
        // ∂L/∂w [C, 4O] = X [C, N] · GDᵀ [N, 4O].
        let gd_t = View {
            data: &gd,
            rs: 1,
            cs: n,
        };
        matmul(
            dw,
            (c, 4 * o, n),
            View::rows(x, n),
            gd_t,
            false,
            threads_for(flops),
        )?;
        // ∂L/∂bias[o] = Σ g[o] (lane sums, f64 totals).
        for (oc, db) in db.iter_mut().enumerate() {
            *db = lane_sum(&g[oc * 4 * n..][..4 * n], |v| v) as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(nx + c * o * 4 + o)))
    }
}
