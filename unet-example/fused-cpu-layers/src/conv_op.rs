//! The 3×3 convolution as one CPU op (f32, `[C, B, H, W]`), so the autograd graph holds
//! one node per convolution. Forward: the direct kernel (`direct`) on a zero-padded copy
//! of the input where it applies, else im2col and one GEMM. Backward: the kernel's
//! gradient from what the forward pass kept (the padded input, or the im2col columns),
//! and the input's gradient as the convolution of the output's gradient with the
//! flipped, transposed kernel, through the same two paths.

use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::direct;
use super::gemm::{matmul, threads_for, View};
use super::im2col::{f32_slice, im2col};

/// `x` `[C, B, H, W]` f32 ⊛ `weight` `[O, C, 3, 3]` f32 → `[O, B, H, W]` on the CPU.
pub(crate) fn conv3x3_cpu(x: &Tensor, weight: &Tensor) -> candle::Result<Tensor> {
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        Conv3x3 {
            kept: Mutex::new(None),
        },
    )
}

/// The forward op; it keeps its input, padded or as im2col columns, for the kernel's
/// gradient.
struct Conv3x3 {
    kept: Mutex<Option<Arc<Kept>>>,
}

/// The forward pass's view of the input that the kernel's gradient multiplies.
enum Kept {
    /// Zero-padded, from the direct kernel.
    Padded(direct::Padded),
    /// As im2col columns `[9C, B·H·W]`, from the GEMM path.
    Columns(Vec<f32>),
}

fn dims(x: &Layout, w: &Layout) -> candle::Result<((usize, usize, usize, usize), usize)> {
    let (c, b, h, wd) = x.shape().dims4()?;
    let (o, wc, kh, kw) = w.shape().dims4()?;
    if wc != c || kh != 3 || kw != 3 {
        candle::bail!(
            "conv3x3: kernel {:?} does not fit {c} input channels (expected [O, {c}, 3, 3])",
            w.shape().dims()
        )
    }
    Ok(((c, b, h, wd), o))
}

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let ((c, b, h, w), o) = dims(lx, lw)?;
        let x = f32_slice(sx, lx, "conv3x3")?;
        let kernel = f32_slice(sw, lw, "conv3x3")?;
        let (out, kept) = convolve(x, (c, b, h, w), kernel, o)?;
        *self
            .kept
            .lock()
            .map_err(|_| candle::Error::msg("conv3x3: poisoned lock"))? = Some(Arc::new(kept));
        Ok((CpuStorage::F32(out), Shape::from((o, b, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let kept = self
            .kept
            .lock()
            .map_err(|_| candle::Error::msg("conv3x3: poisoned lock"))?
            .clone();
        let grad_w = if weight.track_op() {
            Some(grad.apply_op2_no_bwd(x, &KernelGrad { kept })?)
        } else {
            None
        };
        let grad_x = if x.track_op() {
            Some(grad.apply_op2_no_bwd(weight, &InputGrad)?)
        } else {
            None
        };
        Ok((grad_x, grad_w))
    }
}

/// `grad` `[O, B, H, W]`, `x` `[C, B, H, W]` → the kernel's gradient `[O, C, 3, 3]`:
/// from the direct kernel where the forward pass was direct, else `grad · colᵀ` from the
/// kept columns, the pixel sum split into per-thread parts added in a fixed order.
struct KernelGrad {
    kept: Option<Arc<Kept>>,
}

impl CustomOp2 for KernelGrad {
    fn name(&self) -> &'static str {
        "conv3x3-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sx: &CpuStorage,
        lx: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let (c, b, h, w) = lx.shape().dims4()?;
        let (o, gb, gh, gw) = lg.shape().dims4()?;
        if (gb, gh, gw) != (b, h, w) {
            candle::bail!(
                "conv3x3 backward: gradient {:?} does not match the output",
                lg.shape()
            )
        }
        let g = f32_slice(sg, lg, "conv3x3 backward")?;
        let n = b * h * w;
        let kept = match &self.kept {
            Some(kept) => Arc::clone(kept),
            None => Arc::new(convolve_input(
                f32_slice(sx, lx, "conv3x3 backward")?,
                (c, b, h, w),
                o,
            )),
        };
        let col = match &*kept {
            Kept::Padded(xp) => match direct::kernel_grad(xp, g, o) {
                Some(dw) => return Ok((CpuStorage::F32(dw), Shape::from((o, c, 3, 3)))),
                None => candle::bail!("conv3x3 backward: the direct kernel no longer applies"),
            },
            Kept::Columns(col) => col,
        };
        let k = 9 * c;
        let parts = threads_for(o * n * k).min(n.max(1));
        let len = n.div_ceil(parts.max(1)).max(1);
        let partial: Vec<Vec<f32>> = (0..parts)
            .into_par_iter()
            .map(|p| {
                let (start, end) = (p * len, ((p + 1) * len).min(n));
                let mut dw = vec![0f32; o * k];
                if start < end {
                    let g = View {
                        data: &g[start..],
                        rs: n,
                        cs: 1,
                    };
                    // colᵀ restricted to pixels start..end: element (pixel, row) = col[row·n + pixel].
                    let col_t = View {
                        data: &col[start..],
                        rs: 1,
                        cs: n,
                    };
                    matmul(&mut dw, (o, k, end - start), g, col_t, false, 1)?;
                }
                Ok(dw)
            })
            .collect::<candle::Result<_>>()?;
        let mut partial = partial.into_iter();
        let mut dw = partial.next().unwrap_or_else(|| vec![0f32; o * k]);
        for part in partial {
            dw.iter_mut().zip(&part).for_each(|(a, v)| *a += v);
        }
        Ok((CpuStorage::F32(dw), Shape::from((o, c, 3, 3))))
    }
}

/// The form of `x` `[C, B, H, W]` that a convolution to `o` channels multiplies:
/// padded for the direct kernel where it applies, else im2col columns.
fn convolve_input(x: &[f32], dims: (usize, usize, usize, usize), o: usize) -> Kept {
    let (c, b, h, w) = dims;
    if direct::applies(o) && c * b * h * w > 0 {
        Kept::Padded(direct::Padded::new(x, dims))
    } else {
        Kept::Columns(im2col(x, dims))
    }
}

/// The convolution of `x` `[C, B, H, W]` with `kernel` `[O, C, 3, 3]`: `[O, B·H·W]`,
/// from the direct kernel where it applies, else from im2col + GEMM, and the form of the
/// input it multiplied.
fn convolve(
    x: &[f32],
    (c, b, h, w): (usize, usize, usize, usize),
    kernel: &[f32],
    o: usize,
) -> candle::Result<(Vec<f32>, Kept)> {
    let n = b * h * w;
    let kept = convolve_input(x, (c, b, h, w), o);
    let out = match &kept {
        Kept::Padded(xp) => match direct::conv3x3(xp, kernel, o) {
            Some(out) => out,
            None => candle::bail!("conv3x3: kernel {o}x{c}x3x3 does not fit the direct path"),
        },
        Kept::Columns(col) => {
            let mut out = vec![0f32; o * n];
            matmul(
                &mut out,
                (o, n, 9 * c),
                View::rows(kernel, 9 * c),
                View::rows(col, n),
                false,
                threads_for(o * n * 9 * c),
            )?;
            out
        }
    };
    Ok((out, kept))
}

/// `grad` `[O, B, H, W]`, `weight` `[O, C, 3, 3]` → the input's gradient `[C, B, H, W]`:
/// `grad` convolved with the kernel flipped in space and transposed in channels,
/// `w'[c, o, ky, kx] = w[o, c, 2 − ky, 2 − kx]`.
struct InputGrad;

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv3x3-input-grad"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let (o, b, h, w) = lg.shape().dims4()?;
        let (wo, c, _, _) = lw.shape().dims4()?;
        if wo != o {
            candle::bail!("conv3x3 backward: gradient has {o} channels, kernel {wo}")
        }
        let g = f32_slice(sg, lg, "conv3x3 backward")?;
        let kernel = f32_slice(sw, lw, "conv3x3 backward")?;
        let mut flipped = vec![0f32; c * 9 * o];
        for oc in 0..o {
            for ic in 0..c {
                for k in 0..9 {
                    flipped[(ic * o + oc) * 9 + (8 - k)] = kernel[(oc * c + ic) * 9 + k];
                }
            }
        }
        let (dx, _) = convolve(g, (o, b, h, w), &flipped, c)?;
        Ok((CpuStorage::F32(dx), Shape::from((c, b, h, w))))
    }
}
