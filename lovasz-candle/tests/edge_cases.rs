//! Edge cases (empty selections, single pixels, C = 1, half precision, NaN) and bad
//! inputs, each of which must give a clear error rather than a panic or garbage.

use candle::{DType, Device, Tensor, Var};
use lovasz_candle::metrics::{iou, ConfusionMatrix, IouConfig};
use lovasz_candle::{
    binary_xloss, cross_entropy, lovasz_grad, lovasz_hinge, lovasz_hinge_multilabel,
    lovasz_sigmoid, lovasz_softmax, lovasz_softmax_weights, lovasz_softmax_with_logits, Classes,
    CrossEntropyConfig, LovaszHingeConfig, LovaszSigmoidConfig, LovaszSoftmaxConfig, Reduction,
};

// The crate's unit-test generator, shared by path: one set of constants for both.
#[path = "../src/test_rng.rs"]
mod test_rng;

type Result<T> = anyhow::Result<T>;

const DEV: Device = Device::Cpu;

fn cfg(classes: Classes, per_image: bool) -> LovaszSoftmaxConfig {
    LovaszSoftmaxConfig {
        classes,
        per_image,
        ignore_index: Some(255),
        ..Default::default()
    }
}

fn probas(b: usize, c: usize, h: usize, w: usize, seed: u64) -> Result<Tensor> {
    // Deterministic, tie-free values without an RNG dependency.
    let n = b * c * h * w;
    let v: Vec<f32> = (0..n)
        .map(|i| {
            ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 1000.0
                + 0.0003 * i as f32 / n as f32
        })
        .collect();
    let logits = Tensor::from_vec(v, (b, c, h, w), &DEV)?;
    Ok(candle_nn::ops::softmax(&(logits * 4.0)?, 1)?)
}

/// Loss value and gradient w.r.t. `x`.
fn value_and_grad(
    x: &Tensor,
    f: impl Fn(&Tensor) -> candle::Result<Tensor>,
) -> Result<(f64, Tensor)> {
    let var = Var::from_tensor(x)?;
    let loss = f(var.as_tensor())?;
    let grads = loss.backward()?;
    let grad = match grads.get(&var) {
        Some(g) => g.clone(),
        None => x.zeros_like()?,
    };
    Ok((loss.to_dtype(DType::F64)?.to_scalar()?, grad))
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar()?)
}

#[test]
fn all_void_gives_zero_with_zero_gradient() -> Result<()> {
    let p = probas(2, 3, 4, 4, 1)?;
    let labels = Tensor::full(255u32, (2, 4, 4), &DEV)?;
    for classes in [Classes::All, Classes::Present, Classes::List(vec![0, 2])] {
        for per_image in [false, true] {
            let (v, g) = value_and_grad(&p, |x| {
                lovasz_softmax(x, &labels, &cfg(classes.clone(), per_image))
            })?;
            assert_eq!(v, 0.0);
            assert_eq!(max_abs(&g)?, 0.0);
        }
    }
    let logits = p.narrow(1, 0, 1)?.squeeze(1)?;
    for per_image in [false, true] {
        let hcfg = LovaszHingeConfig {
            per_image,
            ignore_index: Some(255),
            ..Default::default()
        };
        let (v, g) = value_and_grad(&logits, |x| lovasz_hinge(x, &labels, &hcfg))?;
        assert_eq!((v, max_abs(&g)?), (0.0, 0.0));
        let scfg = LovaszSigmoidConfig {
            per_image,
            ignore_index: Some(255),
            ..Default::default()
        };
        let (v, g) = value_and_grad(&logits, |x| lovasz_sigmoid(x, &labels, &scfg))?;
        assert_eq!((v, max_abs(&g)?), (0.0, 0.0));
    }
    let (v, g) = value_and_grad(&logits, |x| binary_xloss(x, &labels, Some(255)))?;
    assert_eq!((v, max_abs(&g)?), (0.0, 0.0));
    let ce = CrossEntropyConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    let (v, g) = value_and_grad(&p, |x| cross_entropy(x, &labels, &ce))?;
    assert_eq!((v, max_abs(&g)?), (0.0, 0.0));
    Ok(())
}

#[test]
fn void_image_counts_as_zero_in_the_per_image_mean() -> Result<()> {
    let p = probas(2, 3, 2, 2, 2)?;
    let l0 = Tensor::new(&[[[0u32, 1], [2, 1]]], &DEV)?;
    let both = Tensor::cat(&[&l0, &Tensor::full(255u32, (1, 2, 2), &DEV)?], 0)?;
    let c = cfg(Classes::Present, true);
    let alone = lovasz_softmax(&p.narrow(0, 0, 1)?, &l0, &c)?.to_scalar::<f32>()?;
    let mixed = lovasz_softmax(&p, &both, &c)?.to_scalar::<f32>()?;
    assert!((mixed - alone / 2.0).abs() < 1e-6, "{mixed} vs {alone}/2");
    Ok(())
}

#[test]
fn single_pixels() -> Result<()> {
    // One pixel in total, of class 1, probability 0.3 for it: error 0.7 with weight 1.
    let p = Tensor::new(&[[[0.7f32], [0.3]]], &DEV)?; // [1, 2, 1]
    let l = Tensor::new(&[[1u32]], &DEV)?;
    let v = lovasz_softmax(&p, &l, &cfg(Classes::Present, false))?.to_scalar::<f32>()?;
    assert!((v - 0.7).abs() < 1e-6);
    // All classes: class 0 is absent and contributes its largest error, 0.7.
    let v = lovasz_softmax(&p, &l, &cfg(Classes::All, false))?.to_scalar::<f32>()?;
    assert!((v - 0.7).abs() < 1e-6);
    // One valid pixel among void ones.
    let p = probas(1, 3, 2, 2, 3)?;
    let l = Tensor::new(&[[[255u32, 2], [255, 255]]], &DEV)?;
    let v = lovasz_softmax(&p, &l, &cfg(Classes::Present, true))?.to_scalar::<f32>()?;
    let p2 = p.get(0)?.get(2)?.get(0)?.get(1)?.to_scalar::<f32>()?;
    assert!((v - (1.0 - p2)).abs() < 1e-6);
    Ok(())
}

#[test]
fn empty_class_list_and_absent_classes() -> Result<()> {
    let p = probas(2, 4, 3, 3, 4)?;
    let l = Tensor::zeros((2, 3, 3), DType::U32, &DEV)?; // only class 0 present
    let (v, g) = value_and_grad(&p, |x| {
        lovasz_softmax(x, &l, &cfg(Classes::List(vec![]), false))
    })?;
    assert_eq!((v, max_abs(&g)?), (0.0, 0.0));
    let present = lovasz_softmax(&p, &l, &cfg(Classes::Present, false))?.to_scalar::<f32>()?;
    let only0 = lovasz_softmax(&p, &l, &cfg(Classes::List(vec![0]), false))?.to_scalar::<f32>()?;
    assert!((present - only0).abs() < 1e-7);
    // Absent classes under `All`: each contributes the largest probability of that class.
    let all = lovasz_softmax(&p, &l, &cfg(Classes::All, false))?.to_scalar::<f32>()?;
    let mut expected = only0;
    for c in 1..4 {
        expected += p
            .narrow(1, c, 1)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
    }
    assert!(
        (all - expected / 4.0).abs() < 1e-6,
        "{all} vs {}",
        expected / 4.0
    );
    Ok(())
}

#[test]
fn one_class_and_one_image() -> Result<()> {
    let p = Tensor::new(&[[[0.9f32, 0.4, 0.6]]], &DEV)?; // B = 1, C = 1
    let l = Tensor::zeros((1, 3), DType::U8, &DEV)?;
    // Errors 0.1, 0.6, 0.4 all on foreground (G = 3): weights 1/3 each.
    let v = lovasz_softmax(&p, &l, &LovaszSoftmaxConfig::default())?.to_scalar::<f32>()?;
    assert!((v - 1.1 / 3.0).abs() < 1e-6);
    Ok(())
}

#[test]
fn labels_of_every_integer_dtype_agree() -> Result<()> {
    let p = probas(2, 3, 3, 3, 5)?;
    let l = Tensor::from_vec(
        (0..18u32).map(|i| i % 3).collect::<Vec<_>>(),
        (2, 3, 3),
        &DEV,
    )?;
    let reference = lovasz_softmax(&p, &l, &cfg(Classes::Present, false))?.to_scalar::<f32>()?;
    for dt in [DType::U8, DType::I64] {
        let v = lovasz_softmax(&p, &l.to_dtype(dt)?, &cfg(Classes::Present, false))?
            .to_scalar::<f32>()?;
        assert_eq!(v, reference);
    }
    Ok(())
}

#[test]
fn half_precision_inputs_match_f32() -> Result<()> {
    let p = probas(2, 4, 8, 8, 6)?;
    let l = Tensor::from_vec(
        (0..128u32).map(|i| (i * 7) % 4).collect::<Vec<_>>(),
        (2, 8, 8),
        &DEV,
    )?;
    let c = cfg(Classes::Present, true);
    let (v32, _) = value_and_grad(&p, |x| lovasz_softmax(x, &l, &c))?;
    for dt in [DType::F16, DType::BF16] {
        let ph = p.to_dtype(dt)?;
        let var = Var::from_tensor(&ph)?;
        let loss = lovasz_softmax(var.as_tensor(), &l, &c)?;
        assert_eq!(loss.dtype(), DType::F32, "half inputs give an f32 loss");
        let g = loss
            .backward()?
            .get(&var)
            .expect("gradient")
            .to_dtype(DType::F32)?;
        let v = loss.to_scalar::<f32>()? as f64;
        // Rounding the probabilities to 8 (bf16) or 11 (f16) bits moves each error by at
        // most 2^-8 relative, and the loss is a weighted mean of errors.
        assert!((v - v32).abs() < 1e-2, "{dt:?}: {v} vs {v32}");
        // Rounding may reorder near-tied errors, so the gradient is compared with the f32
        // gradient at the rounded probabilities, which it must equal up to the cast.
        let rounded = ph.to_dtype(DType::F32)?;
        let (_, g_rounded) = value_and_grad(&rounded, |x| lovasz_softmax(x, &l, &c))?;
        let tol = if dt == DType::F16 { 1e-3 } else { 1e-2 };
        assert!(
            max_abs(&(g - &g_rounded)?)? <= tol * max_abs(&g_rounded)?,
            "{dt:?} gradient"
        );
    }
    Ok(())
}

#[test]
fn nan_input_gives_nan_loss() -> Result<()> {
    let mut v = probas(1, 2, 2, 2, 7)?.flatten_all()?.to_vec1::<f32>()?;
    v[3] = f32::NAN;
    let p = Tensor::from_vec(v, (1, 2, 2, 2), &DEV)?;
    let l = Tensor::new(&[[[0u32, 1], [1, 0]]], &DEV)?;
    assert!(lovasz_softmax(&p, &l, &cfg(Classes::Present, false))?
        .to_scalar::<f32>()?
        .is_nan());
    let x = p.narrow(1, 0, 1)?.squeeze(1)?;
    assert!(lovasz_hinge(&x, &l, &LovaszHingeConfig::default())?
        .to_scalar::<f32>()?
        .is_nan());
    assert!(lovasz_sigmoid(&x, &l, &LovaszSigmoidConfig::default())?
        .to_scalar::<f32>()?
        .is_nan());
    Ok(())
}

#[test]
fn weights_reproduce_the_loss() -> Result<()> {
    let p = probas(3, 4, 5, 5, 8)?;
    let lv: Vec<u32> = (0..75u32)
        .map(|i| if i % 11 == 0 { 255 } else { (i * 5) % 4 })
        .collect();
    let l = Tensor::from_vec(lv, (3, 5, 5), &DEV)?;
    let onehot = l
        .unsqueeze(1)?
        .broadcast_eq(&Tensor::arange(0u32, 4, &DEV)?.reshape((1, 4, 1, 1))?)?
        .to_dtype(DType::F32)?;
    for per_image in [false, true] {
        for classes in [Classes::All, Classes::Present, Classes::List(vec![1, 3, 3])] {
            let mut c = cfg(classes, per_image);
            c.class_weights = Some(vec![1.0, 2.0, 0.5, 1.5]);
            let w = lovasz_softmax_weights(&p, &l, &c)?;
            assert_eq!(w.dims(), p.dims());
            let via_w = (w * (&onehot - &p)?.abs()?)?
                .sum_all()?
                .to_scalar::<f32>()?;
            let loss = lovasz_softmax(&p, &l, &c)?.to_scalar::<f32>()?;
            assert!((via_w - loss).abs() < 1e-5, "{via_w} vs {loss}");
        }
    }
    Ok(())
}

#[test]
fn class_weights_give_a_weighted_mean() -> Result<()> {
    let p = probas(2, 3, 4, 4, 9)?;
    let l = Tensor::from_vec(
        (0..32u32).map(|i| i % 3).collect::<Vec<_>>(),
        (2, 4, 4),
        &DEV,
    )?;
    let per_class: Vec<f32> = (0..3)
        .map(|c| lovasz_softmax(&p, &l, &cfg(Classes::List(vec![c]), false))?.to_scalar::<f32>())
        .collect::<candle::Result<_>>()?;
    let mut c = cfg(Classes::Present, false);
    c.class_weights = Some(vec![1.0, 3.0, 0.0]);
    let v = lovasz_softmax(&p, &l, &c)?.to_scalar::<f32>()?;
    assert!((v - (per_class[0] + 3.0 * per_class[1]) / 4.0).abs() < 1e-6);
    Ok(())
}

#[test]
fn reductions_over_images() -> Result<()> {
    let p = probas(3, 2, 4, 4, 10)?;
    let l = Tensor::from_vec(
        (0..48u32).map(|i| (i / 3) % 2).collect::<Vec<_>>(),
        (3, 4, 4),
        &DEV,
    )?;
    let mut c = cfg(Classes::Present, true);
    c.reduction = Reduction::None;
    let per = lovasz_softmax(&p, &l, &c)?;
    assert_eq!(per.dims(), &[3]);
    let per = per.to_vec1::<f32>()?;
    for (b, v) in per.iter().enumerate() {
        let single = lovasz_softmax(
            &p.narrow(0, b, 1)?,
            &l.narrow(0, b, 1)?,
            &cfg(Classes::Present, true),
        )?;
        assert!((single.to_scalar::<f32>()? - v).abs() < 1e-6);
    }
    c.reduction = Reduction::Sum;
    let sum = lovasz_softmax(&p, &l, &c)?.to_scalar::<f32>()?;
    assert!((sum - per.iter().sum::<f32>()).abs() < 1e-5);
    Ok(())
}

#[test]
fn with_logits_and_nd_inputs() -> Result<()> {
    // 3-D volumes [B, C, D, H, W] and inputs without spatial dims [B, C] both work.
    let logits = Tensor::randn(0f32, 1., (2, 3, 2, 3, 4), &DEV)?;
    let l = Tensor::from_vec(
        (0..48u32).map(|i| i % 3).collect::<Vec<_>>(),
        (2, 2, 3, 4),
        &DEV,
    )?;
    let c = cfg(Classes::Present, false);
    let a = lovasz_softmax_with_logits(&logits, &l, &c)?.to_scalar::<f32>()?;
    let b = lovasz_softmax(&candle_nn::ops::softmax(&logits, 1)?, &l, &c)?.to_scalar::<f32>()?;
    assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    let (_, g) = value_and_grad(&logits, |x| lovasz_softmax_with_logits(x, &l, &c))?;
    assert!(max_abs(&g)? > 0.0, "gradient reaches the logits");
    let flat = lovasz_softmax(
        &Tensor::new(&[[0.2f32, 0.8], [0.6, 0.4]], &DEV)?,
        &Tensor::new(&[1u32, 0], &DEV)?,
        &c,
    )?;
    assert!(flat.to_scalar::<f32>()?.is_finite());
    Ok(())
}

#[test]
fn multilabel_hinge_is_the_channel_mean() -> Result<()> {
    let x = Tensor::randn(0f32, 1., (2, 3, 4, 4), &DEV)?;
    let y = Tensor::from_vec(
        (0..96u32).map(|i| (i * 7 / 3) % 2).collect::<Vec<_>>(),
        (2, 3, 4, 4),
        &DEV,
    )?;
    let c = LovaszHingeConfig::default();
    let v = lovasz_hinge_multilabel(&x, &y, &c)?.to_scalar::<f32>()?;
    let mut mean = 0.0;
    for ch in 0..3 {
        let xc = x.narrow(1, ch, 1)?.squeeze(1)?;
        let yc = y.narrow(1, ch, 1)?.squeeze(1)?;
        mean += lovasz_hinge(&xc, &yc, &c)?.to_scalar::<f32>()? / 3.0;
    }
    assert!((v - mean).abs() < 1e-6);
    Ok(())
}

#[test]
fn cross_entropy_matches_a_direct_computation() -> Result<()> {
    let logits = Tensor::randn(0f64, 1., (2, 3, 2, 2), &DEV)?;
    let lv = [0u32, 2, 255, 1, 1, 1, 0, 2];
    let l = Tensor::from_vec(lv.to_vec(), (2, 2, 2), &DEV)?;
    let w = [0.5f32, 2.0, 1.0];
    let cfg = CrossEntropyConfig {
        ignore_index: Some(255),
        class_weights: Some(w.to_vec()),
        ..Default::default()
    };
    let got = cross_entropy(&logits, &l, &cfg)?.to_scalar::<f64>()?;
    let lp = candle_nn::ops::log_softmax(&logits, 1)?
        .reshape((2, 3, 4))?
        .to_vec3::<f64>()?;
    let (mut num, mut den) = (0.0, 0.0);
    for (k, &y) in lv.iter().enumerate() {
        if y == 255 {
            continue;
        }
        let (b, i) = (k / 4, k % 4);
        num -= w[y as usize] as f64 * lp[b][y as usize][i];
        den += w[y as usize] as f64;
    }
    assert!((got - num / den).abs() < 1e-12);
    Ok(())
}

#[test]
fn lovasz_grad_of_empty_input_is_empty() -> Result<()> {
    let g = lovasz_grad(&Tensor::zeros(0, DType::U32, &DEV)?)?;
    assert_eq!(g.dims(), &[0]);
    Ok(())
}

fn err_text<T: std::fmt::Debug>(r: candle::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_are_clear_errors() -> Result<()> {
    let p = probas(2, 3, 2, 2, 11)?;
    let l = Tensor::zeros((2, 2, 2), DType::U32, &DEV)?;
    let c = cfg(Classes::Present, false);
    let cases: Vec<(String, &str)> = vec![
        (
            err_text(lovasz_softmax(
                &p,
                &Tensor::full(3u32, (2, 2, 2), &DEV)?,
                &c,
            )),
            "out of range",
        ),
        (
            err_text(lovasz_softmax(
                &p,
                &Tensor::full(-1i64, (2, 2, 2), &DEV)?,
                &c,
            )),
            "label -1",
        ),
        (
            err_text(lovasz_softmax(
                &p,
                &Tensor::zeros((2, 2, 3), DType::U32, &DEV)?,
                &c,
            )),
            "shape mismatch",
        ),
        (
            err_text(lovasz_softmax(
                &p,
                &Tensor::zeros((2, 2), DType::U32, &DEV)?,
                &c,
            )),
            "shape mismatch",
        ),
        (
            err_text(lovasz_softmax(&p, &l.to_dtype(DType::F32)?, &c)),
            "integer dtype",
        ),
        (
            err_text(lovasz_softmax(&p.to_dtype(DType::U32)?, &l, &c)),
            "f16, bf16, f32 or f64",
        ),
        (
            err_text(lovasz_softmax(
                &Tensor::zeros((2, 3, 0), DType::F32, &DEV)?,
                &Tensor::zeros((2, 0), DType::U32, &DEV)?,
                &c,
            )),
            "empty input",
        ),
        (
            err_text(lovasz_softmax(&Tensor::zeros(3, DType::F32, &DEV)?, &l, &c)),
            "[B, C, *spatial]",
        ),
        (
            err_text(lovasz_softmax(
                &p,
                &l,
                &LovaszSoftmaxConfig {
                    class_weights: Some(vec![1.0; 2]),
                    ..c.clone()
                },
            )),
            "class_weights has 2 values",
        ),
        (
            err_text(lovasz_softmax(
                &p,
                &l,
                &LovaszSoftmaxConfig {
                    class_weights: Some(vec![1.0, -1.0, 1.0]),
                    ..c.clone()
                },
            )),
            "finite and >= 0",
        ),
        (
            err_text(lovasz_softmax(
                &p,
                &l,
                &cfg(Classes::List(vec![0, 5]), false),
            )),
            "class 5",
        ),
        (
            err_text(lovasz_hinge(
                &p.get(0)?,
                &Tensor::full(2u32, (3, 2, 2), &DEV)?,
                &LovaszHingeConfig::default(),
            )),
            "out of range",
        ),
        (
            err_text(lovasz_hinge(&p.get(0)?, &l, &LovaszHingeConfig::default())),
            "shape mismatch",
        ),
        (
            err_text(lovasz_sigmoid(
                &p.get(0)?,
                &Tensor::full(7u8, (3, 2, 2), &DEV)?,
                &LovaszSigmoidConfig::default(),
            )),
            "label 7",
        ),
        (
            err_text(binary_xloss(
                &p,
                &Tensor::full(2u32, (2, 3, 2, 2), &DEV)?,
                None,
            )),
            "out of range",
        ),
        (
            err_text(cross_entropy(
                &p,
                &Tensor::full(9u32, (2, 2, 2), &DEV)?,
                &CrossEntropyConfig::default(),
            )),
            "label 9",
        ),
        (
            err_text(lovasz_grad(&Tensor::new(&[0.5f32], &DEV)?)),
            "0 or 1",
        ),
        (
            err_text(iou(
                &l,
                &Tensor::zeros((2, 2), DType::U32, &DEV)?,
                3,
                &IouConfig::default(),
            )),
            "shape mismatch",
        ),
        (
            err_text(ConfusionMatrix::new(2, None).update(
                &Tensor::full(2u32, (2, 2), &DEV)?,
                &Tensor::zeros((2, 2), DType::U32, &DEV)?,
            )),
            "preds: label 2",
        ),
    ];
    for (msg, needle) in cases {
        assert!(
            msg.contains(needle),
            "error {msg:?} should mention {needle:?}"
        );
    }
    Ok(())
}

#[test]
fn cpu_and_device_paths_agree_on_large_inputs() -> Result<()> {
    // Large enough for the radix sort (groups of more than 2048 pixels).
    let p = probas(3, 4, 40, 40, 12)?;
    let lv: Vec<u32> = (0..4800u32)
        .map(|i| {
            if i % 13 == 0 {
                255
            } else {
                (i * 7 + i / 40) % 4
            }
        })
        .collect();
    let l = Tensor::from_vec(lv, (3, 40, 40), &DEV)?;
    for per_image in [false, true] {
        let c = cfg(Classes::Present, per_image);
        let (v_cpu, g_cpu) = value_and_grad(&p, |x| lovasz_softmax(x, &l, &c))?;
        lovasz_candle::force_host_copy(true);
        let device_path = value_and_grad(&p, |x| lovasz_softmax(x, &l, &c));
        lovasz_candle::force_host_copy(false);
        let (v_dev, g_dev) = device_path?;
        assert!((v_cpu - v_dev).abs() < 1e-6, "{v_cpu} vs {v_dev}");
        assert_eq!(max_abs(&(g_cpu - g_dev)?)?, 0.0);
    }
    Ok(())
}

#[test]
fn the_first_bad_label_in_pixel_order_is_reported() -> Result<()> {
    // Labels are checked in parallel chunks; the error must name the first bad pixel.
    let n = 200_000;
    let mut lv = vec![1u32; n];
    lv[150_000] = 9;
    lv[70_001] = 7;
    let l = Tensor::from_vec(lv, (1, n), &DEV)?;
    let p = Tensor::full(0.5f32, (1, 2, n), &DEV)?;
    for threads in [1, 2, 4] {
        let err = on_threads(threads, || {
            lovasz_softmax(&p, &l, &cfg(Classes::Present, false)).unwrap_err()
        })
        .to_string();
        assert!(
            err.contains("label 7 at flat position 70001"),
            "{threads} threads: {err}"
        );
    }
    Ok(())
}

/// Runs `f` on a rayon pool of `threads` threads.
fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool")
        .install(f)
}

/// Values in `[0, 1)` from the unit tests' generator started at `seed`.
fn uniform_stream(seed: u64) -> impl FnMut() -> f32 {
    let mut rng = test_rng::Lcg(seed);
    move || rng.next_f32()
}

#[test]
fn one_job_split_over_threads_gives_the_serial_result_bit_for_bit() -> Result<()> {
    // Fewer (group, class) jobs than threads splits each job's key building, sort and walk
    // over the threads; with one thread the same job runs serially. 3 x 200 x 300 pixels
    // in one group is several pieces of 2^16 keys. Void pixels and hinge errors <= 0 make
    // the pieces uneven.
    let (b, h, w) = (3, 200, 300);
    let n = b * h * w;
    let mut next = uniform_stream(99);
    let logits: Vec<f32> = (0..n).map(|_| 3.0 * next() - 1.0).collect();
    let labels: Vec<u32> = (0..n)
        .map(|i| {
            if i % 17 == 0 {
                255
            } else {
                u32::from(next() < 0.3)
            }
        })
        .collect();
    let x = Tensor::from_vec(logits, (b, h, w), &DEV)?;
    let l = Tensor::from_vec(labels, (b, h, w), &DEV)?;
    let hinge = LovaszHingeConfig {
        per_image: false,
        ignore_index: Some(255),
        ..Default::default()
    };
    let sigmoid = LovaszSigmoidConfig {
        per_image: false,
        ignore_index: Some(255),
        ..Default::default()
    };
    assert_same_on_1_2_3_threads(|| {
        let mut all = Vec::new();
        // f32 keys take the radix sort, f64 keys a comparison sort.
        for dtype in [DType::F32, DType::F64] {
            let x = x.to_dtype(dtype)?;
            let p = candle_nn::ops::sigmoid(&x)?;
            all.push(value_and_grad_bits(&x, |t| lovasz_hinge(t, &l, &hinge))?.1);
            all.push(value_and_grad_bits(&p, |t| lovasz_sigmoid(t, &l, &sigmoid))?.1);
        }
        Ok(all)
    })
}

/// [`value_and_grad`], with the bits of the value and of the gradient (as f64) in one
/// vector, to compare runs exactly.
fn value_and_grad_bits(
    x: &Tensor,
    f: impl Fn(&Tensor) -> candle::Result<Tensor>,
) -> Result<(f64, Vec<u64>)> {
    let (v, g) = value_and_grad(x, f)?;
    let mut bits = vec![v.to_bits()];
    let g = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    bits.extend(g.iter().map(|g| g.to_bits()));
    Ok((v, bits))
}

/// Runs `f` on rayon pools of 1, 2 and 3 threads and checks that the three results are
/// the same.
fn assert_same_on_1_2_3_threads(f: impl Fn() -> Result<Vec<Vec<u64>>> + Sync) -> Result<()> {
    let serial = on_threads(1, &f)?;
    for threads in [2, 3] {
        assert!(
            serial == on_threads(threads, &f)?,
            "{threads} threads differ from one"
        );
    }
    Ok(())
}

/// The Lovász extension of the Jaccard loss of one group from its sorted errors
/// (decreasing), `Σ max(e_k, 0) (J_k - J_(k-1))` with `J_k = 1 - (G - f_k) / (G + b_k)`.
fn lovasz_by_sorting(mut errors: Vec<(f64, bool)>) -> f64 {
    errors.sort_by(|a, b| b.0.total_cmp(&a.0));
    let gts = errors.iter().filter(|e| e.1).count() as f64;
    let (mut f, mut b, mut prev, mut loss) = (0.0, 0.0, 0.0, 0.0);
    for (e, fg) in errors {
        if fg {
            f += 1.0;
        } else {
            b += 1.0;
        }
        let j = 1.0 - (gts - f) / (gts + b);
        loss += e.max(0.0) * (j - prev);
        prev = j;
    }
    loss
}

#[test]
fn pruned_split_job_matches_the_definition_and_the_serial_result() -> Result<()> {
    // One group of 3 x 200 x 300 pixels (a job split over threads) whose foreground
    // errors all exceed 0.3 (sigmoid) or 0.5 (hinge): a quarter to a third of the
    // background pixels have smaller errors, weight 0, and are left out of the sort.
    let (b, h, w) = (3, 200, 300);
    let n = b * h * w;
    let mut next = uniform_stream(5);
    let labels: Vec<u32> = (0..n)
        .map(|i| match i % 19 {
            0 => 255,
            r => u32::from(r % 3 == 0),
        })
        .collect();
    let u: Vec<f32> = (0..n).map(|_| next()).collect();
    let probas: Vec<f32> = (u.iter().zip(&labels))
        .map(|(&u, &l)| if l == 1 { 0.7 * u } else { u })
        .collect();
    let logits: Vec<f32> = (u.iter().zip(&labels))
        .map(|(&u, &l)| if l == 1 { 1.5 * u - 1.0 } else { 2.0 * u - 1.0 })
        .collect();
    let valid = |i: &usize| labels[*i] != 255;
    let want_sigmoid = lovasz_by_sorting(
        (0..n)
            .filter(valid)
            .map(|i| {
                let fg = labels[i] == 1;
                // The errors in f32, as the kernel takes them.
                let p = probas[i];
                (f64::from(if fg { 1.0 - p } else { p }), fg)
            })
            .collect(),
    );
    let hinge_errors = |logits: &[f32]| -> Vec<(f64, bool)> {
        (0..n)
            .filter(valid)
            .map(|i| {
                let fg = labels[i] == 1;
                let x = logits[i];
                (f64::from(if fg { 1.0 - x } else { 1.0 + x }), fg)
            })
            .collect()
    };
    let want_hinge = lovasz_by_sorting(hinge_errors(&logits));
    // One foreground pixel (3, outside the kernel's sample of every 175th pixel) with a
    // hinge error below 0: it has no key, comes after every positive error, and so no
    // background key may be left out.
    let mut dropped = logits.clone();
    assert_eq!(labels[3], 1);
    dropped[3] = 1.5;
    let want_dropped = lovasz_by_sorting(hinge_errors(&dropped));
    let l = Tensor::from_vec(labels.clone(), (b, h, w), &DEV)?;
    let p = Tensor::from_vec(probas, (b, h, w), &DEV)?;
    let x = Tensor::from_vec(logits, (b, h, w), &DEV)?;
    let x2 = Tensor::from_vec(dropped, (b, h, w), &DEV)?;
    let sigmoid = LovaszSigmoidConfig {
        per_image: false,
        ignore_index: Some(255),
        ..Default::default()
    };
    let hinge = LovaszHingeConfig {
        per_image: false,
        ignore_index: Some(255),
        ..Default::default()
    };
    assert_same_on_1_2_3_threads(|| {
        let (sv, s_bits) = value_and_grad_bits(&p, |t| lovasz_sigmoid(t, &l, &sigmoid))?;
        let (hv, h_bits) = value_and_grad_bits(&x, |t| lovasz_hinge(t, &l, &hinge))?;
        let (dv, d_bits) = value_and_grad_bits(&x2, |t| lovasz_hinge(t, &l, &hinge))?;
        // The values are f32: the kernel's f64 sums rounded once.
        assert!(
            (sv - want_sigmoid).abs() < 2e-7,
            "sigmoid {sv} vs {want_sigmoid}"
        );
        assert!((hv - want_hinge).abs() < 2e-7, "hinge {hv} vs {want_hinge}");
        assert!((dv - want_dropped).abs() < 2e-7, "{dv} vs {want_dropped}");
        Ok(vec![s_bits, h_bits, d_bits])
    })
}

/// Checks that the Lovász-Softmax (present classes, per batch) of `p` is NaN on the CPU
/// path and on the host-copy path of other devices.
fn assert_softmax_nan_on_both_paths(p: &Tensor, l: &Tensor) -> Result<()> {
    for forced in [false, true] {
        lovasz_candle::force_host_copy(forced);
        let loss = lovasz_softmax(p, l, &cfg(Classes::Present, false));
        lovasz_candle::force_host_copy(false);
        assert!(
            loss?.to_scalar::<f32>()?.is_nan(),
            "host copy forced: {forced}"
        );
    }
    Ok(())
}

#[test]
fn nan_where_no_job_reads_or_in_a_split_job_gives_nan() -> Result<()> {
    // Class 2 is absent and `Classes::Present` skips it: no job reads its channel.
    let mut v = probas(1, 3, 2, 2, 5)?.flatten_all()?.to_vec1::<f32>()?;
    v[2 * 4 + 1] = f32::NAN;
    let p = Tensor::from_vec(v, (1, 3, 2, 2), &DEV)?;
    let l = Tensor::new(&[[[0u32, 1], [1, 0]]], &DEV)?;
    assert_softmax_nan_on_both_paths(&p, &l)?;
    // One job of 180,000 pixels split over threads, NaN in its last piece.
    let n = 180_000;
    let mut x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 / 7.0 - 0.5).collect();
    x[n - 10] = f32::NAN;
    let x = Tensor::from_vec(x, (3, 200, 300), &DEV)?;
    let l = Tensor::from_vec((0..n as u32).map(|i| i % 2).collect(), (3, 200, 300), &DEV)?;
    let hinge = LovaszHingeConfig {
        per_image: false,
        ignore_index: None,
        ..Default::default()
    };
    let loss = on_threads(2, || lovasz_hinge(&x, &l, &hinge))?;
    assert!(loss.to_scalar::<f32>()?.is_nan());
    Ok(())
}

#[test]
fn nan_at_a_void_pixel_gives_nan_on_both_paths() -> Result<()> {
    let mut v = probas(1, 2, 2, 2, 13)?.flatten_all()?.to_vec1::<f32>()?;
    v[0] = f32::NAN;
    let p = Tensor::from_vec(v, (1, 2, 2, 2), &DEV)?;
    let l = Tensor::new(&[[[255u32, 1], [1, 0]]], &DEV)?;
    assert_softmax_nan_on_both_paths(&p, &l)
}

#[test]
fn per_image_losses_backpropagate_their_own_weights() -> Result<()> {
    let p = probas(3, 2, 4, 4, 14)?;
    let l = Tensor::from_vec(
        (0..48u32).map(|i| (i / 5) % 2).collect::<Vec<_>>(),
        (3, 4, 4),
        &DEV,
    )?;
    let mut c = cfg(Classes::Present, true);
    c.reduction = Reduction::None;
    let scale = Tensor::new(&[1f32, 2., 3.], &DEV)?;
    let (_, g) = value_and_grad(&p, |x| lovasz_softmax(x, &l, &c)?.mul(&scale)?.sum_all())?;
    for b in 0..3 {
        let single = cfg(Classes::Present, true);
        let (_, gb) = value_and_grad(&p.narrow(0, b, 1)?, |x| {
            lovasz_softmax(x, &l.narrow(0, b, 1)?, &single)
        })?;
        let diff = (g.narrow(0, b, 1)? - (gb * (b as f64 + 1.0))?)?;
        assert!(max_abs(&diff)? < 1e-6, "image {b}");
    }
    Ok(())
}

#[test]
fn fused_logits_path_matches_candle_softmax() -> Result<()> {
    let lv: Vec<u32> = (0..1200u32)
        .map(|i| {
            if i % 17 == 0 {
                255
            } else {
                (i * 5 + i / 20) % 5
            }
        })
        .collect();
    let l = Tensor::from_vec(lv, (3, 20, 20), &DEV)?;
    for dtype in [DType::F32, DType::F64] {
        let logits = (probas(3, 5, 20, 20, 15)?.to_dtype(dtype)? * 6.0)?.affine(1.0, -1.0)?;
        for per_image in [false, true] {
            for classes in [Classes::Present, Classes::All] {
                let c = cfg(classes.clone(), per_image);
                let (v_fused, g_fused) =
                    value_and_grad(&logits, |x| lovasz_softmax_with_logits(x, &l, &c))?;
                lovasz_candle::force_host_copy(true);
                let other = value_and_grad(&logits, |x| lovasz_softmax_with_logits(x, &l, &c));
                lovasz_candle::force_host_copy(false);
                let (v_ref, g_ref) = other?;
                assert!(
                    (v_fused - v_ref).abs() < 1e-6,
                    "{dtype:?}: {v_fused} vs {v_ref}"
                );
                let scale = max_abs(&g_ref)?;
                assert!(scale > 0.0);
                let diff =
                    max_abs(&(g_fused.to_dtype(DType::F64)? - g_ref.to_dtype(DType::F64)?)?)?;
                assert!(diff <= 1e-5 * scale, "{dtype:?} {classes:?} per_image={per_image}: gradient differs by {diff} (scale {scale})");
            }
        }
    }
    // NaN logits give a NaN loss on the fused path too.
    let mut v = probas(1, 3, 2, 2, 16)?.flatten_all()?.to_vec1::<f32>()?;
    v[5] = f32::NAN;
    let z = Tensor::from_vec(v, (1, 3, 2, 2), &DEV)?;
    let l = Tensor::new(&[[[0u32, 1], [2, 0]]], &DEV)?;
    assert!(
        lovasz_softmax_with_logits(&z, &l, &cfg(Classes::Present, false))?
            .to_scalar::<f32>()?
            .is_nan()
    );
    Ok(())
}
