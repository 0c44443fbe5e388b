//! The Lovász-Softmax in your own candle training loop.
//!
//! A tiny net of three 3×3 `Conv2d` layers (candle-nn's `VarMap`, `VarBuilder` and
//! `AdamW`) learns a synthetic 3-class segmentation: noisy images of bright rectangles
//! (class 1) and dark discs (class 2) on a background (class 0). It trains with
//! cross-entropy, then with cross-entropy + Lovász-Softmax, and prints the IoU per class
//! and the mean IoU on held-out images after each phase.
//!
//! ```text
//! cargo run --release -p lovasz-candle --example own_training_loop [-- --seed 1]
//! ```

use anyhow::Result;
use candle::{DType, Device, Module, Tensor};
use candle_nn::{conv2d, seq, Activation, AdamW, Conv2dConfig, Optimizer};
use candle_nn::{Sequential, VarBuilder, VarMap};
use clap::Parser;
use lovasz_candle::metrics::ConfusionMatrix;
use lovasz_candle::{cross_entropy, lovasz_softmax_with_logits};
use lovasz_candle::{CrossEntropyConfig, LovaszSoftmaxConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Background, rectangles, discs: their mean intensity in the images.
const BRIGHTNESS: [f32; 3] = [0.0, 1.0, -1.0];
/// Images per step; the training set holds 4 batches, the test set 2.
const BATCH: usize = 8;

#[derive(Parser, Debug)]
struct Args {
    /// Seed of the images and the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Side of the square images, in pixels.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Steps of each phase: cross-entropy, then cross-entropy + Lovász-Softmax.
    #[arg(long, default_value_t = 150)]
    steps: usize,
}

/// `n` images `[n, 1, s, s]` (f32) and their labels `[n, s, s]` (u32).
fn synthetic(n: usize, s: usize, rng: &mut ChaCha8Rng) -> Result<(Tensor, Tensor)> {
    let mut labels = vec![0u32; n * s * s];
    for image in labels.chunks_mut(s * s) {
        for class in [1, 1, 2, 2] {
            let (cy, cx) = (rng.random_range(0..s) as f32, rng.random_range(0..s) as f32);
            let mut side = || rng.random_range(2..=s / 4) as f32;
            let (h, w) = (side(), side());
            for (i, label) in image.iter_mut().enumerate() {
                let (dy, dx) = ((i / s) as f32 - cy, (i % s) as f32 - cx);
                let rectangle = dy.abs() <= h && dx.abs() <= w;
                let disc = dy * dy + dx * dx <= h * w / 4.0;
                if (class == 1 && rectangle) || (class == 2 && disc) {
                    *label = class;
                }
            }
        }
    }
    let noise = Normal::new(0f32, 1.5)?;
    let pixel = |&l: &u32| BRIGHTNESS[l as usize] + noise.sample(rng);
    let images = Tensor::from_iter(labels.iter().map(pixel), &Device::Cpu)?;
    let labels = Tensor::from_vec(labels, (n, s, s), &Device::Cpu)?;
    Ok((images.reshape((n, 1, s, s))?, labels))
}

/// Logits `[B, 3, H, W]` of images `[B, 1, H, W]`; the weights live in `varmap`.
fn network(varmap: &VarMap, rng: &mut ChaCha8Rng) -> Result<Sequential> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = |i, o, name| conv2d(i, o, 3, cfg, vb.pp(name));
    let net = seq().add(conv(1, 8, "conv1")?).add(Activation::Relu);
    let net = net.add(conv(8, 8, "conv2")?).add(Activation::Relu);
    let net = net.add(conv(8, 3, "conv3")?);
    // candle draws initial weights from an unseeded generator: redraw them from ours, in
    // the order of their names, uniform in ±1/√fan_in (PyTorch's default for Conv2d).
    let vars = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let weight = &vars[&name.replace("bias", "weight")];
        let fan_in = weight.elem_count() / weight.dim(0)?; // in channels × 3 × 3
        let bound = 1.0 / (fan_in as f32).sqrt();
        let var = &vars[name];
        let values = (0..var.elem_count()).map(|_| rng.random_range(-bound..=bound));
        var.set(&Tensor::from_iter(values, &Device::Cpu)?.reshape(var.shape())?)?;
    }
    Ok(net)
}

/// Prints and returns the cross-entropy and the mIoU (of argmax predictions) on `(x, y)`.
fn evaluate(when: &str, net: &Sequential, (x, y): &(Tensor, Tensor)) -> Result<(f32, f64)> {
    let logits = net.forward(x)?;
    let loss = cross_entropy(&logits, y, &CrossEntropyConfig::default())?.to_scalar::<f32>()?;
    let mut cm = ConfusionMatrix::new(3, None);
    cm.update(&logits.argmax(1)?, y)?;
    // `None` marks a class absent from both labels and predictions: not in these images.
    let iou: Vec<f64> = cm.iou_per_class().into_iter().flatten().collect();
    let miou = cm.mean_iou().unwrap_or(f64::NAN);
    println!("{when}: test cross-entropy {loss:.4}, IoU per class {iou:.3?}, mIoU {miou:.3}");
    Ok((loss, miou))
}

/// Trains both phases; returns the test (cross-entropy, mIoU) at the start and after each.
fn run(args: &Args) -> Result<Vec<(f32, f64)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let train = synthetic(4 * BATCH, args.size, &mut rng)?;
    let test = synthetic(2 * BATCH, args.size, &mut rng)?;
    let varmap = VarMap::new();
    let net = network(&varmap, &mut rng)?;
    let mut opt = AdamW::new_lr(varmap.all_vars(), 0.01)?;
    let mut scores = vec![evaluate("start", &net, &test)?];
    for (phase, lovasz) in [("cross-entropy", false), ("CE + Lovász", true)] {
        for step in 0..args.steps {
            let batch = |t: &Tensor| t.narrow(0, step % 4 * BATCH, BATCH);
            let (x, y) = (batch(&train.0)?, batch(&train.1)?);
            let logits = net.forward(&x)?;
            let mut loss = cross_entropy(&logits, &y, &CrossEntropyConfig::default())?;
            if lovasz {
                let cfg = LovaszSoftmaxConfig::default();
                loss = (loss + lovasz_softmax_with_logits(&logits, &y, &cfg)?)?;
            }
            opt.backward_step(&loss)?;
            if step % 50 == 0 || step + 1 == args.steps {
                println!("{phase} step {step}: loss {:.4}", loss.to_scalar::<f32>()?);
            }
        }
        scores.push(evaluate(&format!("after {phase}"), &net, &test)?);
    }
    Ok(scores)
}

fn main() -> Result<()> {
    run(&Args::parse()).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_tiny_run_learns() -> Result<()> {
        let scores = run(&Args::parse_from(["", "--size=16", "--steps=20"]))?;
        let sane = |&(loss, miou): &(f32, f64)| loss.is_finite() && (0.0..=1.0).contains(&miou);
        assert!(scores.iter().all(sane), "{scores:?}");
        let (start, end) = (scores[0], scores[2]);
        assert!(end.0 < start.0 && end.1 > start.1, "{scores:?}");
        Ok(())
    }
}
