//! The losses on the project's data sets, against the metrics: on hard (one-hot)
//! predictions the Lovász extension equals the set function it extends (Berman et al.,
//! CVPR 2018, Sec. 3), so the Lovász-Softmax with `Classes::Present` is the mean over the
//! present classes of `1 − IoU`, and the Lovász-Sigmoid is `1 − IoU` of the foreground.
//! The masks come from `datasets` (the embedded brain slices, the synthetic shapes, with
//! void pixels) and the IoUs from `lovasz_candle::metrics`, per batch and per image.

use std::sync::Arc;

use anyhow::Result;
use candle::{Device, Tensor};
use datasets::{Batcher, BrainSlices, Dataset, ShapesConfig, ShapesDataset, Split, VOID};
use lovasz_candle::metrics::{iou_binary, ConfusionMatrix, IouConfig};
use lovasz_candle::{
    lovasz_sigmoid, lovasz_softmax, Classes, LovaszSigmoidConfig, LovaszSoftmaxConfig,
};

/// A wrong but plausible prediction of `masks` `[B, H, W]`: each row shifted right by
/// `shift` pixels (wrapping), void pixels predicted as class 0.
fn shifted(masks: &[u32], (b, h, w): (usize, usize, usize), shift: usize) -> Vec<u32> {
    let mut out = vec![0; b * h * w];
    for (row_out, row) in out.chunks_mut(w).zip(masks.chunks(w)) {
        for (x, o) in row_out.iter_mut().enumerate() {
            let l = row[(x + w - shift % w) % w];
            *o = if l == VOID { 0 } else { l };
        }
    }
    out
}

/// One-hot probabilities `[B, C, H, W]` of the class map `preds` `[B, H, W]`.
fn one_hot(preds: &[u32], (b, h, w): (usize, usize, usize), classes: usize) -> Result<Tensor> {
    let mut p = vec![0f32; b * classes * h * w];
    for (i, &c) in preds.iter().enumerate() {
        let (image, pixel) = (i / (h * w), i % (h * w));
        p[(image * classes + c as usize) * h * w + pixel] = 1.0;
    }
    Ok(Tensor::from_vec(p, (b, classes, h, w), &Device::Cpu)?)
}

/// The mean of `1 − IoU` over the classes with a non-void ground-truth pixel in `cm`.
fn mean_present_jaccard_loss(cm: &ConfusionMatrix) -> f64 {
    let c = cm.n_classes();
    let present: Vec<usize> = (0..c)
        .filter(|&k| (0..c).map(|p| cm.count(k, p)).sum::<u64>() > 0)
        .collect();
    let iou = cm.iou_per_class();
    let sum: f64 = present
        .iter()
        .map(|&k| 1.0 - iou[k].expect("a present class has an IoU"))
        .sum();
    sum / present.len() as f64
}

/// Checks the Lovász-Softmax of one-hot predictions against the confusion matrices, per
/// batch and per image, for masks `[B, H, W]` of `classes` classes.
fn check_softmax_is_one_minus_iou(masks: &Tensor, classes: usize, shift: usize) -> Result<()> {
    let (b, h, w) = masks.dims3()?;
    let labels: Vec<u32> = masks.flatten_all()?.to_vec1()?;
    let preds = shifted(&labels, (b, h, w), shift);
    let probas = one_hot(&preds, (b, h, w), classes)?;
    let preds = Tensor::from_vec(preds, (b, h, w), &Device::Cpu)?;
    for per_image in [false, true] {
        let cfg = LovaszSoftmaxConfig {
            classes: Classes::Present,
            per_image,
            ignore_index: Some(VOID),
            ..Default::default()
        };
        let loss = f64::from(lovasz_softmax(&probas, masks, &cfg)?.to_scalar::<f32>()?);
        let want = if per_image {
            let mut sum = 0.0;
            for i in 0..b {
                let mut cm = ConfusionMatrix::new(classes, Some(VOID));
                cm.update(&preds.get(i)?, &masks.get(i)?)?;
                sum += mean_present_jaccard_loss(&cm);
            }
            sum / b as f64
        } else {
            let mut cm = ConfusionMatrix::new(classes, Some(VOID));
            cm.update(&preds, masks)?;
            mean_present_jaccard_loss(&cm)
        };
        assert!(
            (loss - want).abs() <= 1e-5,
            "per_image {per_image}: loss {loss} vs 1 - IoU {want}"
        );
        assert!(want > 0.05, "the shifted prediction is wrong somewhere");
    }
    Ok(())
}

#[test]
fn on_hard_predictions_the_lovasz_softmax_is_one_minus_the_brain_slices_iou() -> Result<()> {
    let test = BrainSlices::load(Split::Test)?;
    let classes = test.num_classes();
    let batcher = Batcher::new(Arc::new(test)).batch_size(8);
    let (_, masks) = batcher.epoch(0).next().expect("a batch")?;
    // A band of void pixels at the top of every image.
    let (b, h, w) = masks.dims3()?;
    let mut labels: Vec<u32> = masks.flatten_all()?.to_vec1()?;
    for image in labels.chunks_mut(h * w) {
        image[..4 * w].fill(VOID);
    }
    let masks = Tensor::from_vec(labels, (b, h, w), &Device::Cpu)?;
    for shift in [1, 3] {
        check_softmax_is_one_minus_iou(&masks, classes, shift)?;
    }
    Ok(())
}

#[test]
fn on_hard_predictions_the_lovasz_softmax_is_one_minus_the_shapes_iou() -> Result<()> {
    let shapes = ShapesDataset::new(ShapesConfig {
        num_classes: 5,
        height: 40,
        width: 48,
        len: 6,
        seed: 3,
        void_border: 0.1,
        ..Default::default()
    });
    let batcher = Batcher::new(Arc::new(shapes)).batch_size(6);
    let (_, masks) = batcher.epoch(0).next().expect("a batch")?;
    check_softmax_is_one_minus_iou(&masks, 5, 2)
}

#[test]
fn on_hard_predictions_the_lovasz_sigmoid_is_one_minus_the_foreground_iou() -> Result<()> {
    let test = BrainSlices::load(Split::Test)?;
    let batcher = Batcher::new(Arc::new(test)).batch_size(6);
    let (_, masks) = batcher.epoch(0).next().expect("a batch")?;
    let (b, h, w) = masks.dims3()?;
    // Foreground: every structure; background: class 0; a band of void pixels.
    let mut labels: Vec<u32> = masks.flatten_all()?.to_vec1()?;
    for (i, l) in labels.iter_mut().enumerate() {
        *l = if i % (h * w) < 3 * w {
            VOID
        } else {
            u32::from(*l != 0)
        };
    }
    let preds = shifted(&labels, (b, h, w), 2);
    let probas: Vec<f32> = preds.iter().map(|&p| p as f32).collect();
    let probas = Tensor::from_vec(probas, (b, h, w), &Device::Cpu)?;
    let labels = Tensor::from_vec(labels, (b, h, w), &Device::Cpu)?;
    let preds = Tensor::from_vec(preds, (b, h, w), &Device::Cpu)?;
    for per_image in [false, true] {
        let cfg = LovaszSigmoidConfig {
            per_image,
            ignore_index: Some(VOID),
            ..Default::default()
        };
        let loss = f64::from(lovasz_sigmoid(&probas, &labels, &cfg)?.to_scalar::<f32>()?);
        let iou = iou_binary(
            &preds,
            &labels,
            &IouConfig {
                per_image,
                ignore_index: Some(VOID),
                ..Default::default()
            },
        )?;
        assert!(
            (loss - (1.0 - iou)).abs() <= 1e-5,
            "per_image {per_image}: loss {loss} vs 1 - IoU {}",
            1.0 - iou
        );
        assert!(iou < 0.99, "the shifted prediction is wrong somewhere");
    }
    Ok(())
}
