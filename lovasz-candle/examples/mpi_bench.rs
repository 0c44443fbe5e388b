//! What the per-batch Lovász-Softmax over MPI ranks costs, and how much of it is
//! communication. Run under `mpirun`: every rank builds the same seeded global batch of
//! logits `[B, C, H, W]` (each pixel's true class a few logits ahead, so that the
//! predictions are right about as often as a half-trained network's), takes its shard of
//! `B / N` images, and times forward + backward of
//! `distributed::lovasz_softmax_with_logits` over the group, against the same loss on
//! its shard alone (what a per-process loss costs). The group is wrapped so that every
//! collective is timed and its bytes counted. Rank 0 prints the medians; the time in
//! collectives includes waiting for the slower rank.
//!
//! ```text
//! cargo build --release -p lovasz-candle --features mpi --example mpi_bench
//! mpirun -np 2 target/release/examples/mpi_bench --batch 4 --classes 15 --height 112 --width 96
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use candle::{Device, Tensor, Var};
use clap::Parser;
use lovasz_candle::distributed::{self, MpiGroup, ProcessGroup, ReduceBuffer};
use lovasz_candle::{lovasz_softmax_with_logits, LovaszSoftmaxConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser, Debug)]
struct Args {
    /// Global batch (images over all ranks; a multiple of the ranks).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Classes.
    #[arg(long, default_value_t = 15)]
    classes: usize,
    /// Image height.
    #[arg(long, default_value_t = 112)]
    height: usize,
    /// Image width.
    #[arg(long, default_value_t = 96)]
    width: usize,
    /// How far the true class's logit leads, on average.
    #[arg(long, default_value_t = 2.0)]
    lead: f32,
    /// Timed repetitions (after 3 untimed ones).
    #[arg(long, default_value_t = 30)]
    reps: usize,
}

/// Time and bytes spent in the collectives of a group.
#[derive(Default, Clone, Copy)]
struct Traffic {
    calls: usize,
    time: Duration,
    sent: usize,
    received: usize,
}

/// A process group whose collectives are timed and counted.
struct Timed<'a> {
    inner: &'a dyn ProcessGroup,
    traffic: Mutex<Traffic>,
}

impl Timed<'_> {
    fn record<T>(
        &self,
        sent: usize,
        run: impl FnOnce() -> candle::Result<T>,
    ) -> candle::Result<(T, Duration)> {
        let start = Instant::now();
        let out = run()?;
        let took = start.elapsed();
        if let Ok(mut t) = self.traffic.lock() {
            t.calls += 1;
            t.time += took;
            t.sent += sent;
        }
        Ok((out, took))
    }

    fn received(&self, bytes: usize) {
        if let Ok(mut t) = self.traffic.lock() {
            t.received += bytes;
        }
    }

    fn take(&self) -> Traffic {
        self.traffic
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default()
    }
}

impl ProcessGroup for Timed<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_gather(&self, bytes: &[u8]) -> candle::Result<Vec<Vec<u8>>> {
        let (parts, _) = self.record(bytes.len(), || self.inner.all_gather(bytes))?;
        let others: usize = (parts.iter().enumerate())
            .filter(|(r, _)| *r != self.rank())
            .map(|(_, p)| p.len())
            .sum();
        self.received(others);
        Ok(parts)
    }

    fn all_reduce_sum(&self, values: ReduceBuffer<'_>) -> candle::Result<()> {
        let width = match &values {
            ReduceBuffer::F32(_) => 4,
            ReduceBuffer::F64(_) | ReduceBuffer::U64(_) => 8,
        };
        let bytes = values.len() * width;
        self.record(bytes, || self.inner.all_reduce_sum(values))?;
        self.received(bytes * (self.world_size() - 1));
        Ok(())
    }

    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> candle::Result<()> {
        let sent = if self.rank() == root { bytes.len() } else { 0 };
        self.record(sent, || self.inner.broadcast(bytes, root))?;
        if self.rank() != root {
            self.received(bytes.len());
        }
        Ok(())
    }
}

/// The seeded global batch: logits `[B, C, H, W]` f32 and labels `[B, H, W]` u32.
fn batch(a: &Args) -> Result<(Tensor, Tensor)> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let pixels = a.height * a.width;
    let labels: Vec<u32> = (0..a.batch * pixels)
        .map(|_| rng.random_range(0..a.classes as u32))
        .collect();
    let mut x = vec![0f32; a.batch * a.classes * pixels];
    for b in 0..a.batch {
        for c in 0..a.classes {
            for p in 0..pixels {
                let mut v: f32 = rng.random_range(-1.0..1.0);
                if labels[b * pixels + p] == c as u32 {
                    v += rng.random_range(0.0..2.0 * a.lead);
                }
                x[(b * a.classes + c) * pixels + p] = v;
            }
        }
    }
    let dev = Device::Cpu;
    Ok((
        Tensor::from_vec(x, (a.batch, a.classes, a.height, a.width), &dev)?,
        Tensor::from_vec(labels, (a.batch, a.height, a.width), &dev)?,
    ))
}

/// Forward + backward of the loss of `x`, timed.
fn timed_step(x: &Tensor, loss: impl Fn(&Tensor) -> candle::Result<Tensor>) -> Result<Duration> {
    let var = Var::from_tensor(x)?;
    let start = Instant::now();
    let grads = loss(var.as_tensor())?.backward()?;
    if grads.get(&var).is_none() {
        bail!("no gradient for the logits")
    }
    Ok(start.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mpi = MpiGroup::init()?;
    let (rank, n) = (mpi.rank(), mpi.world_size());
    if a.batch % n != 0 || a.reps == 0 {
        bail!(
            "--batch {} must be a multiple of the {n} ranks, --reps at least 1",
            a.batch
        )
    }
    let group = Timed {
        inner: &mpi,
        traffic: Mutex::new(Traffic::default()),
    };
    let (x, labels) = batch(&a)?;
    let k = a.batch / n;
    let shard_x = x.narrow(0, rank * k, k)?.contiguous()?;
    let shard_labels = labels.narrow(0, rank * k, k)?.contiguous()?;
    let cfg = LovaszSoftmaxConfig {
        per_image: false,
        ..Default::default()
    };
    let (mut global, mut local, mut comm) = (Vec::new(), Vec::new(), Vec::new());
    let mut traffic = Traffic::default();
    for rep in 0..a.reps + 3 {
        group.take();
        let g = timed_step(&shard_x, |x| {
            distributed::lovasz_softmax_with_logits(x, &shard_labels, &cfg, &group)
        })?;
        let t = group.take();
        // The ranks start the next repetition together, so that one rank's local loss
        // does not count as the other's wait.
        mpi.all_reduce_sum(ReduceBuffer::U64(&mut [0]))?;
        let l = timed_step(&shard_x, |x| {
            lovasz_softmax_with_logits(x, &shard_labels, &cfg)
        })?;
        mpi.all_reduce_sum(ReduceBuffer::U64(&mut [0]))?;
        if rep >= 3 {
            global.push(g.as_secs_f64() * 1e3);
            local.push(l.as_secs_f64() * 1e3);
            comm.push(t.time.as_secs_f64() * 1e3);
            traffic = t;
        }
    }
    let (g, l, c) = (median(global), median(local), median(comm));
    let mut times = [g, l, c];
    // Every rank's medians, so that rank 0 can print the slowest.
    let mut all = vec![0f64; 3 * n];
    all[3 * rank..3 * rank + 3].copy_from_slice(&times);
    mpi.all_reduce_sum(ReduceBuffer::F64(&mut all))?;
    for r in 0..n {
        for (i, t) in times.iter_mut().enumerate() {
            *t = t.max(all[3 * r + i]);
        }
    }
    if rank == 0 {
        let [g, l, c] = times;
        println!(
            "{n} rank(s), global batch {}x{}x{}x{} ({k} image(s) per rank), medians of {} (slowest rank):",
            a.batch, a.classes, a.height, a.width, a.reps
        );
        println!("  global loss, forward + backward: {g:.2} ms, of which {c:.2} ms in {} collectives ({:.0}%)", traffic.calls, 100.0 * c / g);
        println!("  per-shard loss, no communication: {l:.2} ms");
        println!(
            "  bytes per call on rank 0: {:.2} MB sent, {:.2} MB received",
            traffic.sent as f64 / 1e6,
            traffic.received as f64 / 1e6
        );
    }
    Ok(())
}
