//! The GPU path's composition (chunked keys, one sort per chunk, prefix counts, the
//! closed-form walk, the sums), run on the host through `force_device_emulation`, against
//! the fused CPU op: every public loss, value and gradient, in f32 and f64, per image and
//! per batch, both layouts. Values and gradients must agree to rounding of the sums (the
//! per-pixel coefficients are the same bits; the device sums in blocks).

use candle::{DType, Device, Tensor, Var};
use lovasz_candle::{
    force_device_emulation, lovasz_hinge, lovasz_hinge_multilabel, lovasz_hinge_weights,
    lovasz_sigmoid, lovasz_softmax, lovasz_softmax_weights, lovasz_softmax_with_logits, Classes,
    LovaszHingeConfig, LovaszSigmoidConfig, LovaszSoftmaxConfig, Reduction,
};

mod common;

use common::{assert_all_close, flat, problem, Result};

const DEV: Device = Device::Cpu;

/// `f`'s value and gradient (or, for a detached result, the value alone) with the device
/// path emulated or not.
fn run(
    x: &Tensor,
    emulate: bool,
    f: &dyn Fn(&Tensor) -> candle::Result<Tensor>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    force_device_emulation(emulate);
    let var = Var::from_tensor(x)?;
    let out = f(var.as_tensor());
    force_device_emulation(false);
    let out = out?;
    let grad = match out.sum_all()?.backward()?.get(&var) {
        Some(g) => flat(g)?,
        None => Vec::new(),
    };
    Ok((flat(&out)?, grad))
}

fn assert_same(
    what: &str,
    x: &Tensor,
    f: &dyn Fn(&Tensor) -> candle::Result<Tensor>,
) -> Result<()> {
    for dt in [DType::F32, DType::F64] {
        let x = x.to_dtype(dt)?;
        let (want_v, want_g) = run(&x, false, f)?;
        let (got_v, got_g) = run(&x, true, f)?;
        let tol = if dt == DType::F32 { 1e-6 } else { 1e-12 };
        assert_all_close(&format!("{what} {dt:?}: value"), &got_v, &want_v, tol, 1.0);
        assert_all_close(
            &format!("{what} {dt:?}: gradient"),
            &got_g,
            &want_g,
            tol,
            1.0,
        );
    }
    Ok(())
}

#[test]
fn softmax_on_probabilities_and_logits_and_its_weights() -> Result<()> {
    let (logits, labels) = problem(&[3, 4, 9, 7], &[3, 9, 7], 3, 1)?;
    let probas = candle_nn::ops::softmax(&logits, 1)?;
    for classes in [Classes::All, Classes::Present, Classes::List(vec![2, 0, 2])] {
        for per_image in [false, true] {
            for reduction in [Reduction::Mean, Reduction::None] {
                let cfg = LovaszSoftmaxConfig {
                    classes: classes.clone(),
                    per_image,
                    ignore_index: Some(255),
                    class_weights: Some(vec![1.0, 0.5, 2.0, 1.5]),
                    reduction,
                    channels_last: false,
                };
                let tag = format!("{classes:?} per_image {per_image} {reduction:?}");
                assert_same(&format!("softmax {tag}"), &probas, &|p| {
                    lovasz_softmax(p, &labels, &cfg)
                })?;
                assert_same(&format!("logits {tag}"), &logits, &|z| {
                    lovasz_softmax_with_logits(z, &labels, &cfg)
                })?;
                assert_same(&format!("weights {tag}"), &probas, &|p| {
                    lovasz_softmax_weights(p, &labels, &cfg)
                })?;
                let last = LovaszSoftmaxConfig {
                    channels_last: true,
                    ..cfg.clone()
                };
                let z_last = logits.permute((0, 2, 3, 1))?.contiguous()?;
                assert_same(&format!("logits channels last {tag}"), &z_last, &|z| {
                    lovasz_softmax_with_logits(z, &labels, &last)
                })?;
            }
        }
    }
    Ok(())
}

#[test]
fn binary_losses() -> Result<()> {
    let (logits, labels) = problem(&[4, 11, 13], &[4, 11, 13], 2, 2)?;
    for per_image in [false, true] {
        let hinge = LovaszHingeConfig {
            per_image,
            ignore_index: Some(255),
            ..Default::default()
        };
        assert_same("hinge", &logits, &|x| lovasz_hinge(x, &labels, &hinge))?;
        assert_same("hinge weights", &logits, &|x| {
            lovasz_hinge_weights(x, &labels, &hinge)
        })?;
        let sigmoid = LovaszSigmoidConfig {
            per_image,
            ignore_index: Some(255),
            ..Default::default()
        };
        let probas = candle_nn::ops::sigmoid(&logits)?;
        assert_same("sigmoid", &probas, &|p| {
            lovasz_sigmoid(p, &labels, &sigmoid)
        })?;
    }
    let (logits, labels) = problem(&[2, 3, 8, 8], &[2, 3, 8, 8], 2, 3)?;
    let cfg = LovaszHingeConfig {
        per_image: true,
        ignore_index: Some(255),
        ..Default::default()
    };
    assert_same("multilabel hinge", &logits, &|x| {
        lovasz_hinge_multilabel(x, &labels, &cfg)
    })
}

#[test]
fn nan_input_gives_a_nan_loss() -> Result<()> {
    let (logits, labels) = problem(&[2, 3, 5, 5], &[2, 5, 5], 3, 4)?;
    let mut v = candle_nn::ops::softmax(&logits, 1)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    v[7] = f32::NAN;
    let probas = Tensor::from_vec(v, (2, 3, 5, 5), &DEV)?;
    force_device_emulation(true);
    let cfg = LovaszSoftmaxConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    let loss = lovasz_softmax(&probas, &labels, &cfg);
    force_device_emulation(false);
    assert!(loss?.to_scalar::<f32>()?.is_nan());
    Ok(())
}
