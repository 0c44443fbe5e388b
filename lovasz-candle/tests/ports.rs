//! Our side of each difference the guide for PyTorch / TensorFlow users states
//! (`lovasz_candle::guide`): small inputs whose losses follow by hand from Berman et al.,
//! Alg. 1, checked against those hand values.

use candle::{DType, Device, Tensor, Var};
use lovasz_candle::{
    lovasz_hinge, lovasz_hinge_multilabel, lovasz_softmax, lovasz_softmax_with_logits, Classes,
    LovaszHingeConfig, LovaszSoftmaxConfig, Reduction,
};

type Result<T> = anyhow::Result<T>;

const DEV: Device = Device::Cpu;

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar()?)
}

fn assert_near(what: &str, got: f64, want: f64) {
    assert!((got - want).abs() < 1e-6, "{what}: {got}, expected {want}");
}

/// Probabilities `[1, C, P]` from per-pixel rows (`rows[p][c]`).
fn probas(rows: &[&[f32]]) -> Result<Tensor> {
    let (p, c) = (rows.len(), rows[0].len());
    let v: Vec<f32> = (0..c)
        .flat_map(|k| rows.iter().map(move |r| r[k]))
        .collect();
    Ok(Tensor::from_vec(v, (1, c, p), &DEV)?)
}

#[test]
fn absent_classes_under_all_present_and_a_list() -> Result<()> {
    // Labels [0, 0], class-0 probabilities [0.9, 0.6]: class 0 has errors [0.1, 0.4] and
    // weights [1/2, 1/2] (0.25); absent class 1 has errors [0.1, 0.4] and, with no
    // foreground, weight 1 on its largest error (0.4).
    let p = probas(&[&[0.9, 0.1], &[0.6, 0.4]])?;
    let l = Tensor::new(&[[0u32, 0]], &DEV)?;
    let loss = |classes| -> Result<f64> {
        let cfg = LovaszSoftmaxConfig {
            classes,
            per_image: true,
            ..Default::default()
        };
        scalar(&lovasz_softmax(&p, &l, &cfg)?)
    };
    assert_near("present", loss(Classes::Present)?, 0.25);
    assert_near("all", loss(Classes::All)?, 0.325);
    assert_near(
        "list [1]: absent, still counted",
        loss(Classes::List(vec![1]))?,
        0.4,
    );
    Ok(())
}

/// Four pixels of three classes, class 2 absent: per-class losses
/// `L = [0.316667, 0.55, 0.40]`.
fn three_classes() -> Result<(Tensor, Tensor)> {
    let p = probas(&[
        &[0.8, 0.1, 0.1],
        &[0.6, 0.3, 0.1],
        &[0.3, 0.5, 0.2],
        &[0.2, 0.4, 0.4],
    ])?;
    Ok((p, Tensor::new(&[[0u32, 0, 1, 1]], &DEV)?))
}

#[test]
fn class_weights_are_a_weighted_mean_and_convert_to_mmsegs() -> Result<()> {
    let (p, l) = three_classes()?;
    let loss = |classes, class_weights| -> Result<f64> {
        let cfg = LovaszSoftmaxConfig {
            classes,
            class_weights,
            ..Default::default()
        };
        scalar(&lovasz_softmax(&p, &l, &cfg)?)
    };
    let (l0, l1, l2) = (0.95 / 3.0, 0.55, 0.40);
    assert_near("class 0 alone", loss(Classes::List(vec![0]), None)?, l0);
    assert_near("class 1 alone", loss(Classes::List(vec![1]), None)?, l1);
    assert_near(
        "class 2 alone (absent)",
        loss(Classes::List(vec![2]), None)?,
        l2,
    );
    assert_near("present", loss(Classes::Present, None)?, (l0 + l1) / 2.0);
    assert_near("all", loss(Classes::All, None)?, (l0 + l1 + l2) / 3.0);
    assert_near(
        "list [0, 2]",
        loss(Classes::List(vec![0, 2]), None)?,
        (l0 + l2) / 2.0,
    );
    // Ours: Σ w_c L_c / Σ w_c over the counted classes.
    let w = Some(vec![1.0, 2.0, 3.0]);
    let present = loss(Classes::Present, w.clone())?;
    assert_near("weighted, present", present, (l0 + 2.0 * l1) / 3.0);
    let all = loss(Classes::All, w)?;
    assert_near("weighted, all", all, (l0 + 2.0 * l1 + 3.0 * l2) / 6.0);
    // mmseg's Σ w_c L_c / |K| is ours times Σ_K w_c / |K|, as the guide says.
    assert_near("mmseg, present", present * 3.0 / 2.0, (l0 + 2.0 * l1) / 2.0);
    assert_near(
        "mmseg, all",
        all * 6.0 / 3.0,
        (l0 + 2.0 * l1 + 3.0 * l2) / 3.0,
    );
    Ok(())
}

#[test]
fn hinge_per_image_and_per_batch() -> Result<()> {
    // Image 0: logits [1, -1], labels [1, 1] (loss 1); image 1: logits [0, 0], labels
    // [0, 0] (loss 1). Pooled: errors [2, 1, 1, 0], weights [1/2, 1/6, 1/12, 1/4].
    let x = Tensor::new(&[[1f32, -1.0], [0.0, 0.0]], &DEV)?;
    let l = Tensor::new(&[[1u32, 1], [0, 0]], &DEV)?;
    let hinge = |per_image| -> Result<f64> {
        let cfg = LovaszHingeConfig {
            per_image,
            ..Default::default()
        };
        scalar(&lovasz_hinge(&x, &l, &cfg)?)
    };
    assert!(
        LovaszHingeConfig::default().per_image,
        "per image by default"
    );
    assert_near("per image", hinge(true)?, 1.0);
    assert_near("per batch", hinge(false)?, 1.25);
    Ok(())
}

#[test]
fn an_all_void_image_counts_zero_in_the_per_image_mean() -> Result<()> {
    let x = Tensor::new(&[[1f32, -1.0], [0.5, 2.0]], &DEV)?;
    let l = Tensor::new(&[[1u32, 1], [255, 255]], &DEV)?;
    let cfg = LovaszHingeConfig {
        per_image: true,
        ignore_index: Some(255),
        ..Default::default()
    };
    assert_near("hinge", scalar(&lovasz_hinge(&x, &l, &cfg)?)?, 0.5);
    // The same for the softmax (the authors' PyTorch code fails on such an image).
    let p = Tensor::new(
        &[[[0.9f32, 0.6], [0.1, 0.4]], [[0.5, 0.5], [0.5, 0.5]]],
        &DEV,
    )?;
    let l = Tensor::new(&[[0u32, 0], [255, 255]], &DEV)?;
    let cfg = LovaszSoftmaxConfig {
        per_image: true,
        ignore_index: Some(255),
        ..Default::default()
    };
    let var = Var::from_tensor(&p)?;
    let loss = lovasz_softmax(var.as_tensor(), &l, &cfg)?;
    assert_near("softmax", scalar(&loss)?, 0.25 / 2.0);
    let grad = loss.backward()?.get(&var).cloned().expect("a gradient");
    let void_image: Vec<f32> = grad.get(1)?.flatten_all()?.to_vec1()?;
    assert!(void_image.iter().all(|&g| g == 0.0), "{void_image:?}");
    Ok(())
}

#[test]
fn one_valid_pixel_is_the_loss_of_that_pixel() -> Result<()> {
    // The authors' code indexes with `valid.nonzero().squeeze()`, a 0-d index for one
    // valid pixel; here it is that pixel's error for its class.
    let p = probas(&[&[0.7, 0.3], &[0.5, 0.5]])?;
    let l = Tensor::new(&[[1u32, 255]], &DEV)?;
    let cfg = LovaszSoftmaxConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    assert_near("one pixel", scalar(&lovasz_softmax(&p, &l, &cfg)?)?, 0.7);
    Ok(())
}

#[test]
fn a_label_outside_the_classes_needs_ignore_index() -> Result<()> {
    // With `ignore=None` the authors' code counts label 255 as background of every class;
    // here it is an error until `ignore_index` names it.
    let p = probas(&[&[0.7, 0.3], &[0.4, 0.6], &[0.5, 0.5]])?;
    let l = Tensor::new(&[[0u32, 1, 255]], &DEV)?;
    let err = match lovasz_softmax(&p, &l, &LovaszSoftmaxConfig::default()) {
        Ok(t) => panic!("expected an error, got {t}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("label 255") && err.contains("no ignore index"),
        "{err}"
    );
    let cfg = LovaszSoftmaxConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    assert_near("ignored", scalar(&lovasz_softmax(&p, &l, &cfg)?)?, 0.375);
    Ok(())
}

#[test]
fn multilabel_is_the_channel_mean_and_pooling_is_one_hinge() -> Result<()> {
    // Channel 0: logits [2, -1], labels [1, 0] (loss 0); channel 1: logits [0.5, -0.5],
    // labels [0, 1] (loss 1.5). smp's multilabel mode pools both into one binary problem.
    let x = Tensor::new(&[[[2f32, -1.0], [0.5, -0.5]]], &DEV)?;
    let l = Tensor::new(&[[[1u32, 0], [0, 1]]], &DEV)?;
    let cfg = LovaszHingeConfig {
        per_image: false,
        ..Default::default()
    };
    let mean = scalar(&lovasz_hinge_multilabel(&x, &l, &cfg)?)?;
    assert_near("per-channel mean", mean, 0.75);
    let pooled = lovasz_hinge(&x.reshape((1, ()))?, &l.reshape((1, ()))?, &cfg)?;
    assert_near("pooled (smp)", scalar(&pooled)?, 1.0);
    Ok(())
}

#[test]
fn reductions_over_images() -> Result<()> {
    // mmseg's per-image `reduction='none'` is `[B]`; per batch ours is `[1]`.
    let logits = Tensor::new(
        &[[[2f32, -1.0], [0.0, 1.0]], [[0.5, 0.5], [0.0, 0.0]]],
        &DEV,
    )?;
    let l = Tensor::new(&[[0u32, 1], [1, 0]], &DEV)?;
    let cfg = |per_image, reduction| LovaszSoftmaxConfig {
        per_image,
        reduction,
        ..Default::default()
    };
    let none = lovasz_softmax_with_logits(&logits, &l, &cfg(true, Reduction::None))?;
    assert_eq!(none.dims(), &[2]);
    let per: Vec<f32> = none.to_vec1()?;
    let sum = scalar(&lovasz_softmax_with_logits(
        &logits,
        &l,
        &cfg(true, Reduction::Sum),
    )?)?;
    let mean = scalar(&lovasz_softmax_with_logits(
        &logits,
        &l,
        &cfg(true, Reduction::Mean),
    )?)?;
    assert_near("sum", sum, f64::from(per[0] + per[1]));
    assert_near("mean", mean, f64::from(per[0] + per[1]) / 2.0);
    let batch = lovasz_softmax_with_logits(&logits, &l, &cfg(false, Reduction::None))?;
    assert_eq!(batch.dims(), &[1]);
    Ok(())
}
