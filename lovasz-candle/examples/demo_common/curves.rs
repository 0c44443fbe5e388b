//! The curves figure: training loss and IoU per iteration, one line per run.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use super::canvas::{Area, Canvas};
use super::training::History;

/// Line colours of the runs, in order.
const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Saves a PNG with two panels side by side: each run's loss, and its `metric` (an IoU,
/// plotted in percent), against the iteration.
pub fn save_curves(path: &Path, metric: &str, runs: &[History]) -> Result<()> {
    let losses: Vec<(&str, Vec<f64>)> = runs.iter().map(|r| (r.name, r.loss.clone())).collect();
    let ious: Vec<(&str, Vec<f64>)> = runs
        .iter()
        .map(|r| (r.name, r.metric.iter().map(|v| 100.0 * v).collect()))
        .collect();
    let mut canvas = Canvas::new(1200, 450);
    canvas.draw(|root| {
        let (left, right) = root.split_horizontally(600);
        panel(
            &left,
            "training loss",
            &losses,
            SeriesLabelPosition::UpperRight,
        )?;
        panel(
            &right,
            &format!("{metric} (%)"),
            &ious,
            SeriesLabelPosition::LowerRight,
        )
    })?;
    canvas.save_png(path)
}

/// One chart of `series` (name, value per iteration) titled `title`.
fn panel(
    area: &Area,
    title: &str,
    series: &[(&str, Vec<f64>)],
    legend: SeriesLabelPosition,
) -> Result<()> {
    let last = series
        .iter()
        .map(|(_, v)| v.len())
        .max()
        .unwrap_or(0)
        .max(2)
        - 1;
    let finite = series
        .iter()
        .flat_map(|(_, v)| v)
        .copied()
        .filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo < hi {
        let pad = 0.05 * (hi - lo);
        (lo - pad, hi + pad)
    } else if lo.is_finite() {
        (lo - 0.5, lo + 0.5)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0..last, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("iteration")
        .label_style(("sans-serif", 13))
        .draw()?;
    for (i, (name, values)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points = values.iter().copied().enumerate();
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(legend)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
