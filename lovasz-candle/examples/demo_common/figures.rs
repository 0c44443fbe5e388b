//! The two figures every demo writes, and the checks of them in the demos' smoke tests.

use std::path::Path;

use anyhow::Result;
use candle::Tensor;

use super::curves::save_curves;
use super::label_grid::save_label_grid;
use super::training::History;

/// Writes `<demo>_curves.png` (each run's loss and `metric`) and `<demo>_grid.png` (rows:
/// `labels`, the `start` prediction titled as given, then each run's prediction), all
/// `[B, H, W]` label tensors, into `out`, and says where.
pub fn write_figures(
    out: &Path,
    demo: &str,
    metric: &str,
    runs: &[History],
    labels: &Tensor,
    start: (&str, &Tensor),
    predictions: &[Tensor],
) -> Result<()> {
    save_curves(&out.join(format!("{demo}_curves.png")), metric, runs)?;
    let mut rows = vec![("labels", labels), start];
    rows.extend(runs.iter().map(|r| r.name).zip(predictions));
    save_label_grid(&out.join(format!("{demo}_grid.png")), &rows)?;
    println!("figures written to {}", out.display());
    Ok(())
}

/// The command line of a demo's smoke test: `batch` images of 24 pixels, 8 iterations,
/// figures written to `output`.
#[cfg(test)]
pub fn tiny_argv(demo: &str, batch: usize, output: &Path) -> Result<Vec<String>> {
    let output = output
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 temp dir"))?;
    let argv = [demo, "--size", "24", "--batch", &batch.to_string()];
    let mut argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    argv.extend(["--iters", "8", "--output", output].map(String::from));
    Ok(argv)
}

/// Checks the figures of a smoke run in `dir`: a grid of `rows` rows of `batch` 24-pixel
/// images, and the 1200×450 curves.
#[cfg(test)]
pub fn assert_smoke_figures(dir: &Path, demo: &str, rows: u32, batch: u32) -> Result<()> {
    let grid = image::open(dir.join(format!("{demo}_grid.png")))?;
    assert_eq!(
        (grid.width(), grid.height()),
        (190 + batch * 28, rows * 28 + 4)
    );
    let curves = image::open(dir.join(format!("{demo}_curves.png")))?;
    assert_eq!((curves.width(), curves.height()), (1200, 450));
    Ok(())
}
