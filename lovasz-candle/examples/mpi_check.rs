//! The distributed losses over MPI ([`MpiGroup`]) against one process, run under `mpirun`.
//!
//! The collectives first: an all-gather of rank-dependent lengths (rank 0 sends none)
//! and a broadcast from the last rank. Then every rank builds the same seeded batch of `2·N` images (`N` ranks; 4 classes, 6×5
//! pixels, every ninth pixel void 255, class 3 absent from the second half), takes its
//! shard (rank `r`: images `2r, 2r + 1`) and computes the per-batch
//! `distributed::lovasz_softmax`, `distributed::lovasz_softmax_with_logits` and
//! `distributed::lovasz_hinge` over the group, in f32 and f64. Each is compared with the
//! single-process loss on the whole batch, computed on every rank: the value within 1e-6
//! relative, the rank's slice of the gradient bit for bit. Then ranks that disagree (rank
//! 1 passes 3 classes, the others 4) must all get an `Err`, and the group must still
//! work afterwards. The process exits non-zero when any rank found a mismatch, each rank
//! printing what differed.
//!
//! ```text
//! cargo build -p lovasz-candle --features mpi --example mpi_check
//! mpirun -np 3 target/debug/examples/mpi_check
//! target/debug/examples/mpi_check            # a world of one
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle::{DType, Device, Tensor, Var};
use clap::Parser;
use lovasz_candle::distributed::{self, MpiGroup, ProcessGroup, ReduceBuffer};
use lovasz_candle::{
    lovasz_hinge, lovasz_softmax, lovasz_softmax_with_logits, LovaszHingeConfig,
    LovaszSoftmaxConfig,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CLASSES: usize = 4;
const HEIGHT: usize = 6;
const WIDTH: usize = 5;
const IMAGES_PER_RANK: usize = 2;

#[derive(Parser, Debug)]
struct Args {
    /// Seconds a collective waits for the other ranks before it fails.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Seed of the batch (the same on every rank).
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// A loss of `(input, labels)`, over the group when one is given.
type Loss<'a> = &'a dyn Fn(&Tensor, &Tensor, Option<&dyn ProcessGroup>) -> candle::Result<Tensor>;

/// The batch of `images` images: logits `[images, CLASSES, HEIGHT, WIDTH]` f32, class
/// labels `[images, HEIGHT, WIDTH]` u32 (void 255, class 3 only in the first half) and
/// binary labels of the same shape (0/1, void 255).
fn batch(images: usize, seed: u64) -> Result<(Tensor, Tensor, Tensor)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<f32> = (0..images * CLASSES * HEIGHT * WIDTH)
        .map(|_| rng.random_range(-3.0..3.0))
        .collect();
    let pixels = HEIGHT * WIDTH;
    let labels: Vec<u32> = (0..images * pixels)
        .map(|i| {
            let class = rng.random_range(0..CLASSES as u32);
            if i % 9 == 4 {
                255
            } else if class == 3 && i >= images / 2 * pixels {
                0
            } else {
                class
            }
        })
        .collect();
    let binary: Vec<u32> = labels
        .iter()
        .map(|&l| if l == 255 { 255 } else { l % 2 })
        .collect();
    let dev = Device::Cpu;
    Ok((
        Tensor::from_vec(x, (images, CLASSES, HEIGHT, WIDTH), &dev)?,
        Tensor::from_vec(labels, (images, HEIGHT, WIDTH), &dev)?,
        Tensor::from_vec(binary, (images, HEIGHT, WIDTH), &dev)?,
    ))
}

/// The loss of `x` (as f64 values) and its gradient with respect to `x`.
fn value_and_grad(
    x: &Tensor,
    loss: impl Fn(&Tensor) -> candle::Result<Tensor>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let var = Var::from_tensor(x)?;
    let out = loss(var.as_tensor())?;
    let grads = out.sum_all()?.backward()?;
    let grad = grads.get(&var).context("no gradient for the input")?;
    let flat =
        |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    Ok((flat(&out)?, flat(grad)?))
}

/// Compares `loss` on this rank's shard over `group` with `loss` on the whole batch,
/// adding what differs to `failures`.
fn check(
    what: &str,
    group: &MpiGroup,
    x: &Tensor,
    labels: &Tensor,
    loss: Loss,
    failures: &mut Vec<String>,
) -> Result<()> {
    let (whole, whole_grad) = value_and_grad(x, |x| loss(x, labels, None))?;
    let start = group.rank() * IMAGES_PER_RANK;
    let shard_x = x.narrow(0, start, IMAGES_PER_RANK)?.contiguous()?;
    let shard_labels = labels.narrow(0, start, IMAGES_PER_RANK)?.contiguous()?;
    let (value, grad) = value_and_grad(&shard_x, |x| loss(x, &shard_labels, Some(group)))?;
    if value.len() != whole.len() {
        failures.push(format!(
            "{what}: {} values, one process {}",
            value.len(),
            whole.len()
        ));
    }
    for (v, w) in value.iter().zip(&whole) {
        if (v - w).abs() > 1e-6 * w.abs().max(1e-3) {
            failures.push(format!("{what}: loss {v} vs one process {w}"));
        }
    }
    let per_rank = whole_grad.len() / group.world_size();
    let want = &whole_grad[group.rank() * per_rank..(group.rank() + 1) * per_rank];
    if grad.len() != want.len() {
        failures.push(format!(
            "{what}: {} gradient values, want {}",
            grad.len(),
            want.len()
        ));
    }
    let differing: Vec<_> = grad
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
        .collect();
    if let Some((i, (g, w))) = differing.first() {
        failures.push(format!(
            "{what}: {} gradient values differ, first at {i}: {g:e} vs one process {w:e}",
            differing.len()
        ));
    }
    Ok(())
}

/// Every check on this rank; what differed.
fn run(group: &MpiGroup, seed: u64) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    // Rank r sends r bytes r (rank 0 none), and rank N - 1 broadcasts its rank.
    let gathered = group.all_gather(&vec![group.rank() as u8; group.rank()])?;
    let want: Vec<Vec<u8>> = (0..group.world_size()).map(|r| vec![r as u8; r]).collect();
    if gathered != want {
        failures.push(format!("all_gather: {gathered:?}, want {want:?}"));
    }
    let last = group.world_size() - 1;
    let mut b = vec![group.rank() as u8; group.rank() % 2];
    group.broadcast(&mut b, last)?;
    if b != vec![last as u8; last % 2] {
        failures.push(format!("broadcast from rank {last}: {b:?}"));
    }
    let images = IMAGES_PER_RANK * group.world_size();
    let (logits, labels, binary) = batch(images, seed)?;
    let softmax_cfg = LovaszSoftmaxConfig {
        per_image: false,
        ignore_index: Some(255),
        ..Default::default()
    };
    let hinge_cfg = LovaszHingeConfig {
        per_image: false,
        ignore_index: Some(255),
        ..Default::default()
    };
    let softmax: Loss = &|p, l, g| match g {
        Some(g) => distributed::lovasz_softmax(p, l, &softmax_cfg, g),
        None => lovasz_softmax(p, l, &softmax_cfg),
    };
    let with_logits: Loss = &|x, l, g| match g {
        Some(g) => distributed::lovasz_softmax_with_logits(x, l, &softmax_cfg, g),
        None => lovasz_softmax_with_logits(x, l, &softmax_cfg),
    };
    let hinge: Loss = &|x, l, g| match g {
        Some(g) => distributed::lovasz_hinge(x, l, &hinge_cfg, g),
        None => lovasz_hinge(x, l, &hinge_cfg),
    };
    for dtype in [DType::F32, DType::F64] {
        let x = logits.to_dtype(dtype)?;
        let probas = candle_nn::ops::softmax(&x, 1)?;
        check(
            &format!("lovasz_softmax {dtype:?}"),
            group,
            &probas,
            &labels,
            softmax,
            &mut failures,
        )?;
        check(
            &format!("lovasz_softmax_with_logits {dtype:?}"),
            group,
            &x,
            &labels,
            with_logits,
            &mut failures,
        )?;
        let hinge_logits = x.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
        check(
            &format!("lovasz_hinge {dtype:?}"),
            group,
            &hinge_logits,
            &binary,
            hinge,
            &mut failures,
        )?;
    }

    // Ranks that disagree: rank 1 passes 3 classes, the others 4. Every rank must fail.
    if group.world_size() > 1 {
        let classes = if group.rank() == 1 { 3 } else { CLASSES };
        let start = group.rank() * IMAGES_PER_RANK;
        let probas = candle_nn::ops::softmax(&logits.narrow(1, 0, classes)?, 1)?
            .narrow(0, start, IMAGES_PER_RANK)?
            .contiguous()?;
        let shard_labels = labels
            .narrow(0, start, IMAGES_PER_RANK)?
            .clamp(0u32, classes as u32 - 1)?;
        match distributed::lovasz_softmax(&probas, &shard_labels, &softmax_cfg, group) {
            Ok(v) => failures.push(format!(
                "ranks that disagree: got a loss {v} instead of an error"
            )),
            Err(e) => println!("rank {}: disagreeing ranks: {e}", group.rank()),
        }
    }
    Ok(failures)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let group = match MpiGroup::init() {
        Ok(g) => g.timeout(Duration::from_secs(args.timeout_secs)),
        Err(e) => {
            eprintln!("mpi_check: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (rank, world) = (group.rank(), group.world_size());
    let started = Instant::now();
    let failures = match run(&group, args.seed) {
        Ok(f) => f,
        Err(e) => vec![format!("error: {e:#}")],
    };
    for f in &failures {
        eprintln!("rank {rank} of {world}: {f}");
    }
    // The group still works after the disagreement; every rank learns the total.
    let mut total = [failures.len() as u64];
    let summed = group.all_reduce_sum(ReduceBuffer::U64(&mut total));
    let ok = match summed {
        Ok(()) => total[0] == 0,
        Err(e) => {
            eprintln!("rank {rank} of {world}: summing the failures: {e}");
            false
        }
    };
    if rank == 0 {
        println!(
            "mpi_check: {world} rank(s), {} mismatch(es) in all, {:.2?}: {}",
            total[0],
            started.elapsed(),
            if ok { "ok" } else { "FAILED" }
        );
    }
    // Finalises MPI.
    drop(group);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
