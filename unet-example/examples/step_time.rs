//! Time per training step of the default U-Net on the brain slices (batch 4, 112×96):
//! cross-entropy only vs cross-entropy + Lovász-Softmax (forward, loss, backward, AdamW).
//!
//! `cargo run --release -p unet-example --example step_time [-- STEPS]`

use std::time::Instant;

use candle::{Device, Tensor};
use datasets::{BrainSlices, Dataset, Split};
use lovasz_candle::{
    cross_entropy, lovasz_softmax_with_logits, CrossEntropyConfig, LovaszSoftmaxConfig,
};
use unet_example::model::{UNet, UNetConfig};
use unet_example::optim::{AdamW, AdamWConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    unet_example::device::limit_elementwise_threads();
    let kept = unet_example::device::keep_freed_memory();
    println!(
        "allocator: {}",
        if kept {
            "freed memory kept (keep_freed_memory)"
        } else {
            "left as it is (GLIBC_TUNABLES set, or not glibc)"
        }
    );
    let steps: usize = std::env::args().nth(1).map_or(Ok(20), |s| s.parse())?;
    let dev = Device::Cpu;
    let train = BrainSlices::load(Split::Train)?;
    let (mut images, mut masks) = (Vec::new(), Vec::new());
    for i in 0..4 {
        let s = train.get(i * 20)?;
        images.extend(s.image);
        masks.extend(s.mask);
    }
    let images = Tensor::from_vec(images, (4, 1, 112, 96), &dev)?;
    let masks = Tensor::from_vec(masks, (4, 112, 96), &dev)?;
    let ce_cfg = CrossEntropyConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    let lov_cfg = LovaszSoftmaxConfig {
        ignore_index: Some(255),
        ..Default::default()
    };
    for with_lovasz in [false, true, false, true] {
        let model = UNet::new(&UNetConfig::default(), 0, &dev)?;
        let mut opt = AdamW::new(model.trainable_vars(), AdamWConfig::default())?;
        let mut step = || -> Result<(), Box<dyn std::error::Error>> {
            let logits = model.forward_t(&images, true)?;
            let mut loss = cross_entropy(&logits, &masks, &ce_cfg)?;
            if with_lovasz {
                loss = (loss + lovasz_softmax_with_logits(&logits, &masks, &lov_cfg)?)?;
            }
            opt.step(&loss.backward()?, 1e-3)?;
            Ok(())
        };
        step()?;
        let t = Instant::now();
        for _ in 0..steps {
            step()?;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
        let name = if with_lovasz {
            "CE + Lovász-Softmax"
        } else {
            "CE only"
        };
        println!("{name:>20}: {ms:7.1} ms/step ({steps} steps)");
    }
    Ok(())
}
