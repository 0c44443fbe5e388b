//! Every loss on a CUDA device (the native path: `cuda/lovasz.cu`) against the fused CPU
//! op: values and gradients within 1e-6 relative in f32 (1e-12 in f64) on tie-free
//! inputs (from logits, where the two devices' exponentials differ by an ulp or two, up to
//! 1 % of the gradient entries, those at near-tied errors, may differ), half-precision inputs upcast, several chunks per call, one group of ten
//! million pixels, NaN, and the same errors for bad input. Needs a GPU: built with
//! `--features cuda` and run by `scripts/gpu-check.sh`.
#![cfg(feature = "cuda")]

use candle::{DType, Device, Tensor, Var};
use lovasz_candle::{
    lovasz_hinge, lovasz_hinge_multilabel, lovasz_hinge_weights, lovasz_sigmoid, lovasz_softmax,
    lovasz_softmax_weights, lovasz_softmax_with_logits, Classes, LovaszHingeConfig,
    LovaszSigmoidConfig, LovaszSoftmaxConfig, Reduction,
};

mod common;

use common::{assert_all_close, assert_mostly_close, flat, problem, Result};

fn gpu() -> Result<Device> {
    Ok(Device::new_cuda(0)?)
}

type Loss<'a> = &'a dyn Fn(&Tensor, &Tensor) -> candle::Result<Tensor>;

/// `f(x, labels)` on `dev`: its value and, when it is a loss, its gradient, on the host.
fn run(x: &Tensor, labels: &Tensor, dev: &Device, f: Loss) -> Result<(Vec<f64>, Vec<f64>)> {
    let var = Var::from_tensor(&x.to_device(dev)?)?;
    let out = f(var.as_tensor(), &labels.to_device(dev)?)?;
    assert!(
        out.device().same_device(dev),
        "the result stays on the input's device"
    );
    let grad = match out.sum_all()?.backward()?.get(&var) {
        Some(g) => flat(g)?,
        None => Vec::new(),
    };
    Ok((flat(&out)?, grad))
}

fn assert_same(what: &str, x: &Tensor, labels: &Tensor, f: Loss) -> Result<()> {
    check_paths(what, x, labels, f, false)
}

/// [`assert_same`] for losses from logits: the softmax's exponentials differ by up to
/// 2 ulp between the devices, so a few gradient entries at near-tied errors may differ.
fn assert_same_from_logits(what: &str, x: &Tensor, labels: &Tensor, f: Loss) -> Result<()> {
    check_paths(what, x, labels, f, true)
}

fn check_paths(what: &str, x: &Tensor, labels: &Tensor, f: Loss, near_ties: bool) -> Result<()> {
    let dev = gpu()?;
    for dt in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let x = x.to_dtype(dt)?;
        let (want_v, want_g) = run(&x, labels, &Device::Cpu, f)?;
        let (got_v, got_g) = run(&x, labels, &dev, f)?;
        let tol = if dt == DType::F64 { 1e-12 } else { 1e-6 };
        assert_all_close(&format!("{what} {dt:?}: value"), &got_v, &want_v, tol, 1e-3);
        let name = format!("{what} {dt:?}: gradient");
        if near_ties {
            assert_mostly_close(&name, &got_g, &want_g, tol, 1e-3, 1e-2);
        } else {
            assert_all_close(&name, &got_g, &want_g, tol, 1e-3);
        }
    }
    Ok(())
}

#[test]
fn softmax_every_option() -> Result<()> {
    let (logits, labels) = problem(&[3, 4, 19, 17], &[3, 19, 17], 3, 1)?;
    let probas = candle_nn::ops::softmax(&logits, 1)?;
    for classes in [Classes::All, Classes::Present, Classes::List(vec![2, 0, 2])] {
        for per_image in [false, true] {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let cfg = LovaszSoftmaxConfig {
                    classes: classes.clone(),
                    per_image,
                    ignore_index: Some(255),
                    class_weights: Some(vec![1.0, 0.5, 2.0, 1.5]),
                    reduction,
                    channels_last: false,
                };
                let tag = format!("{classes:?} per_image {per_image} {reduction:?}");
                assert_same(&format!("softmax {tag}"), &probas, &labels, &|p, y| {
                    lovasz_softmax(p, y, &cfg)
                })?;
                assert_same_from_logits(&format!("logits {tag}"), &logits, &labels, &|z, y| {
                    lovasz_softmax_with_logits(z, y, &cfg)
                })?;
                assert_same(&format!("weights {tag}"), &probas, &labels, &|p, y| {
                    lovasz_softmax_weights(p, y, &cfg)
                })?;
                let last = LovaszSoftmaxConfig {
                    channels_last: true,
                    ..cfg.clone()
                };
                let z_last = logits.permute((0, 2, 3, 1))?.contiguous()?;
                assert_same_from_logits(
                    &format!("logits channels last {tag}"),
                    &z_last,
                    &labels,
                    &|z, y| lovasz_softmax_with_logits(z, y, &last),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn binary_losses() -> Result<()> {
    let (logits, labels) = problem(&[4, 31, 23], &[4, 31, 23], 2, 2)?;
    for per_image in [false, true] {
        let hinge = LovaszHingeConfig {
            per_image,
            ignore_index: Some(255),
            ..Default::default()
        };
        assert_same("hinge", &logits, &labels, &|x, y| {
            lovasz_hinge(x, y, &hinge)
        })?;
        assert_same("hinge weights", &logits, &labels, &|x, y| {
            lovasz_hinge_weights(x, y, &hinge)
        })?;
        let sigmoid = LovaszSigmoidConfig {
            per_image,
            ignore_index: Some(255),
            ..Default::default()
        };
        assert_same_from_logits("sigmoid", &logits, &labels, &|x, y| {
            lovasz_sigmoid(&candle_nn::ops::sigmoid(x)?, y, &sigmoid)
        })?;
    }
    let (logits, labels) = problem(&[2, 3, 16, 16], &[2, 3, 16, 16], 2, 3)?;
    let cfg = LovaszHingeConfig {
        per_image: true,
        ignore_index: Some(255),
        ..Default::default()
    };
    assert_same("multilabel hinge", &logits, &labels, &|x, y| {
        lovasz_hinge_multilabel(x, y, &cfg)
    })
}

#[test]
fn many_chunks_and_one_large_group() -> Result<()> {
    // 21 classes of 2 x 256 x 256 per batch: several jobs per chunk, several chunks.
    let (logits, labels) = problem(&[2, 21, 256, 256], &[2, 256, 256], 21, 4)?;
    let cfg = LovaszSoftmaxConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    assert_same_from_logits("softmax 2x21x256x256", &logits, &labels, &|z, y| {
        lovasz_softmax_with_logits(z, y, &cfg)
    })?;
    // One job of ten million pixels.
    let (logits, labels) = problem(&[10, 1000, 1000], &[10, 1000, 1000], 2, 5)?;
    let hinge = LovaszHingeConfig {
        per_image: false,
        ignore_index: Some(255),
        ..Default::default()
    };
    assert_same("hinge over 10M pixels", &logits, &labels, &|x, y| {
        lovasz_hinge(x, y, &hinge)
    })
}

#[test]
fn nan_and_bad_input() -> Result<()> {
    let dev = gpu()?;
    let (logits, labels) = problem(&[2, 3, 5, 5], &[2, 5, 5], 3, 6)?;
    let mut v = candle_nn::ops::softmax(&logits, 1)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    v[7] = f32::NAN;
    let probas = Tensor::from_vec(v, (2, 3, 5, 5), &dev)?;
    let cfg = LovaszSoftmaxConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    let loss = lovasz_softmax(&probas, &labels.to_device(&dev)?, &cfg)?;
    assert!(loss.to_device(&Device::Cpu)?.to_scalar::<f32>()?.is_nan());
    // Labels out of range, and a shape mismatch: the CPU's messages.
    let strict = LovaszSoftmaxConfig::default();
    let on = |d: &Device| -> Result<String> {
        let p = candle_nn::ops::softmax(&logits, 1)?.to_device(d)?;
        let err = lovasz_softmax(&p, &labels.to_device(d)?, &strict).unwrap_err();
        Ok(err.to_string())
    };
    assert_eq!(on(&dev)?, on(&Device::Cpu)?);
    let wrong = Tensor::zeros((2, 4, 5), DType::U32, &dev)?;
    let p = candle_nn::ops::softmax(&logits, 1)?.to_device(&dev)?;
    let msg = lovasz_softmax(&p, &wrong, &strict).unwrap_err().to_string();
    assert!(msg.contains("shape mismatch"), "{msg}");
    Ok(())
}
