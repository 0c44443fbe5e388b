//! `curves.png`: training loss and validation mIoU per epoch, with the switch from
//! cross-entropy to fine-tuning marked. Drawn with plotters into a memory buffer and
//! encoded with `image`, with a font compiled in (DejaVu Sans, `assets/`), so no system
//! library or font is needed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::train::EpochRecord;
use crate::{Error, Result};

/// DejaVu Sans 2.37 (Debian's fonts-dejavu-core; licence in `assets/`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the embedded font as plotters' "sans-serif" (once).
pub(crate) fn register_font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
                .map_err(|_| "the embedded font is invalid".to_string())
        })
        .clone()
}

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 420;

/// Draws loss (total, cross-entropy, Lovász) and validation mIoU against the epoch, a
/// dashed line between epochs `switch` and `switch + 1` when fine-tuning starts.
pub fn curves(
    path: &Path,
    history: &[EpochRecord],
    switch: Option<usize>,
    title: &str,
) -> Result<()> {
    let err = |message: String| Error::Plot {
        path: path.to_path_buf(),
        message,
    };
    register_font().map_err(err)?;
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut buf, history, switch, title).map_err(|e| err(e.to_string()))?;
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .ok_or_else(|| err("buffer size mismatch".to_string()))?;
    crate::atomic_file::write_atomically(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|source| Error::Image {
                path: path.to_path_buf(),
                source,
            })
    })
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(buf: &mut [u8], history: &[EpochRecord], switch: Option<usize>, title: &str) -> DrawResult {
    let root = BitMapBackend::with_buffer(buf, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    let n = history.len().max(1) as f64;
    let x_range = 0.5..n + 0.5;

    let series = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.epoch as f64, v)))
            .collect()
    };
    let total = series(&|r| Some(r.loss));
    let ce = series(&|r| Some(r.ce));
    let lovasz = series(&|r| r.lovasz);
    let y_max = total
        .iter()
        .chain(&ce)
        .chain(&lovasz)
        .map(|p| p.1)
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;

    let mut chart = ChartBuilder::on(&left)
        .caption("training loss", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(x_range.clone(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (points, colour, label) in [
        (&total, BLACK, "total (optimised)"),
        (&ce, BLUE, "cross-entropy"),
        (&lovasz, RED, "Lovász-Softmax"),
    ] {
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    if let Some(s) = switch {
        draw_switch(&mut chart, s, 0.0, y_max)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperMiddle)
        .draw()?;

    let miou: Vec<(f64, f64)> = series(&|r| r.val_miou.map(|m| 100.0 * m));
    let top = miou.iter().map(|p| p.1).fold(0.0f64, f64::max);
    let y_top = ((top / 10.0).ceil() * 10.0).clamp(10.0, 100.0);
    let mut chart = ChartBuilder::on(&right)
        .caption("validation mIoU", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(x_range, 0.0..y_top)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("mIoU (%)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart.draw_series(LineSeries::new(miou.iter().copied(), GREEN.stroke_width(2)))?;
    chart.draw_series(miou.iter().map(|&p| Circle::new(p, 2, GREEN.filled())))?;
    if let Some(s) = switch {
        draw_switch(&mut chart, s, 0.0, y_top)?;
    }
    root.present()?;
    Ok(())
}

/// A dashed vertical line at `switch + 0.5` labelled "fine-tune".
fn draw_switch<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    switch: usize,
    y0: f64,
    y1: f64,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let x = switch as f64 + 0.5;
    let steps = 40;
    let dashes = (0..steps).step_by(2).map(|i| {
        let a = y0 + (y1 - y0) * i as f64 / steps as f64;
        let b = y0 + (y1 - y0) * (i + 1) as f64 / steps as f64;
        PathElement::new(vec![(x, a), (x, b)], BLACK.mix(0.6).stroke_width(1))
    });
    chart.draw_series(dashes)?;
    chart.draw_series(std::iter::once(Text::new(
        " fine-tune →",
        (x, y0 + 0.6 * (y1 - y0)),
        ("sans-serif", 13).into_font().color(&BLACK.mix(0.7)),
    )))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Phase;

    #[test]
    fn draws_a_png() {
        let history: Vec<EpochRecord> = (1..=5)
            .map(|e| EpochRecord {
                epoch: e,
                phase: if e > 3 { Phase::Combined } else { Phase::Ce },
                lr: 1e-3,
                loss: 2.0 / e as f64,
                ce: 1.5 / e as f64,
                lovasz: (e > 3).then_some(0.5),
                val_miou: Some(0.1 * e as f64),
                val_pixel_accuracy: Some(0.9),
                val_iou: vec![],
                steps: 2,
                train_seconds: 1.0,
                eval_seconds: 0.1,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        curves(&path, &history, Some(3), "test").unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
        curves(&path, &[], None, "empty").unwrap();
    }
}
