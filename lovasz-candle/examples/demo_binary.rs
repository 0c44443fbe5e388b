//! Binary segmentation of toy images with the Lovász hinge, the Lovász-Sigmoid and binary
//! cross-entropy (the authors' `demo_binary` notebook).
//!
//! A batch of random label images (background 0, a void triangle 255 and a foreground
//! triangle 1 drawn over it) gives noisy per-pixel scores; the only parameter is one bias
//! added to every score, trained by Adam from the same start with each loss. The demo
//! prints the image-IoU of the foreground before and after training and writes
//! `demo_binary_curves.png` and `demo_binary_grid.png` to `--output`.
//!
//! ```text
//! cargo run --release -p lovasz-candle --example demo_binary -- --seed 1
//! ```

mod demo_common;

use anyhow::{ensure, Result};
use candle::{Device, Tensor, Var};
use clap::Parser;
use lovasz_candle::metrics::{iou_binary, IouConfig};
use lovasz_candle::{
    binary_xloss, lovasz_hinge, lovasz_sigmoid, LovaszHingeConfig, LovaszSigmoidConfig,
};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use demo_common::cli::CommonArgs;
use demo_common::figures::write_figures;
use demo_common::training::{in_parallel, print_summary, train_adam, History};
use demo_common::triangles::random_triangles;

/// Label of void pixels, left out of the losses and the IoU.
const VOID: u8 = 255;
/// Bias every run starts from: the prediction is then `score > 0`.
const INITIAL_BIAS: f32 = 0.0;

/// Trains a one-bias model on toy binary images with three losses and compares their IoU.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,

    /// Number of label images in the batch.
    #[arg(long, default_value_t = 10)]
    batch: usize,

    /// Adam iterations of each run.
    #[arg(long, default_value_t = 500)]
    iters: usize,

    /// Adam learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
}

/// The toy batch: `labels` (u8 `[B, S, S]`: 0, 1 or void) and `scores` (f32 `[B, S, S]`)
/// drawn per pixel from a Gaussian that depends on the label.
struct Batch {
    labels: Tensor,
    scores: Tensor,
}

impl Batch {
    fn random(batch: usize, size: usize, rng: &mut impl Rng) -> Result<Self> {
        let labels: Vec<u8> = (0..batch)
            .flat_map(|_| random_triangles(size, 0, &[VOID, 1], rng))
            .collect();
        let foreground = Normal::new(1.0f32, 2.5)?;
        let background = Normal::new(-1.0f32, 2.5)?;
        let void = Normal::new(0.0f32, 5.0)?;
        let scores: Vec<f32> = labels
            .iter()
            .map(|&label| match label {
                1 => foreground.sample(rng),
                0 => background.sample(rng),
                _ => void.sample(rng),
            })
            .collect();
        let dev = Device::Cpu;
        Ok(Self {
            labels: Tensor::from_vec(labels, (batch, size, size), &dev)?,
            scores: Tensor::from_vec(scores, (batch, size, size), &dev)?,
        })
    }

    /// Foreground image-IoU of the logits `out`: per image, void ignored, then averaged.
    fn image_iou(&self, out: &Tensor) -> Result<f64> {
        let cfg = IouConfig {
            per_image: true,
            ignore_index: Some(u32::from(VOID)),
            ..Default::default()
        };
        Ok(iou_binary(&out.gt(0f32)?, &self.labels, &cfg)?)
    }
}

/// The model: `score + bias`, one learnable scalar; positive means foreground.
struct BiasModel {
    bias: Var,
}

impl BiasModel {
    fn new(bias: f32) -> Result<Self> {
        Ok(Self {
            bias: Var::from_tensor(&Tensor::new(&[bias], &Device::Cpu)?)?,
        })
    }

    /// Logits `[B, S, S]` of the scores `[B, S, S]`.
    fn forward(&self, scores: &Tensor) -> Result<Tensor> {
        Ok(scores.broadcast_add(self.bias.as_tensor())?)
    }
}

/// The losses compared, all with void pixels ignored.
#[derive(Debug, Clone, Copy)]
enum BinaryLoss {
    /// Numerically stable binary cross-entropy on the logits.
    CrossEntropy,
    /// Lovász hinge on the logits, per image.
    Hinge,
    /// Lovász-Sigmoid on the sigmoid of the logits, over the batch (the reference's default).
    Sigmoid,
}

impl BinaryLoss {
    const ALL: [BinaryLoss; 3] = [Self::CrossEntropy, Self::Hinge, Self::Sigmoid];

    fn name(self) -> &'static str {
        match self {
            Self::CrossEntropy => "binary cross-entropy",
            Self::Hinge => "Lovász hinge",
            Self::Sigmoid => "Lovász-Sigmoid",
        }
    }

    fn compute(self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let ignore_index = Some(u32::from(VOID));
        let loss = match self {
            Self::CrossEntropy => binary_xloss(logits, labels, ignore_index)?,
            Self::Hinge => {
                let cfg = LovaszHingeConfig {
                    per_image: true,
                    ignore_index,
                    ..Default::default()
                };
                lovasz_hinge(logits, labels, &cfg)?
            }
            Self::Sigmoid => {
                let cfg = LovaszSigmoidConfig {
                    per_image: false,
                    ignore_index,
                    ..Default::default()
                };
                lovasz_sigmoid(&candle_nn::ops::sigmoid(logits)?, labels, &cfg)?
            }
        };
        Ok(loss)
    }
}

/// Generates the batch, trains once per loss, prints the IoUs and writes the figures.
/// Returns the history of each run, in the order of [`BinaryLoss::ALL`].
fn run(args: &Args) -> Result<Vec<History>> {
    args.common.prepare()?;
    ensure!(args.batch >= 1, "--batch must be at least 1");
    ensure!(args.lr > 0.0, "--lr must be positive, got {}", args.lr);
    let size = args.common.size;
    let batch = Batch::random(args.batch, size, &mut args.common.rng())?;
    println!(
        "demo_binary: {} images of {size}×{size}, seed {}, Adam lr {} for {} iterations",
        args.batch, args.common.seed, args.lr, args.iters
    );

    let initial = BiasModel::new(INITIAL_BIAS)?.forward(&batch.scores)?;
    let results = in_parallel(&BinaryLoss::ALL, |&loss| {
        let model = BiasModel::new(INITIAL_BIAS)?;
        let vars = vec![model.bias.clone()];
        let history = train_adam(loss.name(), vars, args.lr, args.iters, || {
            let out = model.forward(&batch.scores)?;
            Ok((loss.compute(&out, &batch.labels)?, batch.image_iou(&out)?))
        })?;
        let bias = model.bias.as_tensor().to_vec1::<f32>()?;
        Ok((history, bias, model.forward(&batch.scores)?.gt(0f32)?))
    })?;
    let (mut runs, mut predictions) = (Vec::new(), Vec::new());
    for (history, bias, prediction) in results {
        let bias = bias.first().copied().unwrap_or(f32::NAN);
        println!("{:<22} final bias {bias:+.3}", history.name);
        runs.push(history);
        predictions.push(prediction);
    }
    print_summary("image-IoU", &runs);

    let initial = initial.gt(0f32)?;
    write_figures(
        &args.common.output,
        "demo_binary",
        "image-IoU",
        &runs,
        &batch.labels,
        ("start (bias 0)", &initial),
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

    use super::{run, Args, Batch, VOID};

    fn tiny_args(output: &std::path::Path) -> anyhow::Result<Args> {
        let argv = crate::demo_common::figures::tiny_argv("demo_binary", 3, output)?;
        Ok(Args::try_parse_from(argv)?)
    }

    #[test]
    fn smoke_tiny_run_records_every_iteration_and_writes_both_pngs() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let runs = run(&tiny_args(dir.path())?)?;
        crate::demo_common::training::assert_smoke_runs(&runs, 3, 8);
        // Five rows (labels, start, three losses) of three 24-pixel images.
        crate::demo_common::figures::assert_smoke_figures(dir.path(), "demo_binary", 5, 3)
    }

    #[test]
    fn the_seed_fixes_the_batch() -> anyhow::Result<()> {
        let draw = |seed| Batch::random(2, 16, &mut ChaCha8Rng::seed_from_u64(seed));
        let (a, b, c) = (draw(5)?, draw(5)?, draw(6)?);
        let labels = |x: &Batch| x.labels.flatten_all()?.to_vec1::<u8>();
        let scores = |x: &Batch| x.scores.flatten_all()?.to_vec1::<f32>();
        assert_eq!(labels(&a)?, labels(&b)?);
        assert_eq!(scores(&a)?, scores(&b)?);
        assert_ne!(scores(&a)?, scores(&c)?);
        assert!(labels(&a)?.iter().all(|&l| l <= 1 || l == VOID));
        Ok(())
    }

    #[test]
    fn bad_options_are_errors_not_panics() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut args = tiny_args(dir.path())?;
        args.batch = 0;
        assert!(run(&args).is_err());
        let mut args = tiny_args(dir.path())?;
        args.common.size = 1;
        assert!(run(&args).is_err());
        let mut args = tiny_args(dir.path())?;
        args.lr = -1.0;
        assert!(run(&args).is_err());
        assert!(Args::try_parse_from(["demo_binary", "--iters", "many"]).is_err());
        Ok(())
    }
}
