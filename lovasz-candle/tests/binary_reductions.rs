//! `reduction` of the binary losses (hinge, multilabel hinge, sigmoid) and the weights of
//! the Lovász-Sigmoid: per-image sums and per-image losses against the mean, in values,
//! weights and gradients.

use candle::{DType, Device, Tensor, Var};
use lovasz_candle::{
    lovasz_hinge, lovasz_hinge_multilabel, lovasz_hinge_weights, lovasz_sigmoid,
    lovasz_sigmoid_weights, LovaszHingeConfig, LovaszSigmoidConfig, Reduction,
};

const B: usize = 3;

/// Tie-free values in `[-2, 2]` and 0 / 1 labels with a void pixel, `[B, 4, 5]`.
fn batch() -> (Tensor, Tensor) {
    let n = B * 4 * 5;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 25.0) - 2.0)
        .collect();
    let mut y: Vec<u8> = (0..n).map(|i| ((i * 7 + i / 3) % 3 == 0) as u8).collect();
    y[5] = 255;
    let dev = Device::Cpu;
    (
        Tensor::from_vec(x, (B, 4, 5), &dev).unwrap(),
        Tensor::from_vec(y, (B, 4, 5), &dev).unwrap(),
    )
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
}

fn hinge(reduction: Reduction) -> LovaszHingeConfig {
    LovaszHingeConfig {
        ignore_index: Some(255),
        reduction,
        ..Default::default()
    }
}

fn sigmoid(reduction: Reduction) -> LovaszSigmoidConfig {
    LovaszSigmoidConfig {
        per_image: true,
        ignore_index: Some(255),
        reduction,
    }
}

#[test]
fn hinge_sums_and_splits_per_image_losses() {
    let (x, y) = batch();
    let mean = scalar(&lovasz_hinge(&x, &y, &hinge(Reduction::Mean)).unwrap());
    let sum = scalar(&lovasz_hinge(&x, &y, &hinge(Reduction::Sum)).unwrap());
    close(sum, B as f64 * mean);
    let each = lovasz_hinge(&x, &y, &hinge(Reduction::None)).unwrap();
    assert_eq!(each.dims(), &[B]);
    close(scalar(&each.mean(0).unwrap()), mean);
    // One image alone gives its entry.
    let first = lovasz_hinge(
        &x.narrow(0, 0, 1).unwrap(),
        &y.narrow(0, 0, 1).unwrap(),
        &hinge(Reduction::Mean),
    )
    .unwrap();
    close(scalar(&each.get(0).unwrap()), scalar(&first));
    // Weights of the sum: Σ W ⊙ relu(1 − x (2y − 1)) over the non-void pixels.
    let w = lovasz_hinge_weights(&x, &y, &hinge(Reduction::Sum)).unwrap();
    let signs = ((y.to_dtype(DType::F32).unwrap() * 2.0).unwrap() - 1.0).unwrap();
    let errors = (1.0 - (&x * &signs).unwrap()).unwrap().relu().unwrap();
    let valid = y.ne(255u8).unwrap().to_dtype(DType::F32).unwrap();
    let via = scalar(&(w * errors * valid).unwrap().sum_all().unwrap());
    close(via, sum);
}

#[test]
fn the_gradient_of_the_sum_is_b_times_that_of_the_mean() {
    let (x, y) = batch();
    let v = Var::from_tensor(&x).unwrap();
    let grad = |r| {
        let g = lovasz_hinge(v.as_tensor(), &y, &hinge(r))
            .unwrap()
            .backward()
            .unwrap();
        g.get(&v).unwrap().clone()
    };
    let (gm, gs) = (grad(Reduction::Mean), grad(Reduction::Sum));
    let d = ((gs - (gm * B as f64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap())
    .to_scalar::<f32>()
    .unwrap();
    assert!(d < 1e-6, "{d}");
}

#[test]
fn multilabel_hinge_reduces_per_channel_then_averages() {
    let (x, y) = batch();
    // Channels: the 4 rows of each image, [B, 4, 5].
    let mean = scalar(&lovasz_hinge_multilabel(&x, &y, &hinge(Reduction::Mean)).unwrap());
    let sum = scalar(&lovasz_hinge_multilabel(&x, &y, &hinge(Reduction::Sum)).unwrap());
    close(sum, B as f64 * mean);
    let each = lovasz_hinge_multilabel(&x, &y, &hinge(Reduction::None)).unwrap();
    assert_eq!(each.dims(), &[B]);
    close(scalar(&each.mean(0).unwrap()), mean);
}

#[test]
fn sigmoid_reduces_and_its_weights_give_the_loss() {
    let (x, y) = batch();
    let p = candle_nn::ops::sigmoid(&x).unwrap();
    let mean = scalar(&lovasz_sigmoid(&p, &y, &sigmoid(Reduction::Mean)).unwrap());
    let sum = scalar(&lovasz_sigmoid(&p, &y, &sigmoid(Reduction::Sum)).unwrap());
    close(sum, B as f64 * mean);
    let each = lovasz_sigmoid(&p, &y, &sigmoid(Reduction::None)).unwrap();
    assert_eq!(each.dims(), &[B]);
    close(scalar(&each.mean(0).unwrap()), mean);
    let valid = y.ne(255u8).unwrap().to_dtype(DType::F32).unwrap();
    let errors = (y.to_dtype(DType::F32).unwrap() - &p)
        .unwrap()
        .abs()
        .unwrap();
    for (r, want) in [(Reduction::Mean, mean), (Reduction::Sum, sum)] {
        let w = lovasz_sigmoid_weights(&p, &y, &sigmoid(r)).unwrap();
        assert_eq!(w.dims(), p.dims());
        let via = scalar(&(w * &errors * &valid).unwrap().sum_all().unwrap());
        close(via, want);
    }
    // Per batch, the weights are those of one group.
    let batch_cfg = LovaszSigmoidConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    let w = lovasz_sigmoid_weights(&p, &y, &batch_cfg).unwrap();
    let via = scalar(&(w * &errors * &valid).unwrap().sum_all().unwrap());
    close(via, scalar(&lovasz_sigmoid(&p, &y, &batch_cfg).unwrap()));
}
