//! The U-Net example's fused CPU layers: f32 autograd ops for candle on the CPU, in a
//! channel-first layout, `[C, B, H, W]`, where every 3×3 convolution is one matrix
//! product over the whole batch (`[O, 9C] × [9C, B·H·W]`, or a direct AVX-512 / AVX2
//! kernel) and batch norm reduces contiguous rows.
//!
//! Each layer is a single autograd node with a hand-written backward pass: the 3×3
//! convolution (direct kernel or im2col + GEMM forward; the kernel's gradient from what
//! the forward pass kept; the input's gradient as a convolution with the flipped kernel),
//! training-mode batch norm + ReLU, 2×2 max pooling (gradient to the first maximum of a
//! window, as PyTorch), the 2×2 transposed convolution and the 1×1 head. They exist
//! because on a 2-core CPU candle's own convolutions and batch-norm backward made a
//! training step of the default U-Net 3–5× slower (measured: ~1 s per step with candle's
//! ops, ~0.1 s with these).
//!
//! The loops of the layers other than the 3×3 convolution run compiled for AVX2 where
//! the CPU has it; they give the same bits as their portable form (the same f32
//! operations in the same order). `FUSED_CPU_LAYERS_ISA=none` turns off every vector
//! path.
//!
//! Every function takes f32 tensors on the CPU and returns an error naming the op for
//! any other device or dtype: on CUDA and Metal, use candle's own ops (the U-Net
//! example's `--layers candle`, its default there). The tests check each op against
//! candle / candle-nn, values and gradients.
//!
//! ```
//! use candle::{Device, Tensor};
//! let x = Tensor::randn(0f32, 1., (3, 2, 8, 8), &Device::Cpu)?; // [C, B, H, W]
//! let k = Tensor::randn(0f32, 1., (4, 3, 3, 3), &Device::Cpu)?; // [O, C, 3, 3]
//! let y = fused_cpu_layers::conv3x3(&x, &k)?;
//! assert_eq!(y.dims(), &[4, 2, 8, 8]);
//! let pooled = fused_cpu_layers::max_pool2x2(&y)?;
//! assert_eq!(pooled.dims(), &[4, 2, 4, 4]);
//! # Ok::<(), candle::Error>(())
//! ```

use candle::{DType, Tensor};

mod bn_relu;
mod conv_op;
mod direct;
mod gemm;
mod head;
mod im2col;
mod pool;
mod simd;
mod sums;
mod up;

/// The batch statistics of a training-mode [`batch_norm_relu`], per channel `[C]`.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchMoments {
    /// The batch mean of each channel.
    pub mean: Vec<f32>,
    /// The biased batch variance of each channel (divided by the count, not count − 1).
    pub var: Vec<f32>,
}

/// Fails unless every operand is f32 on the CPU, naming `op` and the fix.
fn require_cpu_f32(op: &str, operands: &[&Tensor]) -> candle::Result<()> {
    for t in operands {
        if !t.device().is_cpu() || t.dtype() != DType::F32 {
            candle::bail!(
                "fused_cpu_layers::{op}: the fused layers take f32 tensors on the CPU, got {:?} on {:?}; use candle's own ops on other devices and dtypes (unet-example: --layers candle)",
                t.dtype(),
                t.device().location()
            )
        }
    }
    Ok(())
}

/// A 3×3 convolution, stride 1, zero padding 1, no bias: `x` `[C, B, H, W]` f32,
/// `weight` `[O, C, 3, 3]` f32 → `[O, B, H, W]` f32.
pub fn conv3x3(x: &Tensor, weight: &Tensor) -> candle::Result<Tensor> {
    require_cpu_f32("conv3x3", &[x, weight])?;
    conv_op::conv3x3_cpu(x, weight)
}

/// A 2×2 transposed convolution with stride 2 (doubles `H` and `W`): `x` `[C, B, H, W]`
/// f32, `weight` `[C, O, 2, 2]` f32 (candle's and PyTorch's layout), `bias` `[O]` f32 →
/// `[O, B, 2H, 2W]` f32.
pub fn conv_transpose2x2(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle::Result<Tensor> {
    require_cpu_f32("conv_transpose2x2", &[x, weight, bias])?;
    up::conv_transpose2x2_cpu(x, weight, bias)
}

/// The classification head: a 1×1 convolution with bias of `x` `[C, B, H, W]` f32
/// (`weight` `[K, C, 1, 1]` f32, `bias` `[K]` f32), written straight in the usual layout:
/// `[B, K, H, W]` f32, contiguous.
pub fn head1x1(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle::Result<Tensor> {
    require_cpu_f32("head1x1", &[x, weight, bias])?;
    head::head_cpu(x, weight, bias)
}

/// 2×2 max pooling, stride 2, of `x` `[…, H, W]` f32 (even `H`, `W`) → `[…, H/2, W/2]`.
/// The backward pass sends each window's gradient to its first maximum (row-major), as
/// PyTorch does. (candle 0.11's own `max_pool2d` backward scales a window's gradient by
/// the number of tied maxima / 4: a quarter for a unique maximum.)
pub fn max_pool2x2(x: &Tensor) -> candle::Result<Tensor> {
    require_cpu_f32("max_pool2x2", &[x])?;
    pool::max_pool2x2_cpu(x)
}

/// Training-mode batch normalisation followed by ReLU, `relu(γ (x − μ) / √(σ² + ε) + β)`
/// with the batch mean `μ` and biased variance `σ²` of each channel: `x` `[C, …]` f32
/// (each channel's values contiguous, as in `[C, B, H, W]`), `gamma` and `beta` `[C]`
/// f32 → `[C, …]` f32, and the batch statistics for the caller's running averages.
pub fn batch_norm_relu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle::Result<(Tensor, BatchMoments)> {
    require_cpu_f32("batch_norm_relu", &[x, gamma, beta])?;
    let (y, stats) = bn_relu::bn_relu_cpu(x, gamma, beta, eps)?;
    Ok((
        y,
        BatchMoments {
            mean: stats.mean,
            var: stats.var,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Module, Var};

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

    /// The bits of `f`'s output and of the gradients of `Σ out · r` (`r` fixed by the
    /// output's size) with respect to `vars`.
    fn bits_of(f: &dyn Fn() -> Tensor, vars: &[&Var]) -> Vec<Vec<u32>> {
        let out = f();
        let n = out.elem_count();
        let r: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let r = Tensor::from_vec(r, out.shape(), &Device::Cpu).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        let grads = grads_of(&out, &r, vars);
        std::iter::once(&out).chain(&grads).map(bits).collect()
    }

    /// An op's name, the op on fixed inputs, and the inputs to differentiate.
    type Case<'a> = (&'a str, &'a dyn Fn() -> Tensor, Vec<&'a Var>);

    #[test]
    fn the_vectorised_loops_give_the_portable_loops_bits() {
        #[cfg(target_arch = "x86_64")]
        if !simd::use_avx2() {
            eprintln!("no AVX2 path in use on this CPU: both runs take the portable loops");
        }
        let vec_var = |n: usize, mean: f32| {
            Var::from_tensor(&Tensor::randn(mean, 1., n, &Device::Cpu).unwrap()).unwrap()
        };
        // Widths and channel counts that are not multiples of 4 or 8 among them.
        for (b, c, o, h, w) in [(2, 5, 3, 3, 5), (1, 12, 15, 4, 12), (3, 8, 4, 7, 9)] {
            let x = var((c, b, h, w), 0.0);
            let (up_k, head_k) = (var((c, o, 2, 2), 0.0), var((o, c, 1, 1), 0.0));
            let (bias, gamma, beta) = (vec_var(o, 0.0), vec_var(c, 1.0), vec_var(c, 0.0));
            let x2 = var((c, b, 2 * h, 2 * w), 0.0);
            let up = || conv_transpose2x2(&x, &up_k, &bias).unwrap();
            let head = || head1x1(&x, &head_k, &bias).unwrap();
            let bn = || batch_norm_relu(&x, &gamma, &beta, 1e-5).unwrap().0;
            let pool = || max_pool2x2(&x2).unwrap();
            let cases: [Case; 4] = [
                ("conv_transpose2x2", &up, vec![&x, &up_k, &bias]),
                ("head1x1", &head, vec![&x, &head_k, &bias]),
                ("batch_norm_relu", &bn, vec![&x, &gamma, &beta]),
                ("max_pool2x2", &pool, vec![&x2]),
            ];
            for (name, f, vars) in cases {
                let fast = bits_of(f, &vars);
                let portable = simd::tests::portable(|| bits_of(f, &vars));
                assert!(fast == portable, "{name} at {:?}", (b, c, o, h, w));
            }
        }
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
    fn every_op_rejects_other_dtypes_by_name() {
        let x = Tensor::zeros((2, 1, 4, 4), DType::F64, &Device::Cpu).unwrap();
        let k = Tensor::zeros((3, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let err = conv3x3(&x, &k).unwrap_err().to_string();
        assert!(
            err.contains("conv3x3") && err.contains("f32") && err.contains("F64"),
            "{err}"
        );
        let err = max_pool2x2(&x).unwrap_err().to_string();
        assert!(
            err.contains("max_pool2x2") && err.contains("--layers candle"),
            "{err}"
        );
        let c = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let err = batch_norm_relu(&x, &c, &c, 1e-5).unwrap_err().to_string();
        assert!(err.contains("batch_norm_relu"), "{err}");
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
    fn batch_norm_relu_matches_candle_nn_values_gradients_and_statistics() {
        use candle::ModuleT;
        let dev = Device::Cpu;
        let (c, n) = (4, 3 * 5 * 6);
        let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.5, c, &dev).unwrap()).unwrap();
        let beta = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev).unwrap()).unwrap();
        let reference = candle_nn::BatchNorm::new(
            c,
            Tensor::zeros(c, DType::F32, &dev).unwrap(),
            Tensor::ones(c, DType::F32, &dev).unwrap(),
            gamma.as_tensor().clone(),
            beta.as_tensor().clone(),
            1e-5,
        )
        .unwrap();
        let x = var((3, c, 5, 6), 1.0);
        let want = reference
            .forward_t(x.as_tensor(), true)
            .unwrap()
            .relu()
            .unwrap();
        let (y, moments) = batch_norm_relu(
            &swap(x.as_tensor()),
            gamma.as_tensor(),
            beta.as_tensor(),
            1e-5,
        )
        .unwrap();
        let y = swap(&y);
        close(&want, &y, 1e-5);
        // candle-nn's running averages from zero / one with momentum 0.1 and the
        // unbiased variance give back the batch moments.
        let mean = Tensor::new(moments.mean.as_slice(), &dev).unwrap();
        let var_unbiased = (Tensor::new(moments.var.as_slice(), &dev).unwrap()
            * (n as f64 / (n - 1) as f64))
            .unwrap();
        close(&(reference.running_mean() / 0.1).unwrap(), &mean, 1e-5);
        let rv = ((reference.running_var() - 0.9).unwrap() / 0.1).unwrap();
        close(&rv, &var_unbiased, 1e-4);
        let weights = Tensor::randn(0f32, 1., y.shape(), &dev).unwrap();
        let g1 = grads_of(&want, &weights, &[&x, &gamma, &beta]);
        let g2 = grads_of(&y, &weights, &[&x, &gamma, &beta]);
        for (a, b) in g1.iter().zip(&g2) {
            close(a, b, 1e-4);
        }
    }
}
