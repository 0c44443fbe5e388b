//! The U-Net's layers in a channel-first layout, `[C, B, H, W]`, where every convolution
//! is one matrix product over the whole batch (`[O, 9C] × [9C, B·H·W]`) and batch norm
//! reduces contiguous rows.
//!
//! Why not candle-nn's `Conv2d` / `BatchNorm`: on a 2-core CPU, candle's direct and
//! tiled convolutions and its batch-norm backward were 3–5× slower than this layout
//! (measured: a training step of the default U-Net went from ~1 s to ~0.2 s with
//! im2col + candle matmul, and to ~0.1 s with the fused ops below).
//!
//! On the CPU in f32 the hot layers are single autograd nodes with hand-written
//! backward passes: the 3×3 convolution (im2col and one GEMM forward; kernel gradient
//! from the kept columns, input gradient as a convolution with the flipped kernel), batch norm + ReLU in training
//! mode, and 2×2 max pooling. On every other device or dtype the same functions compose
//! differentiable candle ops (im2col from `narrow` + `stack`), and the tests check the
//! two paths against each other and against candle-nn, values and gradients.

use candle::{DType, Tensor, Var, D};

mod bn_relu;
mod conv_op;
mod direct;
mod gemm;
mod head;
mod im2col;
mod pool;
mod sums;
mod up;

thread_local! {
    static FORCE_COMPOSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes the layers on the current thread compose candle ops even on the CPU in f32,
/// as they do on CUDA / Metal, so tests can check the fused ops against that path.
#[doc(hidden)]
pub fn force_composed(on: bool) {
    FORCE_COMPOSED.with(|f| f.set(on));
}

/// Whether a layer of these operands takes the fused CPU kernels (all f32 on the CPU)
/// rather than composed candle ops (every other device and dtype).
fn fused(operands: &[&Tensor]) -> bool {
    !FORCE_COMPOSED.with(|f| f.get())
        && operands
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// `[C, B, H, W]` → `[9C, B·H·W]`: the 3×3 neighbourhoods (zero padding 1) of every
/// pixel, rows ordered `(c, ky, kx)` like a `[O, C, 3, 3]` kernel, from candle ops (any
/// device and dtype; the CPU f32 path builds them inside its fused convolution).
pub fn im2col3x3(x: &Tensor) -> candle::Result<Tensor> {
    let (c, b, h, w) = x.dims4()?;
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mut cols = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            cols.push(xp.narrow(2, dy, h)?.narrow(3, dx, w)?);
        }
    }
    Tensor::stack(&cols, 1)?.reshape((c * 9, b * h * w))
}

/// A 3×3 convolution, stride 1, zero padding 1, no bias: `x` `[C, B, H, W]`, `weight`
/// `[O, C, 3, 3]` → `[O, B, H, W]`.
pub fn conv3x3(x: &Tensor, weight: &Tensor) -> candle::Result<Tensor> {
    if fused(&[x, weight]) {
        return conv_op::conv3x3_cpu(x, weight);
    }
    let (_, b, h, w) = x.dims4()?;
    let (o, c, _, _) = weight.dims4()?;
    let col = im2col3x3(x)?;
    weight
        .reshape((o, c * 9))?
        .matmul(&col)?
        .reshape((o, b, h, w))
}

/// A 2×2 transposed convolution with stride 2 (doubles `H` and `W`): `x` `[C, B, H, W]`,
/// `weight` `[C, O, 2, 2]` (candle's and PyTorch's layout), `bias` `[O]` → `[O, B, 2H, 2W]`.
pub fn conv_transpose2x2(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle::Result<Tensor> {
    if fused(&[x, weight, bias]) {
        return up::conv_transpose2x2_cpu(x, weight, bias);
    }
    let (c, b, h, w) = x.dims4()?;
    let o = weight.dim(1)?;
    // y[o, b, 2i + di, 2j + dj] = Σ_c weight[c, o, di, dj] · x[c, b, i, j]
    let wt = weight.permute((1, 2, 3, 0))?.reshape((o * 4, c))?;
    let y = wt.matmul(&x.reshape((c, b * h * w))?)?;
    y.reshape((o, 2, 2, b, h, w))?
        .permute((0, 3, 4, 1, 5, 2))?
        .reshape((o, b, 2 * h, 2 * w))?
        .broadcast_add(&bias.reshape((o, 1, 1, 1))?)
}

/// The classification head: a 1×1 convolution with bias of `x` `[C, B, H, W]`
/// (`weight` `[K, C, 1, 1]`, `bias` `[K]`) back in the usual layout, `[B, K, H, W]`
/// contiguous. On the CPU (f32) one fused op, elsewhere [`conv1x1`] and a transpose.
pub fn head1x1(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle::Result<Tensor> {
    if fused(&[x, weight, bias]) {
        return head::head_cpu(x, weight, bias);
    }
    conv1x1(x, weight, bias)?.transpose(0, 1)?.contiguous()
}

/// A 1×1 convolution with bias: `x` `[C, B, H, W]`, `weight` `[O, C, 1, 1]`, `bias`
/// `[O]` → `[O, B, H, W]`.
pub fn conv1x1(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle::Result<Tensor> {
    let (c, b, h, w) = x.dims4()?;
    let o = weight.dim(0)?;
    weight
        .reshape((o, c))?
        .matmul(&x.reshape((c, b * h * w))?)?
        .broadcast_add(&bias.reshape((o, 1))?)?
        .reshape((o, b, h, w))
}

/// 2×2 max pooling, stride 2, of `[C, B, H, W]` (even `H`, `W`).
///
/// On the CPU (f32) one op whose backward sends each window's gradient to its first
/// maximum, as PyTorch does. Elsewhere a max over each window's 4 values laid out last
/// (reshape, permute, `max_keepdim`): its gradient goes to every tied maximum, which
/// differs only at ties (after a ReLU, mostly windows of zeros, whose gradient the ReLU
/// stops anyway). candle's own `max_pool2d` is not used: its backward scales a window's
/// gradient by (tied maxima) / 4, a quarter for a unique maximum.
pub fn max_pool2x2(x: &Tensor) -> candle::Result<Tensor> {
    if fused(&[x]) {
        return pool::max_pool2x2_cpu(x);
    }
    let (c, b, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle::bail!("max_pool2x2: H and W must be even, got {h}x{w}")
    }
    x.reshape((c * b, h / 2, 2, w / 2, 2))?
        .permute((0, 1, 3, 2, 4))?
        .reshape((c * b, h / 2, w / 2, 4))?
        .max_keepdim(3)?
        .reshape((c, b, h / 2, w / 2))
}

/// Batch normalisation over `(B, H, W)` of a `[C, B, H, W]` tensor, with PyTorch's
/// running statistics (momentum 0.1, unbiased running variance).
pub struct BatchNorm {
    /// Scale `[C]`.
    pub weight: Tensor,
    /// Shift `[C]`.
    pub bias: Tensor,
    /// Running mean `[C]`, updated in training mode.
    pub running_mean: Var,
    /// Running variance `[C]`, updated in training mode.
    pub running_var: Var,
}

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

impl BatchNorm {
    /// Normalises `x` `[C, B, H, W]` with batch statistics (`train`, also updating the
    /// running ones) or the running statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle::Result<Tensor> {
        let (c, b, h, w) = x.dims4()?;
        let n = b * h * w;
        let x2 = x.reshape((c, n))?;
        let gamma = self.weight.reshape((c, 1))?;
        let beta = self.bias.reshape((c, 1))?;
        let y = if train {
            let mean = x2.mean_keepdim(D::Minus1)?;
            let xc = x2.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            self.update_running(
                &mean.detach().flatten_all()?,
                &var.detach().flatten_all()?,
                n,
            )?;
            let scale = (var + BN_EPS)?.sqrt()?.recip()?.broadcast_mul(&gamma)?;
            xc.broadcast_mul(&scale)?.broadcast_add(&beta)?
        } else {
            let rm = self.running_mean.as_detached_tensor().reshape((c, 1))?;
            let rv = self.running_var.as_detached_tensor().reshape((c, 1))?;
            let scale = (rv + BN_EPS)?.sqrt()?.recip()?.mul(&gamma)?;
            let shift = (beta - rm.mul(&scale)?)?;
            x2.broadcast_mul(&scale)?.broadcast_add(&shift)?
        };
        y.reshape((c, b, h, w))
    }

    /// `relu(self.forward_t(x, train))`; in training mode on the CPU (f32) one fused op
    /// (see `bn_relu`), with the same values, gradients and running statistics.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> candle::Result<Tensor> {
        if !(train && fused(&[x, &self.weight, &self.bias])) {
            return self.forward_t(x, train)?.relu();
        }
        let (c, b, h, w) = x.dims4()?;
        let (y, stats) = bn_relu::bn_relu_cpu(x, &self.weight, &self.bias, BN_EPS)?;
        let dev = x.device();
        let mean = Tensor::from_vec(stats.mean, c, dev)?;
        let var = Tensor::from_vec(stats.var, c, dev)?;
        self.update_running(&mean, &var, b * h * w)?;
        Ok(y)
    }

    /// PyTorch's running averages from a batch's mean and biased variance `[C]` over
    /// `n` values per channel (the variance made unbiased).
    fn update_running(&self, mean: &Tensor, var: &Tensor, n: usize) -> candle::Result<()> {
        let unbiased = n as f64 / (n.max(2) - 1) as f64;
        let m = BN_MOMENTUM;
        let rm = ((self.running_mean.as_detached_tensor() * (1.0 - m))? + (mean * m)?)?;
        let rv = ((self.running_var.as_detached_tensor() * (1.0 - m))? + (var * (m * unbiased))?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)
    }
}

/// Group normalisation of a `[C, B, H, W]` tensor: per image, over groups of
/// `C / groups` channels and all pixels.
pub struct GroupNorm {
    /// Number of channel groups.
    pub groups: usize,
    /// Scale `[C]`.
    pub weight: Tensor,
    /// Shift `[C]`.
    pub bias: Tensor,
}

impl GroupNorm {
    /// Normalises `x` `[C, B, H, W]`.
    pub fn forward(&self, x: &Tensor) -> candle::Result<Tensor> {
        let (c, b, h, w) = x.dims4()?;
        let g = self.groups;
        let grouped = x
            .reshape((g, c / g, b, h * w))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((g * b, (c / g) * h * w))?;
        let mean = grouped.mean_keepdim(D::Minus1)?;
        let xc = grouped.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xc.broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
        normed
            .reshape((g, b, c / g, h * w))?
            .transpose(1, 2)?
            .reshape((c, b, h, w))?
            .broadcast_mul(&self.weight.reshape((c, 1, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((c, 1, 1, 1))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Module};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < tol, "max abs difference {d}");
    }

    /// `[B, C, H, W]` ↔ `[C, B, H, W]`.
    fn swap(x: &Tensor) -> Tensor {
        x.transpose(0, 1).unwrap().contiguous().unwrap()
    }

    /// The gradients of `Σ out · weights` with respect to `vars`, for a fixed random
    /// `weights` of `out`'s shape.
    fn grads_of(out: &Tensor, weights: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
        let g = (out * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        vars.iter().map(|v| g.get(v).unwrap().clone()).collect()
    }

    fn var(shape: (usize, usize, usize, usize), mean: f32) -> Var {
        Var::from_tensor(&Tensor::randn(mean, 1., shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn conv3x3_matches_candle_forward_and_backward() {
        // Widths that are not multiples of any tile, one input channel, one image.
        for (b, c, o, h, w) in [(2, 3, 6, 5, 4), (1, 1, 8, 7, 9), (3, 16, 5, 2, 3)] {
            let x = var((b, c, h, w), 0.0);
            let k = var((o, c, 3, 3), 0.0);
            let reference = x.as_tensor().conv2d(k.as_tensor(), 1, 1, 1, 1).unwrap();
            let ours = swap(&conv3x3(&swap(x.as_tensor()), k.as_tensor()).unwrap());
            close(&reference, &ours, 1e-4);
            let weights = Tensor::randn(0f32, 1., reference.shape(), &Device::Cpu).unwrap();
            let g1 = grads_of(&reference, &weights, &[&x, &k]);
            let g2 = grads_of(&ours, &weights, &[&x, &k]);
            close(&g1[0], &g2[0], 1e-4);
            close(&g1[1], &g2[1], 1e-3);
        }
    }

    #[test]
    fn conv3x3_of_a_constant_input_has_no_input_gradient() {
        let x = Tensor::randn(0f32, 1., (2, 1, 4, 4), &Device::Cpu).unwrap();
        let k = var((3, 2, 3, 3), 0.0);
        let g = conv3x3(&x, k.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(&k).is_some());
    }

    #[test]
    fn generic_conv3x3_matches_the_fused_cpu_op() {
        // f64 takes the composed candle path (as CUDA / Metal do); compare with f32.
        let x = var((3, 2, 4, 5), 0.0);
        let k = var((4, 3, 3, 3), 0.0);
        let fused = conv3x3(x.as_tensor(), k.as_tensor()).unwrap();
        let x64 = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let k64 = Var::from_tensor(&k.to_dtype(DType::F64).unwrap()).unwrap();
        let generic = conv3x3(x64.as_tensor(), k64.as_tensor()).unwrap();
        close(&generic.to_dtype(DType::F32).unwrap(), &fused, 1e-4);
        let weights = Tensor::randn(0f32, 1., fused.shape(), &Device::Cpu).unwrap();
        let g1 = grads_of(&fused, &weights, &[&x, &k]);
        let g2 = grads_of(
            &generic,
            &weights.to_dtype(DType::F64).unwrap(),
            &[&x64, &k64],
        );
        for (a, b) in g1.iter().zip(&g2) {
            close(a, &b.to_dtype(DType::F32).unwrap(), 1e-3);
        }
    }

    #[test]
    fn max_pool_sends_each_gradient_to_the_first_maximum() {
        // One plane 2×4: windows [[1, 3], [3, 0]] (tie: the first 3 wins) and [[5, 2], [1, 2]].
        let x = Tensor::new(&[[[[1f32, 3., 5., 2.], [3., 0., 1., 2.]]]], &Device::Cpu).unwrap();
        let x = Var::from_tensor(&x).unwrap();
        let y = max_pool2x2(x.as_tensor()).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [3., 5.]);
        let weights = Tensor::new(&[[[[10f32, 20.]]]], &Device::Cpu).unwrap();
        let dx = grads_of(&y, &weights, &[&x]).remove(0);
        let dx = dx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dx, [0., 10., 20., 0., 0., 0., 0., 0.]);
    }

    #[test]
    fn max_pool_matches_candle_values_and_a_brute_force_gradient() {
        let x = var((3, 2, 6, 4), 0.0);
        let y = max_pool2x2(x.as_tensor()).unwrap();
        close(&x.as_tensor().max_pool2d(2).unwrap(), &y, 1e-7);
        let weights = Tensor::randn(0f32, 1., y.shape(), &Device::Cpu).unwrap();
        let dx = grads_of(&y, &weights, &[&x]).remove(0);
        // Brute force: a window's gradient goes to its maximum (unique in random data).
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ws = weights.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut want = vec![0f32; xs.len()];
        for (o, &wv) in ws.iter().enumerate() {
            let (plane, i, j) = (o / 6, (o % 6) / 2, o % 2);
            let at = |di: usize, dj: usize| plane * 24 + (2 * i + di) * 4 + 2 * j + dj;
            let best = [at(0, 1), at(1, 0), at(1, 1)]
                .into_iter()
                .fold(at(0, 0), |b, k| if xs[k] > xs[b] { k } else { b });
            want[best] = wv;
        }
        assert_eq!(dx.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }

    #[test]
    fn composed_max_pool_matches_the_fused_op() {
        let x = var((3, 2, 6, 4), 0.0);
        let y = max_pool2x2(x.as_tensor()).unwrap();
        let weights = Tensor::randn(0f32, 1., y.shape(), &Device::Cpu).unwrap();
        let g1 = grads_of(&y, &weights, &[&x]);
        force_composed(true);
        let yc = max_pool2x2(x.as_tensor()).unwrap();
        let g2 = grads_of(&yc, &weights, &[&x]);
        force_composed(false);
        close(&y, &yc, 1e-7);
        close(&g1[0], &g2[0], 1e-7);
    }

    #[test]
    fn max_pool_rejects_odd_sizes() {
        let x = Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let err = max_pool2x2(&x).unwrap_err().to_string();
        assert!(err.contains("even"), "{err}");
    }

    #[test]
    fn conv_transpose_matches_candle_forward_and_backward() {
        let dev = Device::Cpu;
        let x = var((2, 4, 3, 5), 0.0);
        let k = var((4, 3, 2, 2), 0.0);
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1., 3, &dev).unwrap()).unwrap();
        let cfg = candle_nn::ConvTranspose2dConfig {
            stride: 2,
            ..Default::default()
        };
        let layer = candle_nn::ConvTranspose2d::new(
            k.as_tensor().clone(),
            Some(bias.as_tensor().clone()),
            cfg,
        );
        let reference = layer.forward(x.as_tensor()).unwrap();
        let ours = swap(
            &conv_transpose2x2(&swap(x.as_tensor()), k.as_tensor(), bias.as_tensor()).unwrap(),
        );
        close(&reference, &ours, 1e-4);
        let weights = Tensor::randn(0f32, 1., reference.shape(), &dev).unwrap();
        let g1 = grads_of(&reference, &weights, &[&x, &k, &bias]);
        let g2 = grads_of(&ours, &weights, &[&x, &k, &bias]);
        for (a, b) in g1.iter().zip(&g2) {
            close(a, b, 1e-4);
        }
        // The composed path (f64) gives the same values.
        let x64 = x.to_dtype(DType::F64).unwrap();
        let composed = conv_transpose2x2(
            &swap(&x64),
            &k.to_dtype(DType::F64).unwrap(),
            &bias.to_dtype(DType::F64).unwrap(),
        )
        .unwrap();
        close(
            &swap(&composed).to_dtype(DType::F32).unwrap(),
            &reference,
            1e-4,
        );
    }

    #[test]
    fn conv1x1_matches_candle() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 4, 3, 5), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (3, 4, 1, 1), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., 3, &dev).unwrap();
        let layer = candle_nn::Conv2d::new(k.clone(), Some(bias.clone()), Default::default());
        let ours = swap(&conv1x1(&swap(&x), &k, &bias).unwrap());
        close(&layer.forward(&x).unwrap(), &ours, 1e-4);
    }

    #[test]
    fn head_matches_candle_forward_and_backward() {
        let dev = Device::Cpu;
        let x = var((2, 8, 3, 5), 0.0);
        let k = var((15, 8, 1, 1), 0.0);
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1., 15, &dev).unwrap()).unwrap();
        let layer = candle_nn::Conv2d::new(
            k.as_tensor().clone(),
            Some(bias.as_tensor().clone()),
            Default::default(),
        );
        let reference = layer.forward(x.as_tensor()).unwrap();
        let ours = head1x1(&swap(x.as_tensor()), k.as_tensor(), bias.as_tensor()).unwrap();
        close(&reference, &ours, 1e-5);
        let weights = Tensor::randn(0f32, 1., reference.shape(), &dev).unwrap();
        // The input of `head1x1` is `swap(x)`: its gradient reaches `x` through the swap.
        let g1 = grads_of(&reference, &weights, &[&x, &k, &bias]);
        let g2 = grads_of(&ours, &weights, &[&x, &k, &bias]);
        for (a, b) in g1.iter().zip(&g2) {
            close(a, b, 1e-4);
        }
    }

    #[test]
    fn batch_norm_matches_candle_in_both_modes() {
        let dev = Device::Cpu;
        let x = Tensor::randn(1f32, 2., (3, 4, 5, 6), &dev).unwrap();
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let reference = candle_nn::batch_norm(4, 1e-5, vb).unwrap();
        let ours = BatchNorm {
            weight: Tensor::ones(4, DType::F32, &dev).unwrap(),
            bias: Tensor::zeros(4, DType::F32, &dev).unwrap(),
            running_mean: Var::zeros(4, DType::F32, &dev).unwrap(),
            running_var: Var::ones(4, DType::F32, &dev).unwrap(),
        };
        use candle::ModuleT;
        let r = reference.forward_t(&x, true).unwrap();
        let o = swap(&ours.forward_t(&swap(&x), true).unwrap());
        close(&r, &o, 1e-4);
        close(
            reference.running_mean(),
            ours.running_mean.as_tensor(),
            1e-5,
        );
        close(reference.running_var(), ours.running_var.as_tensor(), 1e-4);
        let r = reference.forward_t(&x, false).unwrap();
        let o = swap(&ours.forward_t(&swap(&x), false).unwrap());
        close(&r, &o, 1e-4);
    }

    #[test]
    fn fused_batch_norm_relu_matches_the_composed_layer() {
        let dev = Device::Cpu;
        let param = |mean: f32| {
            let v = Var::from_tensor(&Tensor::randn(mean, 1., 4, &dev).unwrap()).unwrap();
            v.as_tensor().clone()
        };
        let fused = BatchNorm {
            weight: param(1.0),
            bias: param(0.0),
            running_mean: Var::zeros(4, DType::F32, &dev).unwrap(),
            running_var: Var::ones(4, DType::F32, &dev).unwrap(),
        };
        // The same parameters as f64 variables take the composed candle ops.
        let to64 = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
        let (g64, b64) = (to64(&fused.weight), to64(&fused.bias));
        let composed = BatchNorm {
            weight: g64.as_tensor().clone(),
            bias: b64.as_tensor().clone(),
            running_mean: Var::zeros(4, DType::F64, &dev).unwrap(),
            running_var: Var::ones(4, DType::F64, &dev).unwrap(),
        };
        let x = var((4, 3, 5, 6), 1.0);
        let x64 = to64(x.as_tensor());
        let y = fused.forward_relu_t(x.as_tensor(), true).unwrap();
        let y64 = composed.forward_relu_t(x64.as_tensor(), true).unwrap();
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        close(&y, &f32_of(&y64), 1e-5);
        let (rm, rv) = (&composed.running_mean, &composed.running_var);
        close(
            fused.running_mean.as_tensor(),
            &f32_of(rm.as_tensor()),
            1e-6,
        );
        close(fused.running_var.as_tensor(), &f32_of(rv.as_tensor()), 1e-5);
        let weights = Tensor::randn(0f32, 1., y.shape(), &dev).unwrap();
        // `Var::from_tensor` of a variable is that variable (same id).
        let gamma = Var::from_tensor(&fused.weight).unwrap();
        let beta = Var::from_tensor(&fused.bias).unwrap();
        let g1 = grads_of(&y, &weights, &[&x, &gamma, &beta]);
        let g2 = grads_of(
            &y64,
            &weights.to_dtype(DType::F64).unwrap(),
            &[&x64, &g64, &b64],
        );
        for (a, b) in g1.iter().zip(&g2) {
            close(a, &f32_of(b), 1e-4);
        }
        // Evaluation mode is the composed layer with the running statistics.
        let e = fused.forward_relu_t(x.as_tensor(), false).unwrap();
        let e64 = composed.forward_relu_t(x64.as_tensor(), false).unwrap();
        close(&e, &f32_of(&e64), 1e-5);
    }
    #[test]
    fn group_norm_matches_candle() {
        let dev = Device::Cpu;
        let x = Tensor::randn(1f32, 2., (3, 4, 5, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., 4, &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 4, &dev).unwrap();
        let reference = candle_nn::GroupNorm::new(w.clone(), b.clone(), 4, 2, 1e-5).unwrap();
        let ours = GroupNorm {
            groups: 2,
            weight: w,
            bias: b,
        };
        let o = swap(&ours.forward(&swap(&x)).unwrap());
        close(&reference.forward(&x).unwrap(), &o, 1e-4);
    }
}
