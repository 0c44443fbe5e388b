//! Prints the embedded brain splits (slice counts, per-class pixel shares), times one
//! epoch of batching, and optionally writes a preview PNG of samples and masks.
//!
//! ```text
//! cargo run --release -p datasets --example summary -- --preview preview.png
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use datasets::{
    class_counts, mask_to_rgb, Batcher, BrainSlices, Dataset, Sample, ShapesConfig, ShapesDataset,
    Split, Transform, TransformConfig,
};

#[derive(Parser, Debug)]
#[command(about = "Summarise the embedded brain slices and time batching")]
struct Args {
    /// Write a PNG with brain and shapes samples (image left, mask right) here.
    #[arg(long)]
    preview: Option<PathBuf>,
    /// Batch size for the timing.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    let splits: Vec<BrainSlices> = Split::ALL
        .iter()
        .map(|&s| BrainSlices::load(s))
        .collect::<Result<_, _>>()?;
    println!("decoded the embedded slices in {:.1?}", start.elapsed());

    let names = splits[0].class_names();
    let counts: Vec<Vec<u64>> = splits.iter().map(class_counts).collect::<Result<_, _>>()?;
    print!("{:12}", "class");
    for ds in &splits {
        print!(" {:>12}", format!("{} ({})", ds.split(), ds.len()));
    }
    println!();
    for (c, name) in names.iter().enumerate() {
        print!("{name:12}");
        for row in &counts {
            let total: u64 = row.iter().sum();
            print!(" {:>11.3}%", 100.0 * row[c] as f64 / total as f64);
        }
        println!();
    }

    let augment = Transform::new(TransformConfig {
        crop: Some((96, 96)),
        hflip: 0.5,
        scale: (0.9, 1.1),
        ..Default::default()
    })?;
    let train: Arc<dyn Dataset> = Arc::new(splits[0].clone());
    let shapes: Arc<dyn Dataset> = Arc::new(ShapesDataset::new(ShapesConfig {
        len: 512,
        ..Default::default()
    }));
    for (name, ds, transform) in [
        ("brain train, no transform", &train, None),
        ("brain train, crop+flip+scale", &train, Some(augment)),
        ("shapes 512 x 64x64, generated", &shapes, None),
    ] {
        for prefetch in [false, true] {
            let mut b = Batcher::new(Arc::clone(ds))
                .batch_size(args.batch_size)
                .shuffle(0)
                .prefetch(prefetch);
            if let Some(t) = &transform {
                b = b.transform(t.clone());
            }
            let start = Instant::now();
            let mut n = 0;
            for batch in b.epoch(0) {
                n += batch?.0.dims()[0];
            }
            println!(
                "{name:32} prefetch={prefetch:5}: {n} samples in {:.1?}",
                start.elapsed()
            );
        }
    }

    if let Some(path) = args.preview {
        let brain = &splits[0];
        let shapes = ShapesDataset::new(ShapesConfig {
            height: 112,
            width: 96,
            ..Default::default()
        });
        let rows: Vec<(Sample, Vec<[u8; 3]>)> = [0, 30, 50, 70]
            .iter()
            .map(|&i| Ok((brain.get(i)?, brain.palette())))
            .chain((0..4).map(|i| Ok((shapes.get(i)?, shapes.palette()))))
            .collect::<datasets::Result<_>>()?;
        let (h, w) = (112, 96);
        let mut canvas = vec![0u8; rows.len() * h * 2 * w * 3];
        for (r, (s, palette)) in rows.iter().enumerate() {
            let mask = mask_to_rgb(&s.mask, palette);
            for y in 0..h {
                for x in 0..w {
                    let p = y * w + x;
                    let row = (r * h + y) * 2 * w;
                    for ch in 0..3 {
                        let plane = if s.channels == 1 { 0 } else { ch };
                        let v = s.image[plane * h * w + p];
                        canvas[(row + x) * 3 + ch] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
                        canvas[(row + w + x) * 3 + ch] = mask[p * 3 + ch];
                    }
                }
            }
        }
        image::save_buffer(
            &path,
            &canvas,
            (2 * w) as u32,
            (rows.len() * h) as u32,
            image::ColorType::Rgb8,
        )?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
