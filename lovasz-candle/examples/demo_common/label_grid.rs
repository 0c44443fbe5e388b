//! The prediction figure: rows of label images in the Pascal VOC palette
//! (`datasets::voc_colour`), each row titled on its left (ground truth, then the
//! predictions of each run).

use std::path::Path;

use anyhow::{ensure, Result};
use candle::{DType, Tensor};
use datasets::voc_colour;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::canvas::Canvas;

/// Width of the row titles, in pixels.
const TITLE_WIDTH: u32 = 190;
/// Gap between images, in pixels.
const GAP: u32 = 4;

/// Saves a PNG with one row per `(title, images)`, `images` a `[B, H, W]` integer tensor
/// of label values (all rows of the same shape), drawn in the VOC palette (void, 255, in
/// light beige).
pub fn save_label_grid(path: &Path, rows: &[(&str, &Tensor)]) -> Result<()> {
    let Some((_, first)) = rows.first() else {
        return Ok(());
    };
    let (batch, h, w) = first.dims3()?;
    let (cols, h32, w32) = (batch as u32, h as u32, w as u32);
    let mut canvas = Canvas::new(
        TITLE_WIDTH + cols * (w32 + GAP),
        rows.len() as u32 * (h32 + GAP) + GAP,
    );
    for (row, (title, images)) in rows.iter().enumerate() {
        ensure!(
            images.dims() == first.dims(),
            "row {title:?} has shape {:?}, expected {:?}",
            images.dims(),
            first.dims()
        );
        let values = images.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
        let top = GAP + row as u32 * (h32 + GAP);
        for (i, image) in values.chunks(h * w).enumerate() {
            let left = TITLE_WIDTH + i as u32 * (w32 + GAP);
            for (p, &label) in image.iter().enumerate() {
                let (x, y) = ((p % w) as u32, (p / w) as u32);
                canvas.put(left + x, top + y, voc_colour(label));
            }
        }
    }
    canvas.draw(|root| {
        for (row, (title, _)) in rows.iter().enumerate() {
            let middle = GAP + row as u32 * (h32 + GAP) + h32 / 2;
            let style = ("sans-serif", 16)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center));
            root.draw(&Text::new(*title, (8, middle as i32), style))?;
        }
        Ok(())
    })?;
    canvas.save_png(path)
}
