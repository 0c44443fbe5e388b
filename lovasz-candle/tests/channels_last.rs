//! Channels-last inputs (`channels_last: true`, `[B, *spatial, C]`): the same values and
//! gradients as the channels-first call on the permuted input, for the Lovász-Softmax on
//! probabilities and from logits, its weights `W` and the cross-entropy; on the fused CPU
//! path (where both layouts give the same bits), on the host-copy path of other devices,
//! with one job split over threads, and with bad shapes.

use candle::{DType, Device, Tensor, Var};
use lovasz_candle::{
    cross_entropy, force_host_copy, lovasz_softmax, lovasz_softmax_weights,
    lovasz_softmax_with_logits, Classes, CrossEntropyConfig, LovaszSoftmaxConfig, Reduction,
};

#[path = "../src/test_rng.rs"]
mod test_rng;

type Result<T> = anyhow::Result<T>;

const DEV: Device = Device::Cpu;

/// `t` (`[B, C, *spatial]`) with its class axis moved last, contiguous.
fn to_last(t: &Tensor) -> Result<Tensor> {
    let mut order: Vec<usize> = (0..t.rank()).filter(|&d| d != 1).collect();
    order.push(1);
    Ok(t.permute(order)?.contiguous()?)
}

/// Logits `[B, C, *spatial]` in `[-3, 3)` and labels `[B, *spatial]` in `[0, C)` with
/// about one pixel in 11 void (255) and class 1 absent from image 0.
fn problem(dims: &[usize], seed: u64) -> Result<(Tensor, Tensor)> {
    let mut rng = test_rng::Lcg(seed);
    let n: usize = dims.iter().product();
    let logits: Vec<f32> = (0..n).map(|_| 6.0 * rng.next_f32() - 3.0).collect();
    let (b, c) = (dims[0], dims[1]);
    let pixels: usize = dims[2..].iter().product();
    let labels: Vec<u32> = (0..b * pixels)
        .map(|i| {
            let class = (rng.next_u64() >> 33) as u32 % c as u32;
            match (i % 11, i / pixels, class) {
                (3, _, _) => 255,
                (_, 0, 1) => 0,
                _ => class,
            }
        })
        .collect();
    let mut label_dims = vec![b];
    label_dims.extend_from_slice(&dims[2..]);
    Ok((
        Tensor::from_vec(logits, dims, &DEV)?,
        Tensor::from_vec(labels, label_dims, &DEV)?,
    ))
}

/// The loss and its gradient as f64 values.
fn value_and_grad(
    x: &Tensor,
    f: impl Fn(&Tensor) -> candle::Result<Tensor>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let var = Var::from_tensor(x)?;
    let loss = f(var.as_tensor())?;
    let grads = loss.backward()?;
    let grad = match grads.get(&var) {
        Some(g) => g.clone(),
        None => x.zeros_like()?,
    };
    let flat =
        |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    Ok((flat(&loss)?, flat(&grad)?))
}

/// The configurations under test: every class selection, per image or not, class
/// weights, every reduction.
fn configs(c: usize) -> Vec<LovaszSoftmaxConfig> {
    let mut all = Vec::new();
    for classes in [Classes::All, Classes::Present, Classes::List(vec![1, 0, 1])] {
        for per_image in [false, true] {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                all.push(LovaszSoftmaxConfig {
                    classes: classes.clone(),
                    per_image,
                    ignore_index: Some(255),
                    class_weights: None,
                    reduction,
                    channels_last: false,
                });
            }
        }
    }
    all.push(LovaszSoftmaxConfig {
        class_weights: Some((0..c).map(|i| 0.5 + i as f32).collect()),
        per_image: true,
        ignore_index: Some(255),
        ..Default::default()
    });
    all
}

/// Checks that channels last gives the channels-first loss and (permuted) gradient:
/// exactly when `exact`, else within `tol` relative.
fn assert_same(
    what: &str,
    first: (Vec<f64>, Vec<f64>),
    last: (Vec<f64>, Vec<f64>),
    exact: bool,
    tol: f64,
) {
    for (name, a, b) in [("loss", &first.0, &last.0), ("gradient", &first.1, &last.1)] {
        assert_eq!(a.len(), b.len(), "{what}: {name} lengths");
        for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
            let ok = if exact {
                x.to_bits() == y.to_bits()
            } else {
                (x - y).abs() <= tol * (1.0 + x.abs())
            };
            assert!(
                ok,
                "{what}: {name}[{i}] channels first {x}, channels last {y}"
            );
        }
    }
}

/// For the Lovász-Softmax from logits and on probabilities: channels first on `x`, then
/// channels last on its permutation, the gradient permuted back.
fn compare_softmax(dims: &[usize], dtype: DType, host_copy: bool) -> Result<()> {
    let (logits, labels) = problem(dims, 7 + dims.len() as u64)?;
    let logits = logits.to_dtype(dtype)?;
    let probas = candle_nn::ops::softmax(&logits, 1)?;
    let exact = !host_copy;
    let tol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
    force_host_copy(host_copy);
    let result = (|| -> Result<()> {
        for cfg in configs(dims[1]) {
            let last = LovaszSoftmaxConfig {
                channels_last: true,
                ..cfg.clone()
            };
            let what = format!("{dims:?} {dtype:?} host copy {host_copy} {cfg:?}");
            for from_logits in [true, false] {
                type Loss = fn(&Tensor, &Tensor, &LovaszSoftmaxConfig) -> candle::Result<Tensor>;
                let (x, f): (&Tensor, Loss) = if from_logits {
                    (&logits, lovasz_softmax_with_logits)
                } else {
                    (&probas, lovasz_softmax)
                };
                let first = value_and_grad(x, |t| f(t, &labels, &cfg))?;
                let (value, grad) = value_and_grad(&to_last(x)?, |t| f(t, &labels, &last))?;
                // The gradient in channels-first order, to compare.
                let mut grad_dims = dims.to_vec();
                let c = grad_dims.remove(1);
                grad_dims.push(c);
                let grad = Tensor::from_vec(grad, grad_dims, &DEV)?;
                let mut back: Vec<usize> = vec![0, dims.len() - 1];
                back.extend(1..dims.len() - 1);
                let grad = grad.permute(back)?.contiguous()?.flatten_all()?.to_vec1()?;
                let what = format!("{what} from logits {from_logits}");
                assert_same(&what, first, (value, grad), exact, tol);
            }
            // W comes in the input's layout.
            let w_first = lovasz_softmax_weights(&probas, &labels, &cfg)?;
            let w_last = lovasz_softmax_weights(&to_last(&probas)?, &labels, &last)?;
            let (a, b) = (to_last(&w_first)?, w_last);
            assert_eq!(a.dims(), b.dims(), "{what}: W dims");
            let flat = |t: &Tensor| -> Result<Vec<f64>> {
                Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
            };
            assert!(flat(&a)? == flat(&b)?, "{what}: W differs");
        }
        Ok(())
    })();
    force_host_copy(false);
    result
}

#[test]
fn softmax_channels_last_matches_channels_first_f32_and_f64() -> Result<()> {
    // 2-D and 3-D images, and no spatial axis at all.
    for dims in [vec![2, 4, 5, 7], vec![2, 3, 3, 4, 5], vec![6, 4]] {
        for dtype in [DType::F32, DType::F64] {
            compare_softmax(&dims, dtype, false)?;
        }
    }
    Ok(())
}

#[test]
fn softmax_channels_last_on_the_host_copy_path() -> Result<()> {
    compare_softmax(&[2, 4, 5, 7], DType::F32, true)?;
    compare_softmax(&[2, 3, 3, 4, 5], DType::F64, true)
}

#[test]
fn a_split_job_gives_the_channels_first_weights_exactly() -> Result<()> {
    // One (group, class) job on 2 x 300 x 300 pixels, fewer jobs than threads: the job is
    // split over the threads, its keys read from every C-th value by all of them.
    let dims = [2, 3, 300, 300];
    let (logits, labels) = problem(&dims, 3)?;
    let cfg = LovaszSoftmaxConfig {
        classes: Classes::List(vec![2]),
        ignore_index: Some(255),
        ..Default::default()
    };
    let last = LovaszSoftmaxConfig {
        channels_last: true,
        ..cfg.clone()
    };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build()?;
    pool.install(|| -> Result<()> {
        let first = lovasz_softmax_weights(&logits, &labels, &cfg)?;
        let last = lovasz_softmax_weights(&to_last(&logits)?, &labels, &last)?;
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
        let (a, b) = (flat(&to_last(&first)?)?, flat(&last)?);
        assert!(a.iter().any(|&v| v != 0.0), "the job wrote its weights");
        assert!(a == b, "split job: W differs between layouts");
        Ok(())
    })
}

#[test]
fn nan_in_a_channel_no_job_reads_gives_nan() -> Result<()> {
    // Only class 0 is counted; a NaN in channel 2, channels last, is found by the scan of
    // the rows no job read. Position 17 (pixel 5 of image 0) is outside the positions that
    // the channels-first rows of channels 1 and 2 would cover (20..60 and 80..120).
    let (logits, labels) = problem(&[2, 3, 4, 5], 11)?;
    let probas = to_last(&candle_nn::ops::softmax(&logits, 1)?)?;
    let mut v = probas.flatten_all()?.to_vec1::<f32>()?;
    v[3 * 5 + 2] = f32::NAN;
    let probas = Tensor::from_vec(v, probas.dims(), &DEV)?;
    let cfg = LovaszSoftmaxConfig {
        classes: Classes::List(vec![0]),
        ignore_index: Some(255),
        channels_last: true,
        ..Default::default()
    };
    let loss = lovasz_softmax(&probas, &labels, &cfg)?.to_scalar::<f32>()?;
    assert!(loss.is_nan(), "loss {loss}");
    Ok(())
}

#[test]
fn cross_entropy_channels_last_matches_channels_first() -> Result<()> {
    let dims = [2, 4, 5, 7];
    let (logits, labels) = problem(&dims, 5)?;
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        for weights in [None, Some(vec![1.0, 0.5, 2.0, 0.0])] {
            let cfg = CrossEntropyConfig {
                ignore_index: Some(255),
                class_weights: weights.clone(),
                reduction,
                channels_last: false,
            };
            let last = CrossEntropyConfig {
                channels_last: true,
                ..cfg.clone()
            };
            let (value, grad) = value_and_grad(&logits, |t| cross_entropy(t, &labels, &cfg))?;
            let grad = to_last(&Tensor::from_vec(grad, &dims, &DEV)?)?;
            let grad: Vec<f64> = grad.flatten_all()?.to_vec1()?;
            let got = value_and_grad(&to_last(&logits)?, |t| cross_entropy(t, &labels, &last))?;
            let what = format!("cross_entropy {reduction:?} {weights:?}");
            assert_same(&what, (value, grad), got, false, 2e-6);
        }
    }
    Ok(())
}

#[test]
fn fused_cross_entropy_matches_the_composed_ops() -> Result<()> {
    // The CPU op (one pass, kept probabilities) against candle's log_softmax + gather,
    // which the host-copy switch selects, in both layouts, f32 and f64.
    let dims = [2, 4, 5, 7];
    let (logits, labels) = problem(&dims, 11)?;
    for dtype in [DType::F32, DType::F64] {
        let logits = logits.to_dtype(dtype)?;
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            for channels_last in [false, true] {
                let cfg = CrossEntropyConfig {
                    ignore_index: Some(255),
                    class_weights: Some(vec![1.0, 0.5, 2.0, 0.0]),
                    reduction,
                    channels_last,
                };
                let x = if channels_last {
                    to_last(&logits)?
                } else {
                    logits.clone()
                };
                let fused = value_and_grad(&x, |t| cross_entropy(t, &labels, &cfg))?;
                force_host_copy(true);
                let composed = value_and_grad(&x, |t| cross_entropy(t, &labels, &cfg));
                force_host_copy(false);
                let what = format!("cross_entropy {dtype:?} {reduction:?} last={channels_last}");
                let tol = if dtype == DType::F32 { 2e-6 } else { 1e-12 };
                assert_same(&what, composed?, fused, false, tol);
            }
        }
    }
    Ok(())
}

#[test]
fn fused_cross_entropy_is_finite_for_large_margins() -> Result<()> {
    // p_y underflows f32 at a margin of 200; −log p_y must still be the margin.
    let logits = Tensor::new(&[[[0f32], [200.0]], [[300.0], [0.0]]], &DEV)?;
    let labels = Tensor::new(&[[0u32], [1]], &DEV)?;
    let cfg = CrossEntropyConfig {
        reduction: Reduction::None,
        ..Default::default()
    };
    let (loss, grad) = value_and_grad(&logits, |t| {
        cross_entropy(t, &labels, &cfg).and_then(|l| l.sum_all())
    })?;
    assert!((loss[0] - 500.0).abs() < 1e-3, "{loss:?}");
    assert_eq!(grad, [-1.0, 1.0, 1.0, -1.0]);
    Ok(())
}

#[test]
fn bad_channels_last_shapes_are_clear_errors() -> Result<()> {
    let err = |r: candle::Result<Tensor>| match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
        Err(e) => e.to_string(),
    };
    let last = LovaszSoftmaxConfig {
        channels_last: true,
        ..Default::default()
    };
    let p = Tensor::ones(4, DType::F32, &DEV)?;
    let l = Tensor::zeros(4, DType::U32, &DEV)?;
    let e = err(lovasz_softmax(&p, &l, &last));
    assert!(e.contains("[B, *spatial, C] (channels_last)"), "{e}");
    let e = err(lovasz_softmax_with_logits(&p, &l, &last));
    assert!(e.contains("[B, *spatial, C] (channels_last)"), "{e}");
    // Channels-first labels for a channels-last input: the labels' shape is named.
    let p = Tensor::ones((2, 5, 7, 4), DType::F32, &DEV)?;
    let l = Tensor::zeros((2, 4, 7), DType::U32, &DEV)?;
    let e = err(lovasz_softmax(&p, &l, &last));
    assert!(e.contains("[2, 4, 7]") && e.contains("[2, 5, 7]"), "{e}");
    let ce = CrossEntropyConfig {
        channels_last: true,
        ..Default::default()
    };
    let e = err(cross_entropy(&p, &l, &ce));
    assert!(e.contains("[2, 4, 7]") && e.contains("[2, 5, 7]"), "{e}");
    // A label out of range of the last axis's C = 4.
    let l = Tensor::full(4u32, (2, 5, 7), &DEV)?;
    let e = err(lovasz_softmax(&p, &l, &last));
    assert!(e.contains("out of range") && e.contains("[0, 4)"), "{e}");
    Ok(())
}
