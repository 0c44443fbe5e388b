//! The fine-grained mIoU of Wang et al. (NeurIPS 2023) against values computed by hand.

use candle::{Device, Tensor};
use lovasz_candle::metrics::{ConfusionMatrix, FineGrainedIou};

type Result<T> = anyhow::Result<T>;

const DEV: Device = Device::Cpu;

fn near(got: Option<f64>, want: f64) -> bool {
    got.is_some_and(|g| (g - want).abs() < 1e-12)
}

/// Four images of four pixels, three classes, 255 void:
/// - A: labels [0, 0, 1, 1], preds [0, 1, 1, 1]: class 0 1/2, class 1 2/3 (mean 7/12);
/// - B: labels [2, 2, 2, 255], preds [2, 0, 2, 1]: class 2 2/3 (the prediction of class 0
///   is not scored: class 0 is not in B's ground truth; the void pixel is left out);
/// - C: all void, skipped;
/// - D: labels [0, 0, 0, 0], preds [0, 1, 1, 1]: class 0 1/4.
fn three_class_batch() -> Result<(Tensor, Tensor)> {
    let preds = Tensor::new(
        &[[0u32, 1, 1, 1], [2, 0, 2, 1], [0, 1, 2, 0], [0, 1, 1, 1]],
        &DEV,
    )?;
    let labels = Tensor::new(
        &[[0u32, 0, 1, 1], [2, 2, 2, 255], [255; 4], [0, 0, 0, 0]],
        &DEV,
    )?;
    Ok((preds, labels))
}

#[test]
fn image_and_class_means_and_their_worst_cases() -> Result<()> {
    let (preds, labels) = three_class_batch()?;
    let mut m = FineGrainedIou::new(3, Some(255));
    m.update(&preds, &labels)?;
    assert_eq!(m.images(), 3);
    let (a, b, d) = (7.0 / 12.0, 2.0 / 3.0, 0.25);
    assert!(near(m.miou_image(None)?, (a + b + d) / 3.0));
    // Worst 50 % of 3 images: max(1, 1) = 1; 70 %: 2; 100 %: all.
    assert!(near(m.miou_image(Some(50.0))?, d));
    assert!(near(m.miou_image(Some(70.0))?, (d + a) / 2.0));
    assert!(near(m.miou_image(Some(100.0))?, (a + b + d) / 3.0));
    // A class is averaged over the images that hold it: class 0 over A and D.
    let (c0, c1, c2) = ((0.5 + 0.25) / 2.0, 2.0 / 3.0, 2.0 / 3.0);
    assert!(near(m.miou_class(None)?, (c0 + c1 + c2) / 3.0));
    // Worst 50 % per class: class 0 keeps D's 1/4; classes 1 and 2 have one image each.
    assert!(near(m.miou_class(Some(50.0))?, (0.25 + c1 + c2) / 3.0));
    // Unlike the data set's mIoU, from one confusion matrix.
    let mut cm = ConfusionMatrix::new(3, Some(255));
    cm.update(&preds, &labels)?;
    assert!(!near(cm.mean_iou(), (a + b + d) / 3.0));
    Ok(())
}

#[test]
fn batches_accumulate_like_one_batch() -> Result<()> {
    let (preds, labels) = three_class_batch()?;
    let mut whole = FineGrainedIou::new(3, Some(255));
    whole.update(&preds, &labels)?;
    let mut parts = FineGrainedIou::new(3, Some(255));
    for i in 0..4 {
        parts.update(&preds.narrow(0, i, 1)?, &labels.narrow(0, i, 1)?)?;
    }
    assert_eq!(whole, parts);
    Ok(())
}

#[test]
fn two_classes_score_the_foreground_and_the_means_agree() -> Result<()> {
    // 1: fg IoU 1/3; 2: no foreground on either side, 1; 3: a predicted foreground pixel
    // where there is none (the one at the void pixel is not counted), 0.
    let preds = Tensor::new(&[[1u8, 0, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0]], &DEV)?;
    let labels = Tensor::new(&[[1u8, 1, 0, 0], [0, 0, 0, 0], [0, 0, 255, 0]], &DEV)?;
    let mut m = FineGrainedIou::new(2, Some(255));
    m.update(&preds, &labels)?;
    let mean = (1.0 / 3.0 + 1.0 + 0.0) / 3.0;
    assert!(near(m.miou_image(None)?, mean));
    assert!(near(m.miou_class(None)?, mean));
    for q in [10.0, 50.0, 90.0] {
        assert_eq!(
            m.miou_class(Some(q))?,
            m.miou_image(Some(q))?,
            "worst {q} %"
        );
    }
    assert!(near(m.miou_image(Some(50.0))?, 0.0));
    Ok(())
}

#[test]
fn higher_rank_images_and_i64_labels() -> Result<()> {
    // [B, D, H, W] images are images all the same: each is scored as a whole.
    let preds = Tensor::new(&[[[[0i64, 1], [1, 1]], [[2, 2], [0, 0]]]], &DEV)?;
    let labels = Tensor::new(&[[[[0i64, 1], [1, 2]], [[2, 2], [0, 0]]]], &DEV)?;
    let mut m = FineGrainedIou::new(3, None);
    m.update(&preds, &labels)?;
    assert_eq!(m.images(), 1);
    // Class 0: 3/3; class 1: 2/3; class 2: 2/3.
    assert!(near(
        m.miou_image(None)?,
        (1.0 + 2.0 / 3.0 + 2.0 / 3.0) / 3.0
    ));
    Ok(())
}

#[test]
fn empty_and_bad_input() -> Result<()> {
    let m = FineGrainedIou::new(3, Some(255));
    assert_eq!(m.miou_image(None)?, None);
    assert_eq!(m.miou_class(Some(10.0))?, None);
    let mut m = FineGrainedIou::new(3, Some(255));
    let err = |r: candle::Result<()>| r.expect_err("an error").to_string();
    let p = Tensor::new(&[[0u32, 1]], &DEV)?;
    let e = err(m.update(&p, &Tensor::new(&[[0u32, 1, 2]], &DEV)?));
    assert!(e.contains("shape mismatch"), "{e}");
    let e = err(m.update(&Tensor::new(&[[0u32, 3]], &DEV)?, &p));
    assert!(e.contains("preds") && e.contains("label 3"), "{e}");
    let e = err(m.update(&p, &Tensor::new(&[[0u32, 7]], &DEV)?));
    assert!(e.contains("labels") && e.contains("label 7"), "{e}");
    let e = err(m.update(&Tensor::new(1u32, &DEV)?, &Tensor::new(1u32, &DEV)?));
    assert!(e.contains("[B, *spatial]"), "{e}");
    m.update(&p, &p)?;
    for q in [0.0, -5.0, 100.5, f64::NAN] {
        let e = m.miou_image(Some(q)).expect_err("bad q").to_string();
        assert!(e.contains("worst_percent"), "{q}: {e}");
        assert!(m.miou_class(Some(q)).is_err(), "{q}");
    }
    Ok(())
}
