//! Forward + backward timing of the Lovász losses on large inputs.
//!
//! ```text
//! cargo run --release -p lovasz-candle --example bench -- \
//!     --loss softmax --shape 10,20,300,300 [--per-image] [--dist uniform] --reps 5
//! ```
//! Prints the forward and backward medians, the peak memory allocated by forward +
//! backward above what was live before, plus the working memory the kernel keeps between
//! calls (counted by a wrapper of the system allocator;
//! candle's backward holds a `zeros_like` of the input, the gradient and their sum at
//! once), min / max over `--reps` runs after one warm-up, the time of a bare sort of the
//! same (error, index) keys (the floor of a comparison-sort implementation), and, as its
//! last line, `median_s=<seconds>`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use candle::{Device, Tensor, Var};
use clap::{Parser, ValueEnum};
use lovasz_candle::{
    lovasz_hinge, lovasz_sigmoid, lovasz_softmax, LovaszHingeConfig, LovaszSigmoidConfig,
    LovaszSoftmaxConfig,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

/// The system allocator, counting the bytes live now and their peak, so that the extra
/// memory a loss takes can be reported.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn count_alloc(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        count_alloc(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Loss {
    Softmax,
    Hinge,
    Sigmoid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dist {
    /// Probabilities uniform in [0, 1] (hinge: logits uniform in [-1, 1]), independent of
    /// the labels: the worst case, every error must be ranked.
    Uniform,
    /// Softmax (or sigmoid) of N(0, 1) logits.
    Softmax,
    /// Softmax of 4·onehot(label) + N(0, 1) logits: a well-trained model.
    Trained,
}

/// Times forward + backward of a Lovász loss.
#[derive(Debug, Parser)]
struct Args {
    /// Which loss.
    #[arg(long, value_enum, default_value = "softmax")]
    loss: Loss,
    /// Input shape: B,C,H,W for softmax, B,H,W for hinge and sigmoid.
    #[arg(long, default_value = "10,20,300,300", value_delimiter = ',')]
    shape: Vec<usize>,
    /// One loss per image, averaged (else one loss for the whole batch).
    #[arg(long)]
    per_image: bool,
    /// Input distribution.
    #[arg(long, value_enum, default_value = "uniform")]
    dist: Dist,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seed of the inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Softmax only: the same probabilities in channels-last layout (`[B, H, W, C]`,
    /// `channels_last: true`).
    #[arg(long)]
    channels_last: bool,
}

/// Inputs (`[B, C, *spatial]` for softmax, `[B, *spatial]` for the binary losses) and
/// labels `[B, *spatial]`, drawn from a seeded RNG.
fn inputs(args: &Args) -> Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let (b, c, spatial): (usize, usize, Vec<usize>) = match (args.loss, args.shape.as_slice()) {
        (Loss::Softmax, [b, c, rest @ ..]) if !rest.is_empty() && *c > 0 => (*b, *c, rest.to_vec()),
        (Loss::Hinge | Loss::Sigmoid, [b, rest @ ..]) if !rest.is_empty() => (*b, 2, rest.to_vec()),
        _ => bail!(
            "--shape {:?} does not fit --loss {:?}",
            args.shape,
            args.loss
        ),
    };
    let s: usize = spatial.iter().product();
    let labels: Vec<u32> = (0..b * s).map(|_| rng.random_range(0..c as u32)).collect();
    let normal = Normal::new(0f32, 1.0)?;
    // Scores per (image, class, pixel): probabilities for softmax / sigmoid, logits for hinge.
    let mut x = vec![0f32; b * c * s];
    for img in 0..b {
        for k in 0..c {
            for i in 0..s {
                let shift = if labels[img * s + i] == k as u32 {
                    4.0
                } else {
                    0.0
                };
                x[(img * c + k) * s + i] = match args.dist {
                    Dist::Uniform => rng.random::<f32>(),
                    Dist::Softmax => normal.sample(&mut rng),
                    Dist::Trained => shift + normal.sample(&mut rng),
                };
            }
        }
    }
    let x = Tensor::from_vec(x, (b, c, s), &dev)?;
    let x = match (args.loss, args.dist) {
        (Loss::Softmax, Dist::Uniform) => x,
        (Loss::Softmax, _) => candle_nn::ops::softmax(&x, 1)?,
        (Loss::Hinge, Dist::Uniform) => x.narrow(1, 1, 1)?.affine(2.0, -1.0)?.squeeze(1)?,
        (Loss::Sigmoid, Dist::Uniform) => x.narrow(1, 1, 1)?.squeeze(1)?,
        // Binary losses: the logit of class 1 against class 0.
        (Loss::Hinge, _) => (x.narrow(1, 1, 1)? - x.narrow(1, 0, 1)?)?.squeeze(1)?,
        (Loss::Sigmoid, _) => {
            candle_nn::ops::sigmoid(&(x.narrow(1, 1, 1)? - x.narrow(1, 0, 1)?)?.squeeze(1)?)?
        }
    };
    let labels = Tensor::from_vec(labels, (b, s), &dev)?;
    let mut label_dims = vec![b];
    label_dims.extend(&spatial);
    let mut x_dims = label_dims.clone();
    if args.loss == Loss::Softmax {
        x_dims.insert(1, c);
    }
    Ok((x.reshape(x_dims)?, labels.reshape(label_dims)?))
}

/// One run of forward + backward.
struct Run {
    forward_s: f64,
    backward_s: f64,
    /// Peak bytes allocated above what was live before the forward pass, during the
    /// forward pass alone and overall (the gradient, which the caller keeps, included),
    /// plus the working memory the kernel kept from earlier calls (live before, but the
    /// loss's own).
    forward_peak: usize,
    peak: usize,
}

fn run(args: &Args, x: &Tensor, labels: &Tensor) -> Result<Run> {
    let var = Var::from_tensor(x)?;
    let kept = lovasz_candle::memory::cached_buffer_bytes();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let start = Instant::now();
    let loss = match args.loss {
        Loss::Softmax => {
            let cfg = LovaszSoftmaxConfig {
                per_image: args.per_image,
                channels_last: args.channels_last,
                ..Default::default()
            };
            lovasz_softmax(var.as_tensor(), labels, &cfg)?
        }
        Loss::Hinge => {
            let cfg = LovaszHingeConfig {
                per_image: args.per_image,
                ignore_index: None,
                ..Default::default()
            };
            lovasz_hinge(var.as_tensor(), labels, &cfg)?
        }
        Loss::Sigmoid => {
            let cfg = LovaszSigmoidConfig {
                per_image: args.per_image,
                ignore_index: None,
                ..Default::default()
            };
            lovasz_sigmoid(var.as_tensor(), labels, &cfg)?
        }
    };
    let forward = start.elapsed().as_secs_f64();
    let forward_peak = PEAK.load(Ordering::Relaxed) - before + kept;
    let grads = loss.backward()?;
    let elapsed = start.elapsed().as_secs_f64();
    if grads.get(&var).is_none() || !loss.to_scalar::<f32>()?.is_finite() {
        bail!("no gradient or a non-finite loss");
    }
    let peak = PEAK.load(Ordering::Relaxed) - before + kept;
    drop(grads);
    Ok(Run {
        forward_s: forward,
        backward_s: elapsed - forward,
        forward_peak,
        peak,
    })
}

/// Time of sorting the same (error, index) keys, packed in u64, one rayon job per
/// (group, class): the floor of any exact sort-based implementation.
fn sort_floor(args: &Args, x: &Tensor, labels: &Tensor) -> Result<f64> {
    let b = x.dim(0)?;
    let x3 = x.reshape((
        b,
        if args.loss == Loss::Softmax {
            x.dim(1)?
        } else {
            1
        },
        (),
    ))?;
    let (_, c, s) = x3.dims3()?;
    let data = x3.flatten_all()?.to_vec1::<f32>()?;
    let lab = labels.flatten_all()?.to_vec1::<u32>()?;
    let groups: Vec<(usize, usize)> = if args.per_image {
        (0..b).map(|i| (i, i + 1)).collect()
    } else {
        vec![(0, b)]
    };
    let jobs: Vec<(usize, usize, usize)> = groups
        .iter()
        .flat_map(|&(g0, g1)| (0..c).map(move |k| (g0, g1, k)))
        .collect();
    let start = Instant::now();
    let total: usize = jobs
        .par_iter()
        .map(|&(g0, g1, k)| {
            let mut keys = Vec::with_capacity((g1 - g0) * s);
            for img in g0..g1 {
                let row = &data[(img * c + k) * s..][..s];
                for (i, &p) in row.iter().enumerate() {
                    let fg = lab[img * s + i] == k as u32;
                    let e = if fg { 1.0 - p } else { p };
                    keys.push((u64::from(!e.abs().to_bits()) << 32) | ((img - g0) * s + i) as u64);
                }
            }
            keys.sort_unstable();
            keys.len()
        })
        .sum();
    let elapsed = start.elapsed().as_secs_f64();
    if total != b * c * s {
        bail!("sorted {total} keys, expected {}", b * c * s);
    }
    Ok(elapsed)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if args.channels_last && args.loss != Loss::Softmax {
        bail!("--channels-last is for --loss softmax");
    }
    let (x, labels) = inputs(&args)?;
    // The loss's input; the bare sort reads the channels-first `x`.
    let input = if args.channels_last {
        let mut order: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
        order.push(1);
        x.permute(order)?.contiguous()?
    } else {
        x.clone()
    };
    // glibc's allocator settings change the time of fresh large buffers (see docs/benchmarks.md,
    // "Fresh memory"): the line names them so that a log tells which were in force.
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_else(|_| "unset".to_string());
    println!(
        "loss={:?} shape={:?} per_image={} dist={:?} threads={} GLIBC_TUNABLES={tunables}",
        args.loss,
        input.dims(),
        args.per_image,
        args.dist,
        rayon::current_num_threads()
    );
    run(&args, &input, &labels)?;
    let runs: Vec<Run> = (0..args.reps)
        .map(|_| run(&args, &input, &labels))
        .collect::<Result<_>>()?;
    let mut times: Vec<f64> = runs.iter().map(|r| r.forward_s + r.backward_s).collect();
    let peak = runs.iter().map(|r| r.peak).max().unwrap_or(0);
    let forward_peak = runs.iter().map(|r| r.forward_peak).max().unwrap_or(0);
    let mut forward: Vec<f64> = runs.iter().map(|r| r.forward_s).collect();
    let mut backward: Vec<f64> = runs.iter().map(|r| r.backward_s).collect();
    let mut floors: Vec<f64> = (0..args.reps.min(3))
        .map(|_| sort_floor(&args, &x, &labels))
        .collect::<Result<_>>()?;
    let med = median(&mut times);
    let elems = x.elem_count() as f64;
    println!(
        "forward_median_s={:.4} backward_median_s={:.4}",
        median(&mut forward),
        median(&mut backward)
    );
    let input_bytes = x.elem_count() * x.dtype().size_in_bytes();
    let ratio = |b: usize| b as f64 / input_bytes as f64;
    println!(
        "peak_extra_mb={:.1} ({:.2}x the input of {:.1} MB; forward alone {:.2}x)",
        peak as f64 / 1e6,
        ratio(peak),
        input_bytes as f64 / 1e6,
        ratio(forward_peak)
    );
    println!(
        "min_s={:.4} max_s={:.4} sort_floor_s={:.4} throughput={:.1} Mpix*class/s",
        times[0],
        times[times.len() - 1],
        median(&mut floors),
        elems / med / 1e6
    );
    println!("median_s={med:.4}");
    Ok(())
}
