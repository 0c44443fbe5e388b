//! Time per training step of the default U-Net on the brain slices (batch 4, 112×96):
//! cross-entropy only vs cross-entropy + Lovász-Softmax (forward, loss, backward, AdamW).
//!
//! `cargo run --release -p unet-example --example step_time [-- [STEPS] [--mode ce|lovasz|both] [--base-width W] [--batch-size B] [--device D] [--layers L] [--split] [--write-batch PATH]]`
//!
//! `--base-width W` times a U-Net of widths W/2W/4W/8W instead of the default 12/24/48/96;
//! `--batch-size B` a batch of B slices (the training split's slices 0, 20, 40, …,
//! wrapping around); `--device cpu|cuda|metal` and `--layers fused|candle` as the
//! `unet-example` command line takes them (on a GPU each step ends with a synchronise).
//!
//! `--split` also prints where a step's time goes: forward pass + loss, backward pass,
//! optimiser update.
//!
//! `--write-batch PATH` writes the batch it times (u32 LE `B, C, H, W`, then the f32
//! images, then the u8 labels) and exits: `benches/unet_twin.py` reads it, so the
//! PyTorch twin times the same step on the same data (`benches/run_step_ratio.sh` runs
//! both side by side and prints the ratio).

use std::time::Instant;

use candle::{Device, Tensor};
use datasets::{BrainSlices, Dataset, Split};
use lovasz_candle::{
    cross_entropy, lovasz_softmax_with_logits, CrossEntropyConfig, LovaszSoftmaxConfig,
};
use unet_example::device::DeviceChoice;
use unet_example::model::{Layers, UNet, UNetConfig};
use unet_example::optim::{AdamW, AdamWConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Options {
    steps: usize,
    modes: Vec<bool>,
    write_batch: Option<String>,
    split: bool,
    model: UNetConfig,
    batch: usize,
    device: DeviceChoice,
    layers: Option<Layers>,
}

fn options() -> Res<Options> {
    let mut o = Options {
        steps: 20,
        modes: vec![false, true, false, true],
        write_batch: None,
        split: false,
        model: UNetConfig::default(),
        batch: 4,
        device: DeviceChoice::Cpu,
        layers: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mode" => {
                o.modes = match args.next().as_deref() {
                    Some("ce") => vec![false],
                    Some("lovasz") => vec![true],
                    Some("both") => vec![false, true],
                    other => return Err(format!("--mode ce|lovasz|both, got {other:?}").into()),
                }
            }
            "--split" => o.split = true,
            "--base-width" => {
                let w = args.next().ok_or("--base-width needs a number")?;
                o.model.base_width = w
                    .parse()
                    .map_err(|_| format!("--base-width takes a positive integer, got {w:?}"))?;
                o.model.validate()?;
            }
            "--batch-size" => {
                let b = args.next().ok_or("--batch-size needs a number")?;
                o.batch = b.parse().ok().filter(|&b| b > 0).ok_or_else(|| {
                    format!("--batch-size takes a positive integer, got {b:?}")
                })?;
            }
            "--device" => o.device = args.next().ok_or("--device needs a name")?.parse()?,
            "--layers" => o.layers = Some(args.next().ok_or("--layers needs a name")?.parse()?),
            "--write-batch" => {
                o.write_batch = Some(args.next().ok_or("--write-batch needs a path")?);
            }
            s => {
                o.steps = s.parse().map_err(|_| {
                    format!(
                        "unknown argument {s:?} (expected STEPS, --mode, --base-width, --batch-size, --device, --layers, --split or --write-batch)"
                    )
                })?
            }
        }
    }
    Ok(o)
}

fn write_batch(path: &str, images: &[f32], masks: &[u8], dims: [u32; 4]) -> Res<()> {
    let mut bytes = Vec::with_capacity(16 + 4 * images.len() + masks.len());
    for d in dims {
        bytes.extend_from_slice(&d.to_le_bytes());
    }
    for v in images {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes.extend_from_slice(masks);
    std::fs::write(path, bytes)?;
    Ok(())
}

fn main() -> Res<()> {
    unet_example::device::limit_elementwise_threads();
    let kept = unet_example::device::keep_freed_memory();
    let opts = options()?;
    let dev = opts.device.open()?;
    let train = BrainSlices::load(Split::Train)?;
    let (mut images, mut masks) = (Vec::new(), Vec::new());
    let b = opts.batch;
    for i in 0..b {
        let s = train.get(i * 20 % train.len())?;
        images.extend(s.image);
        masks.extend(s.mask);
    }
    if let Some(path) = &opts.write_batch {
        let labels = masks
            .iter()
            .map(|&m| u8::try_from(m).map_err(|_| format!("label {m} does not fit a byte")))
            .collect::<Result<Vec<u8>, _>>()?;
        write_batch(path, &images, &labels, [b as u32, 1, 112, 96])?;
        println!("wrote the batch to {path}");
        return Ok(());
    }
    println!(
        "allocator: {}",
        if kept {
            "freed memory kept (keep_freed_memory)"
        } else {
            "left as it is (GLIBC_TUNABLES set, or not glibc)"
        }
    );
    let images = Tensor::from_vec(images, (b, 1, 112, 96), &dev)?;
    let masks = Tensor::from_vec(masks, (b, 112, 96), &dev)?;
    // As `train` runs its epochs (on the CPU: on a worker of the pool the layers use).
    unet_example::device::on_compute_pool(&dev, || {
        time_modes(&opts, &dev, &images, &masks).map_err(|e| e.to_string())
    })?;
    Ok(())
}

/// Times `opts.steps` steps of each mode in `opts.modes` on the batch and prints them.
fn time_modes(opts: &Options, dev: &Device, images: &Tensor, masks: &Tensor) -> Res<()> {
    let steps = opts.steps.max(1);
    let ce_cfg = CrossEntropyConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    let lov_cfg = LovaszSoftmaxConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    for &with_lovasz in &opts.modes {
        let model = UNet::new(&opts.model, 0, dev, opts.layers)?;
        let mut opt = AdamW::new(model.trainable_vars(), AdamWConfig::default())?;
        // Seconds in forward + loss, backward, optimiser, summed over the steps.
        let mut parts = [0f64; 3];
        let mut step = |parts: &mut [f64; 3]| -> Res<()> {
            let t0 = Instant::now();
            let logits = model.forward_t(images, true)?;
            let mut loss = cross_entropy(&logits, masks, &ce_cfg)?;
            if with_lovasz {
                loss = (loss + lovasz_softmax_with_logits(&logits, masks, &lov_cfg)?)?;
            }
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            opt.step(&grads, 1e-3)?;
            dev.synchronize()?; // a no-op on the CPU
            parts[0] += (t1 - t0).as_secs_f64();
            parts[1] += (t2 - t1).as_secs_f64();
            parts[2] += t2.elapsed().as_secs_f64();
            Ok(())
        };
        step(&mut parts)?;
        parts = [0.0; 3];
        let t = Instant::now();
        for _ in 0..steps {
            step(&mut parts)?;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
        let name = if with_lovasz {
            "CE + Lovász-Softmax"
        } else {
            "CE only"
        };
        println!(
            "{name:>20}: {ms:7.1} ms/step ({steps} steps, batch {}, {} layers, {})",
            opts.batch,
            model.layers(),
            unet_example::device::device_name(dev)
        );
        if opts.split {
            let [f, b, o] = parts.map(|p| p * 1e3 / steps as f64);
            println!(
                "{:>20}  forward + loss {f:.1} ms, backward {b:.1} ms, optimiser {o:.1} ms",
                ""
            );
        }
    }
    Ok(())
}
