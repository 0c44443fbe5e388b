//! The command line's arguments: the clap structs of `train`, `compare`, `eval` and
//! `predict`, every flag documented (the doc comments are the `--help` text, hence plain
//! `<dataset>` and `[:LEN]`), their value parsers, and the default output folder.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use datasets::Split;

use crate::device::DeviceChoice;
use crate::model::{Layers, Norm};
use crate::optim::AdamWConfig;
use crate::train::{LovaszClasses, Sampling, Schedule, TrainConfig};
use crate::Error;

/// Train a U-Net with cross-entropy, then fine-tune it with cross-entropy + λ·Lovász-Softmax
/// (Berman et al., CVPR 2018), on embedded brain MRI slices or your own data.
#[derive(Debug, Parser)]
#[command(name = "unet-example", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a U-Net (default: the brain slices, CE then CE + Lovász fine-tuning).
    Train(TrainArgs),
    /// Compare CE only, CE → CE+Lovász fine-tuning, and CE+Lovász from the start on the
    /// test split, over one or more seeds.
    Compare(CompareArgs),
    /// Evaluate a trained run: confusion matrix, per-class IoU, mIoU, pixel accuracy.
    Eval(EvalArgs),
    /// Write colourised predictions: a grid for a data-set split, or the mask of one image.
    Predict(PredictArgs),
}

/// Options that define what is trained (shared by `train` and `compare`).
#[derive(Debug, Clone, Args)]
#[group(id = "training", multiple = true)]
pub struct TrainingArgs {
    /// Data set: brain (embedded MRI slices), shapes[:SIZE[:LEN]] (synthetic),
    /// folder:PATH (images/ + masks/, or train/ val/ [test/] sub-folders of those) or
    /// voc:PATH (a Pascal VOC 2012 VOC2012 folder).
    #[arg(long, default_value = "brain")]
    pub dataset: String,
    /// Number of classes: required for folder:PATH, checked against the other data sets.
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// Total number of epochs.
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    /// Epochs of the fine-tuning phase: the last N epochs of ce-then-finetune (and of
    /// compare's variant b) optimise CE + λ·Lovász; the first epochs - N optimise CE.
    /// Default: half of --epochs (90 of the default 180).
    #[arg(long)]
    pub finetune_epochs: Option<usize>,
    /// Peak learning rate, decayed to 0 by a cosine over all epochs (per step).
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    pub lr: f64,
    /// Learning rate of the fine-tuning phase: restarts a cosine from this value over the
    /// fine-tuning epochs. Default: the main schedule continues.
    #[arg(long)]
    pub finetune_lr: Option<f64>,
    /// λ, the weight of the Lovász-Softmax loss.
    #[arg(long = "lambda", default_value_t = TrainConfig::default().lovasz_weight)]
    pub lovasz_weight: f64,
    /// Weight of cross-entropy in the combined loss (CE_WEIGHT·CE + λ·Lovász).
    #[arg(long, default_value_t = TrainConfig::default().ce_weight)]
    pub ce_weight: f64,
    /// Lovász-Softmax per image, averaged over the batch (default: over the whole batch).
    #[arg(long)]
    pub per_image: bool,
    /// Classes the Lovász-Softmax averages over.
    #[arg(long, value_enum, default_value_t = LovaszClasses::Present)]
    pub lovasz_classes: LovaszClasses,
    /// AdamW weight decay (decoupled).
    #[arg(long, default_value_t = AdamWConfig::default().weight_decay)]
    pub weight_decay: f64,
    /// Images per training batch.
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub batch_size: usize,
    /// Random training crop HxW (e.g. 256x256; needed for data sets whose images differ in
    /// size). Default: whole images.
    #[arg(long, value_parser = parse_size)]
    pub crop: Option<(usize, usize)>,
    /// Probability of a horizontal flip in training.
    #[arg(long, default_value_t = TrainConfig::default().hflip)]
    pub hflip: f32,
    /// Scale jitter MIN,MAX in training (with the crop back to size, also a random shift);
    /// 1,1 for none.
    #[arg(long, value_parser = parse_range, default_value = "0.9,1.1")]
    pub scale: (f32, f32),
    /// Seed of the initial weights, the data order and the augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How batches are drawn: equibatch (the paper's: every class in each batch as far as
    /// the data allows) or shuffle.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().sampling)]
    pub sampling: Sampling,
    /// U-Net depth: resolution levels (the input is pooled depth - 1 times).
    #[arg(long, default_value_t = TrainConfig::default().depth)]
    pub depth: usize,
    /// Channels of the first level (doubled at each level down).
    #[arg(long, default_value_t = TrainConfig::default().base_width)]
    pub base_width: usize,
    /// Normalisation: batch, group (4 groups) or group:G.
    #[arg(long, default_value = "batch", value_parser = parse_norm)]
    pub norm: Norm,
}

impl TrainingArgs {
    /// The training configuration for `schedule`.
    pub fn config(&self, schedule: Schedule) -> TrainConfig {
        TrainConfig {
            dataset: self.dataset.clone(),
            num_classes: self.num_classes,
            schedule,
            epochs: self.epochs,
            finetune_epochs: self.finetune_epochs.unwrap_or(self.epochs / 2),
            lr: self.lr,
            finetune_lr: self.finetune_lr,
            lovasz_weight: self.lovasz_weight,
            ce_weight: self.ce_weight,
            per_image: self.per_image,
            lovasz_classes: self.lovasz_classes,
            batch_size: self.batch_size,
            crop: self.crop,
            hflip: self.hflip,
            scale: self.scale,
            seed: self.seed,
            sampling: self.sampling,
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                ..Default::default()
            },
            depth: self.depth,
            base_width: self.base_width,
            norm: self.norm,
            sync_bn: false,
        }
    }
}

/// Options of every command that runs the model.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Device: auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal. CUDA and
    /// Metal need a build with `--features cuda` or `--features metal`.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceChoice,
    /// Layers: fused (the fused CPU ops, f32 on the CPU only) or candle (candle's own
    /// ops: cuDNN or Metal kernels on GPUs). Default: fused on the CPU, candle elsewhere.
    /// A run trained with one resumes, evaluates and predicts with the other.
    #[arg(long, value_parser = parse_layers)]
    pub layers: Option<Layers>,
    /// No progress bars (logs only; set RUST_LOG=warn to silence those too).
    #[arg(long, short)]
    pub quiet: bool,
    /// Validate every N epochs, and always after the last epoch and the last CE epoch
    /// before fine-tuning (validation does not change the training, only what
    /// metrics.csv and curves.png show between those epochs).
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub val_every: u64,
}

/// `train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub training: TrainingArgs,
    /// Loss schedule: ce-then-finetune (CE, then CE + λ·Lovász for the last
    /// --finetune-epochs), ce, lovasz (λ·Lovász only) or combined (CE + λ·Lovász throughout).
    #[arg(long, value_enum, default_value_t = Schedule::CeThenFinetune)]
    pub schedule: Schedule,
    /// Output folder. Default: runs/<dataset>-<schedule>-seed<seed>.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Continue the interrupted run in DIR (its config.json fixes every training option).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["training", "schedule", "output", "overwrite"])]
    pub resume: Option<PathBuf>,
    /// Start over in an output folder that already holds a run (deletes its files).
    #[arg(long)]
    pub overwrite: bool,
    /// Stop after N epochs of this invocation, leaving a run to continue with --resume.
    #[arg(long, value_name = "N")]
    pub stop_after_epochs: Option<usize>,
    /// Train data-parallel on N ranks in this process (threads on --device): each takes
    /// 1/N of every global batch of --batch-size images, gradients are averaged, and the
    /// Lovász-Softmax per batch is the one over the global batch. Rank 0 writes the run.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub ranks: u32,
    /// With --ranks or under mpirun: batch norm with the statistics of the global batch,
    /// synchronised over the ranks (what one process would compute), instead of each
    /// rank's shard's.
    #[arg(long, conflicts_with = "resume")]
    pub sync_bn: bool,
    /// The collectives of a data-parallel job of processes: mpi (host memory, under
    /// mpirun; a build with --features mpi) or nccl (CUDA devices; a build with --features
    /// nccl: under mpirun with --features mpi too, else a world of one).
    #[arg(long, value_enum, default_value_t = Backend::Mpi)]
    pub backend: Backend,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The collectives of a data-parallel job of processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// MPI's, in host memory.
    Mpi,
    /// NCCL's, on CUDA devices (ranks bootstrapped through MPI).
    Nccl,
}

/// `compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub training: TrainingArgs,
    /// Number of seeds (--seed, --seed + 1, ...): mean ± std and paired differences.
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
    /// Output folder (one sub-folder per seed and variant, compare.md, compare.json).
    #[arg(long, short, default_value = "runs/compare")]
    pub output: PathBuf,
    /// Start over in output folders that already hold runs.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run folder written by train (config.json + model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Split to evaluate: val or test.
    #[arg(long, default_value = "test", value_parser = parse_split)]
    pub split: Split,
    /// Evaluate on another data set than the run's (same class count and channels).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Number of classes of --dataset folder:PATH (default: the model's).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Where to write the JSON report. Default: DIR/eval-<split>.json.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// A run folder written by train (config.json + model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// One image file (PNG or JPEG) to segment; writes its mask instead of a grid.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Output PNG. Default: DIR/predictions-<split>.png for a grid, <input>.mask.png for
    /// an image.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Split shown in the grid: val or test.
    #[arg(long, default_value = "val", value_parser = parse_split)]
    pub split: Split,
    /// Number of images in the grid (spread evenly over the split).
    #[arg(long, default_value_t = 8)]
    pub count: usize,
    /// Data set of the grid instead of the run's (same class count and channels).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Number of classes of --dataset folder:PATH (default: the model's).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// With --input: write class indices as 8-bit grey values instead of colours.
    #[arg(long, requires = "input")]
    pub index: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

fn parse_size(s: &str) -> std::result::Result<(usize, usize), String> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?} is not HxW (e.g. 256x256)"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?} is not HxW"))
    };
    Ok((num(h)?, num(w)?))
}

fn parse_range(s: &str) -> std::result::Result<(f32, f32), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?} is not MIN,MAX (e.g. 0.9,1.1)"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<f32>()
            .map_err(|_| format!("{s:?} is not MIN,MAX"))
    };
    Ok((num(a)?, num(b)?))
}

fn parse_norm(s: &str) -> std::result::Result<Norm, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_device(s: &str) -> std::result::Result<DeviceChoice, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_layers(s: &str) -> std::result::Result<Layers, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_split(s: &str) -> std::result::Result<Split, String> {
    s.parse().map_err(|e: datasets::Error| e.to_string())
}

/// `runs/<dataset kind>-<schedule>-seed<seed>`.
pub fn default_output(cfg: &TrainConfig) -> PathBuf {
    let kind = cfg.dataset.split(':').next().unwrap_or("data");
    PathBuf::from("runs").join(format!("{kind}-{}-seed{}", cfg.schedule.name(), cfg.seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_parsers() {
        assert_eq!(parse_size("256x128"), Ok((256, 128)));
        assert!(parse_size("256").is_err());
        assert_eq!(parse_range("0.9,1.1"), Ok((0.9, 1.1)));
        assert!(parse_range("x").is_err());
        assert!(parse_device("tpu").is_err());
        assert_eq!(parse_layers("candle"), Ok(Layers::Candle));
        assert!(parse_layers("cudnn").is_err());
        assert_eq!(parse_norm("group:2"), Ok(Norm::Group { groups: 2 }));
    }

    #[test]
    fn defaults_match_train_config() {
        let cli = Cli::try_parse_from(["unet-example", "train"]).unwrap();
        let Command::Train(args) = cli.command else {
            panic!("not train")
        };
        assert_eq!(args.training.config(args.schedule), TrainConfig::default());
        assert_eq!(
            default_output(&TrainConfig::default()),
            PathBuf::from("runs/brain-ce-then-finetune-seed0")
        );
    }

    #[test]
    fn finetune_epochs_follow_epochs_unless_given() {
        let config = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            let Command::Train(args) = cli.command else {
                panic!("not train")
            };
            args.training.config(args.schedule)
        };
        let quick = config(&["unet-example", "train", "--epochs", "5"]);
        assert_eq!((quick.epochs, quick.finetune_epochs), (5, 2));
        quick.validate().unwrap();
        let given = config(&[
            "unet-example",
            "train",
            "--epochs",
            "5",
            "--finetune-epochs",
            "4",
        ]);
        assert_eq!(given.finetune_epochs, 4);
        assert_eq!(given.sampling, Sampling::Equibatch);
        let shuffled = config(&["unet-example", "train", "--sampling", "shuffle"]);
        assert_eq!(shuffled.sampling, Sampling::Shuffle);
    }

    #[test]
    fn val_every_defaults_to_5_and_rejects_0() {
        let Command::Train(t) = Cli::try_parse_from(["unet-example", "train"])
            .unwrap()
            .command
        else {
            panic!("not train")
        };
        assert_eq!(t.runtime.val_every, 5);
        let err = Cli::try_parse_from(["unet-example", "train", "--val-every", "0"]).unwrap_err();
        assert!(err.to_string().contains("--val-every"), "{err}");
    }

    #[test]
    fn resume_conflicts_with_training_flags() {
        assert!(Cli::try_parse_from(["unet-example", "train", "--resume", "x"]).is_ok());
        assert!(
            Cli::try_parse_from(["unet-example", "train", "--resume", "x", "--epochs", "3"])
                .is_err()
        );
        assert!(Cli::try_parse_from([
            "unet-example",
            "train",
            "--resume",
            "x",
            "--stop-after-epochs",
            "1"
        ])
        .is_ok());
    }
}
