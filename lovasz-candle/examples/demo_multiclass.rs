//! Multiclass segmentation of toy images with the Lovász-Softmax and cross-entropy (the
//! authors' `demo_multiclass` notebook).
//!
//! A batch of random label images (background 0 with triangles of void 255, class 1 and
//! class 2) gives 3-channel features: the one-hot of the label (a random class at void
//! pixels) plus Gaussian noise. The model is `x + conv3×3(x)`, trained by Adam from the
//! same initial weights with each loss. The demo prints the per-class IoU and mIoU over
//! the batch before and after training and writes `demo_multiclass_curves.png` and
//! `demo_multiclass_grid.png` to `--output`.
//!
//! ```text
//! cargo run --release -p lovasz-candle --example demo_multiclass -- --seed 1
//! ```

mod demo_common;

use anyhow::{ensure, Result};
use candle::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, Var};
use clap::Parser;
use lovasz_candle::metrics::{iou, IouConfig};
use lovasz_candle::{
    cross_entropy, lovasz_softmax_with_logits, Classes, CrossEntropyConfig, LovaszSoftmaxConfig,
};
use rand::Rng;
use rand_distr::{Distribution, Normal, Uniform};

use demo_common::cli::CommonArgs;
use demo_common::figures::write_figures;
use demo_common::training::{in_parallel, print_summary, train_adam, History};
use demo_common::triangles::random_triangles;

/// Label of void pixels, left out of the losses and the IoU.
const VOID: u8 = 255;
/// Classes: background 0 and the two triangle classes.
const CLASSES: usize = 3;

/// Trains `x + conv3×3(x)` on toy 3-class images with two losses and compares their mIoU.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// Number of label images in the batch.
    #[arg(long, default_value_t = 5)]
    batch: usize,

    /// Adam iterations of each run.
    #[arg(long, default_value_t = 1000)]
    iters: usize,

    /// Adam learning rate.
    #[arg(long, default_value_t = 0.005)]
    lr: f64,
}

/// The toy batch: `labels` (u8 `[B, S, S]`: a class or void) and `features` (f32
/// `[B, 3, S, S]`, a noisy one-hot of the labels).
struct Batch {
    labels: Tensor,
    features: Tensor,
}

impl Batch {
    fn random(batch: usize, size: usize, rng: &mut impl Rng) -> Result<Self> {
        let pixels = size * size;
        let labels: Vec<u8> = (0..batch)
            .flat_map(|_| random_triangles(size, 0, &[VOID, 1, 2], rng))
            .collect();
        let any_class = Uniform::new(0, CLASSES as u8)?;
        let noise = Normal::new(0.0f32, 2.0)?;
        let mut features = vec![0f32; batch * CLASSES * pixels];
        for (i, &label) in labels.iter().enumerate() {
            let class = if label == VOID {
                any_class.sample(rng)
            } else {
                label
            };
            let (image, pixel) = (i / pixels, i % pixels);
            features[(image * CLASSES + class as usize) * pixels + pixel] = 1.0;
        }
        for value in &mut features {
            *value += noise.sample(rng);
        }
        let dev = Device::Cpu;
        Ok(Self {
            labels: Tensor::from_vec(labels, (batch, size, size), &dev)?,
            features: Tensor::from_vec(features, (batch, CLASSES, size, size), &dev)?,
        })
    }

    /// Per-class IoU over the whole batch of the logits `out` (void ignored).
    fn class_iou(&self, out: &Tensor) -> Result<Vec<f64>> {
        let cfg = IouConfig {
            ignore_index: Some(u32::from(VOID)),
            ..Default::default()
        };
        Ok(iou(&out.argmax(1)?, &self.labels, CLASSES, &cfg)?)
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The model: `x + conv3×3(x)`, 3 → 3 channels, padding 1.
///
/// The input never changes, so its 3×3 patches are gathered once ([`Self::patches`]) and
/// the convolution is a product with them ([`PatchConv`]). This gives `conv2d`'s numbers
/// and gradients (tests check both) at a fraction of the cost: candle's `conv2d` backward
/// also computes the gradient of the input, by a slow transposed convolution, though
/// nothing needs it.
struct ResidualConv {
    weight: Var,
    bias: Var,
}

impl ResidualConv {
    /// Initial weights `[3, 3, 3, 3]` and bias `[3]`, uniform in `±1/√27` (PyTorch's
    /// default for this convolution).
    fn random_init(rng: &mut impl Rng) -> Result<(Tensor, Tensor)> {
        let bound = 1.0 / ((CLASSES * 9) as f32).sqrt();
        let uniform = Uniform::new(-bound, bound)?;
        let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| uniform.sample(rng)).collect() };
        let dev = Device::Cpu;
        let weight = Tensor::from_vec(draw(CLASSES * CLASSES * 9), (CLASSES, CLASSES, 3, 3), &dev)?;
        let bias = Tensor::from_vec(draw(CLASSES), CLASSES, &dev)?;
        Ok((weight, bias))
    }

    /// A model with its own copies of `weight` and `bias`.
    fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        Ok(Self {
            weight: Var::from_tensor(weight)?,
            bias: Var::from_tensor(bias)?,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.weight.clone(), self.bias.clone()]
    }

    /// The zero-padded 3×3 neighbourhoods of the features `x` `[B, 3, S, S]`, as
    /// `[B, 27, S·S]` with row `9 c + 3 dy + dx` (the layout of the weights' last three
    /// dims).
    fn patches(x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let padded = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        let mut shifted = Vec::with_capacity(9);
        for dy in 0..3 {
            for dx in 0..3 {
                shifted.push(padded.narrow(2, dy, h)?.narrow(3, dx, w)?);
            }
        }
        Ok(Tensor::stack(&shifted, 2)?.reshape((b, c * 9, h * w))?)
    }

    /// Logits `[B, 3, S, S]` of the features `x` `[B, 3, S, S]`, given their
    /// [`Self::patches`].
    fn forward(&self, x: &Tensor, patches: &Tensor) -> Result<Tensor> {
        let weight = self.weight.as_tensor().reshape((CLASSES, CLASSES * 9))?;
        let bias = self.bias.as_tensor().reshape((CLASSES, 1))?;
        let patches = patches.clone();
        let conv = weight
            .apply_op1(PatchConv { patches })?
            .broadcast_add(&bias)?;
        Ok((x + conv.reshape(x.shape())?)?)
    }
}

/// `W ↦ W · P` for weights `W` `[3, 27]` and constant patches `P` `[B, 27, N]`, giving
/// `[B, 3, N]`. Its backward pass forms only `∂W = Σ_b ∂out_b · P_bᵀ`; candle's matmul
/// would also form the unused gradient of `P`, 27 floats per pixel at every step.
struct PatchConv {
    patches: Tensor,
}

impl CustomOp1 for PatchConv {
    fn name(&self) -> &'static str {
        "patch-conv"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle::bail!("patch-conv: the weights must be contiguous")
        };
        let weights = &storage.as_slice::<f32>()?[start..end];
        let weights = Tensor::from_slice(weights, layout.shape(), &Device::Cpu)?;
        let out = weights.broadcast_matmul(&self.patches)?;
        Ok((
            CpuStorage::F32(out.flatten_all()?.to_vec1()?),
            out.shape().clone(),
        ))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.patches.t()?)?.sum(0)?))
    }
}

/// The losses compared, both with void pixels ignored.
#[derive(Debug, Clone, Copy)]
enum MulticlassLoss {
    /// Cross-entropy of the logits.
    CrossEntropy,
    /// Lovász-Softmax of the softmax of the logits, over the batch, present classes.
    LovaszSoftmax,
}

impl MulticlassLoss {
    const ALL: [MulticlassLoss; 2] = [Self::CrossEntropy, Self::LovaszSoftmax];

    fn name(self) -> &'static str {
        match self {
            Self::CrossEntropy => "cross-entropy",
            Self::LovaszSoftmax => "Lovász-Softmax",
        }
    }

    fn compute(self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let ignore_index = Some(u32::from(VOID));
        let loss = match self {
            Self::CrossEntropy => {
                let cfg = CrossEntropyConfig {
                    ignore_index,
                    ..Default::default()
                };
                cross_entropy(logits, labels, &cfg)?
            }
            Self::LovaszSoftmax => {
                let cfg = LovaszSoftmaxConfig {
                    classes: Classes::Present,
                    per_image: false,
                    ignore_index,
                    ..Default::default()
                };
                lovasz_softmax_with_logits(logits, labels, &cfg)?
            }
        };
        Ok(loss)
    }
}

/// Formats IoUs as percentages.
fn percent(values: &[f64]) -> String {
    let parts: Vec<String> = values.iter().map(|v| format!("{:.2}", 100.0 * v)).collect();
    format!("[{}]", parts.join(", "))
}

/// Generates the batch, trains once per loss, prints the IoUs and writes the figures.
/// Returns the history of each run, in the order of [`MulticlassLoss::ALL`].
fn run(args: &Args) -> Result<Vec<History>> {
    args.common.prepare()?;
    ensure!(args.batch >= 1, "--batch must be at least 1");
    ensure!(args.lr > 0.0, "--lr must be positive, got {}", args.lr);
    let size = args.common.size;
    let mut rng = args.common.rng();
    let batch = Batch::random(args.batch, size, &mut rng)?;
    let (weight, bias) = ResidualConv::random_init(&mut rng)?;
    println!(
        "demo_multiclass: {} images of {size}×{size}, seed {}, Adam lr {} for {} iterations",
        args.batch, args.common.seed, args.lr, args.iters
    );

    let (x, patches) = (&batch.features, ResidualConv::patches(&batch.features)?);
    let initial = ResidualConv::new(&weight, &bias)?.forward(x, &patches)?;
    println!(
        "{:<22} per-class IoU (%) {}",
        "start",
        percent(&batch.class_iou(&initial)?)
    );
    let results = in_parallel(&MulticlassLoss::ALL, |&loss| {
        let model = ResidualConv::new(&weight, &bias)?;
        let history = train_adam(loss.name(), model.vars(), args.lr, args.iters, || {
            let out = model.forward(x, &patches)?;
            let miou = mean(&batch.class_iou(&out)?);
            Ok((loss.compute(&out, &batch.labels)?, miou))
        })?;
        Ok((history, model.forward(x, &patches)?))
    })?;
    let (mut runs, mut predictions) = (Vec::new(), Vec::new());
    for (history, out) in results {
        let ious = percent(&batch.class_iou(&out)?);
        println!("{:<22} per-class IoU (%) {ious}", history.name);
        runs.push(history);
        predictions.push(out.argmax(1)?);
    }
    print_summary("mIoU", &runs);

    let initial = initial.argmax(1)?;
    write_figures(
        &args.common.output,
        "demo_multiclass",
        "mIoU",
        &runs,
        &batch.labels,
        ("start", &initial),
        &predictions,
    )?;
    Ok(runs)
}

fn main() -> Result<()> {
    let args = Args::parse();
    demo_common::runtime::configure(&args.common)?;
    run(&args)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::{run, Args, Batch, ResidualConv, CLASSES, VOID};

    fn tiny_args(output: &std::path::Path) -> anyhow::Result<Args> {
        let argv = crate::demo_common::figures::tiny_argv("demo_multiclass", 2, output)?;
        Ok(Args::try_parse_from(argv)?)
    }

    #[test]
    fn smoke_tiny_run_records_every_iteration_and_writes_both_pngs() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let runs = run(&tiny_args(dir.path())?)?;
        crate::demo_common::training::assert_smoke_runs(&runs, 2, 8);
        // Four rows (labels, start, two losses) of two 24-pixel images.
        crate::demo_common::figures::assert_smoke_figures(dir.path(), "demo_multiclass", 4, 2)
    }

    #[test]
    fn features_are_a_noisy_one_hot_of_the_labels() -> anyhow::Result<()> {
        let batch = Batch::random(2, 40, &mut ChaCha8Rng::seed_from_u64(1))?;
        let labels = batch.labels.flatten_all()?.to_vec1::<u8>()?;
        assert!(labels.iter().all(|&l| (l as usize) < CLASSES || l == VOID));
        // The noise has mean 0, so the mean feature of channel c over the pixels of class
        // c is near 1 and near 0 over the others.
        let feats = batch
            .features
            .permute((1, 0, 2, 3))?
            .flatten_from(1)?
            .to_vec2::<f32>()?;
        for (c, channel) in feats.iter().enumerate() {
            let mean_where = |pick: &dyn Fn(u8) -> bool| {
                let v: Vec<f32> = channel
                    .iter()
                    .zip(&labels)
                    .filter(|(_, &l)| pick(l))
                    .map(|(&f, _)| f)
                    .collect();
                v.iter().sum::<f32>() / v.len().max(1) as f32
            };
            let on = mean_where(&|l| l as usize == c);
            let off = mean_where(&|l| l != VOID && l as usize != c);
            assert!(
                (on - 1.0).abs() < 0.3 && off.abs() < 0.3,
                "channel {c}: {on} {off}"
            );
        }
        Ok(())
    }

    #[test]
    fn the_model_has_the_gradients_of_conv2d() -> anyhow::Result<()> {
        let (weight, bias) = ResidualConv::random_init(&mut ChaCha8Rng::seed_from_u64(6))?;
        let x = Batch::random(2, 6, &mut ChaCha8Rng::seed_from_u64(7))?.features;
        let model = ResidualConv::new(&weight, &bias)?;
        let out = model.forward(&x, &ResidualConv::patches(&x)?)?;
        // A loss whose gradient differs from pixel to pixel.
        let probe = (&x * 0.3)?.sin()?;
        let grads = (out * &probe)?.sum_all()?.backward()?;
        let reference = ResidualConv::new(&weight, &bias)?;
        let conv = x.conv2d(reference.weight.as_tensor(), 1, 1, 1, 1)?;
        let conv = conv.broadcast_add(&reference.bias.as_tensor().reshape((1, 3, 1, 1))?)?;
        let ref_grads = ((&x + conv)? * &probe)?.sum_all()?.backward()?;
        for (var, ref_var) in [
            (&model.weight, &reference.weight),
            (&model.bias, &reference.bias),
        ] {
            let (g, r) = (grads.get(var), ref_grads.get(ref_var));
            let (Some(g), Some(r)) = (g, r) else {
                anyhow::bail!("missing gradient")
            };
            let diff = (g - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "gradient differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn the_model_is_x_plus_a_padded_3x3_convolution() -> anyhow::Result<()> {
        let (weight, bias) = ResidualConv::random_init(&mut ChaCha8Rng::seed_from_u64(4))?;
        let x = Batch::random(2, 7, &mut ChaCha8Rng::seed_from_u64(5))?.features;
        let out = ResidualConv::new(&weight, &bias)?.forward(&x, &ResidualConv::patches(&x)?)?;
        let conv = x.conv2d(&weight, 1, 1, 1, 1)?;
        let expected = (&x + conv.broadcast_add(&bias.reshape((1, 3, 1, 1))?)?)?;
        let diff = (out - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max difference {diff}");
        Ok(())
    }

    #[test]
    fn every_run_starts_from_the_same_weights() -> anyhow::Result<()> {
        let (weight, bias) = ResidualConv::random_init(&mut ChaCha8Rng::seed_from_u64(2))?;
        let x = Batch::random(1, 8, &mut ChaCha8Rng::seed_from_u64(3))?.features;
        let patches = ResidualConv::patches(&x)?;
        let a = ResidualConv::new(&weight, &bias)?;
        let b = ResidualConv::new(&weight, &bias)?;
        let (out_a, out_b) = (a.forward(&x, &patches)?, b.forward(&x, &patches)?);
        let diff = (out_a - out_b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        // Training one model (here: zeroing its weights) leaves the initial weights alone.
        a.weight.set(&weight.zeros_like()?)?;
        assert_ne!(weight.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn bad_options_are_errors_not_panics() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut args = tiny_args(dir.path())?;
        args.batch = 0;
        assert!(run(&args).is_err());
        let mut args = tiny_args(dir.path())?;
        args.lr = 0.0;
        assert!(run(&args).is_err());
        assert!(Args::try_parse_from(["demo_multiclass", "--seed", "-"]).is_err());
        Ok(())
    }
}
