//! Forward + backward timing of the Lovász-Softmax on a CUDA device, for the side-by-side
//! comparison of `scripts/gpu-check.sh` with the authors' PyTorch code
//! (`benches/gpu_reference.py`, same shapes, same GPU, classes present as the authors'
//! default).
//!
//! ```text
//! cargo run -p lovasz-candle --features cuda --example gpu_bench -- \
//!     --shape 10,20,300,300 [--per-image] --reps 20
//! ```
//! Prints the median and min / max of `--reps` timed runs after two warm-ups (each run:
//! the loss of probabilities `[B, C, H, W]` that require a gradient, its backward, and a
//! device synchronisation), the peak extra device memory of one run over the input (the
//! high-water mark of the device's memory pool, from which candle allocates, above what was
//! live before), and, as its last line, `median_s=<seconds>`.

use std::time::Instant;

use anyhow::{bail, Result};
use candle::cuda_backend::cudarc::driver::sys;
use candle::{DType, Device, Tensor, Var};
use clap::Parser;
use lovasz_candle::{lovasz_softmax, Classes, LovaszSoftmaxConfig};

#[derive(Parser)]
struct Args {
    /// `B,C,H,W` of the probabilities.
    #[arg(long, default_value = "10,20,300,300")]
    shape: String,
    /// The loss per image (else per batch).
    #[arg(long)]
    per_image: bool,
    /// Timed runs.
    #[arg(long, default_value_t = 20)]
    reps: usize,
}

/// The device's default memory pool: its used bytes now and their high-water mark, which
/// `reset` sets back to the bytes used now.
struct Pool(sys::CUmemoryPool);

impl Pool {
    fn of_current_device() -> Result<Self> {
        let (mut dev, mut pool) = (0, std::ptr::null_mut());
        // SAFETY: plain driver queries into locals, on the current context's device.
        unsafe {
            check(sys::cuCtxGetDevice(&mut dev))?;
            check(sys::cuDeviceGetDefaultMemPool(&mut pool, dev))?;
        }
        Ok(Self(pool))
    }

    fn get(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let mut v = 0u64;
        // SAFETY: the used-memory attributes are 64-bit values.
        unsafe {
            check(sys::cuMemPoolGetAttribute(
                self.0,
                attr,
                &mut v as *mut u64 as *mut _,
            ))?
        };
        Ok(v)
    }

    fn used(&self) -> Result<u64> {
        self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    fn peak(&self) -> Result<u64> {
        self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    fn reset(&self) -> Result<()> {
        let mut zero = 0u64;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: setting the high-water mark takes a 64-bit 0.
        unsafe {
            check(sys::cuMemPoolSetAttribute(
                self.0,
                attr,
                &mut zero as *mut u64 as *mut _,
            ))
        }
    }
}

fn check(r: sys::CUresult) -> Result<()> {
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("CUDA driver call failed: {r:?}")
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dims: Vec<usize> = args
        .shape
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [b, c, h, w] = dims[..] else {
        bail!("--shape takes B,C,H,W")
    };
    let dev = Device::new_cuda(0)?;
    let logits = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
    let probas = candle_nn::ops::softmax(&logits, 1)?;
    let labels = Tensor::rand(0f32, c as f32, (b, h, w), &dev)?
        .floor()?
        .clamp(0f32, (c - 1) as f32)?
        .to_dtype(DType::U32)?;
    let var = Var::from_tensor(&probas)?;
    let cfg = LovaszSoftmaxConfig {
        classes: Classes::Present,
        per_image: args.per_image,
        ..Default::default()
    };
    let step = || -> Result<()> {
        let loss = lovasz_softmax(var.as_tensor(), &labels, &cfg)?;
        let grads = loss.backward()?;
        drop(grads);
        dev.synchronize()?;
        Ok(())
    };
    step()?;
    step()?;
    let pool = Pool::of_current_device()?;
    dev.synchronize()?;
    let before = pool.used()?;
    pool.reset()?;
    step()?;
    let extra = pool.peak()?.saturating_sub(before);
    let mut times = Vec::with_capacity(args.reps);
    for _ in 0..args.reps {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let input = (b * c * h * w * 4) as f64;
    println!(
        "lovasz-candle cuda softmax {b}x{c}x{h}x{w} per_image={}: fwd+bwd median {:.3} ms (min {:.3}, max {:.3}) over {} runs; peak extra device memory {:.1} MiB = {:.2}x the input (includes the gradient)",
        args.per_image,
        median * 1e3,
        times[0] * 1e3,
        times[times.len() - 1] * 1e3,
        times.len(),
        extra as f64 / (1 << 20) as f64,
        extra as f64 / input,
    );
    println!("median_s={median}");
    Ok(())
}
