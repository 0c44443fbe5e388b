//! Colourised predictions as PNG: grids of image | ground truth | prediction for a data
//! set (the rows chosen by [`spread`]), and a mask for a single image file.

use std::path::Path;

use datasets::{mask_to_rgb, Dataset, Sample};
use image::{ImageBuffer, Rgb, RgbImage};

use crate::data::Normalisation;
use crate::eval::predict_samples;
use crate::model::UNet;
use crate::{Error, Result};

/// Gap between panels, in pixels.
const GAP: u32 = 4;
/// Panels smaller than this (longer side) are enlarged by an integer factor.
const MIN_PANEL: usize = 160;

/// `k` indices spread evenly over `0..n`.
pub fn spread(n: usize, k: usize) -> Vec<usize> {
    if k == 0 || n == 0 {
        return Vec::new();
    }
    (0..k.min(n))
        .map(|i| (2 * i + 1) * n / (2 * k.min(n)))
        .collect()
}

/// Writes a PNG with one row per index of `dataset`: the image, the ground-truth mask
/// and the model's prediction, masks coloured with `palette` (void in VOC's beige).
pub fn prediction_grid(
    model: &UNet,
    dataset: &dyn Dataset,
    indices: &[usize],
    norm: &Normalisation,
    palette: &[[u8; 3]],
    path: &Path,
) -> Result<()> {
    let samples = indices
        .iter()
        .map(|&i| dataset.get(i))
        .collect::<datasets::Result<Vec<_>>>()?;
    let preds = predict_samples(model, &samples, norm, 8)?;
    let rows: Vec<[RgbImage; 3]> = samples
        .iter()
        .zip(&preds)
        .map(|(s, p)| {
            let (w, h) = (s.width as u32, s.height as u32);
            [
                image_panel(s),
                rgb_panel(w, h, mask_to_rgb(&s.mask, palette)),
                rgb_panel(w, h, mask_to_rgb(p, palette)),
            ]
        })
        .collect();
    let grid = tile(&rows);
    grid.save(path).map_err(|source| Error::Image {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes the colourised prediction (or, with `index`, the class indices as 8-bit grey
/// values) for `sample`, an image of any size.
pub fn write_mask(
    model: &UNet,
    sample: &Sample,
    norm: &Normalisation,
    palette: &[[u8; 3]],
    index: bool,
    path: &Path,
) -> Result<Vec<u32>> {
    let pred = predict_samples(model, std::slice::from_ref(sample), norm, 1)?
        .pop()
        .unwrap_or_default();
    let (w, h) = (sample.width as u32, sample.height as u32);
    let result = if index {
        let grey: Vec<u8> = pred.iter().map(|&c| c.min(255) as u8).collect();
        image::GrayImage::from_raw(w, h, grey)
            .ok_or_else(|| size_error(path))?
            .save(path)
    } else {
        rgb_panel(w, h, mask_to_rgb(&pred, palette)).save(path)
    };
    result.map_err(|source| Error::Image {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(pred)
}

/// Reads an image file as a [`Sample`] with `channels` channels (1: luminance, 3: RGB),
/// intensities in `[0, 1]` and an all-void mask.
pub fn read_image(path: &Path, channels: usize) -> Result<Sample> {
    let img = image::open(path).map_err(|source| Error::Image {
        path: path.to_path_buf(),
        source,
    })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let image: Vec<f32> = match channels {
        1 => img
            .to_luma8()
            .into_raw()
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect(),
        3 => {
            let rgb = img.to_rgb8().into_raw();
            (0..3)
                .flat_map(|c| rgb.iter().skip(c).step_by(3).map(|&v| v as f32 / 255.0))
                .collect()
        }
        c => {
            return Err(Error::Usage(format!(
            "the model takes {c}-channel images; only 1 (grey) and 3 (RGB) can be read from files"
        )))
        }
    };
    Ok(Sample::new(
        image,
        vec![datasets::VOID; w * h],
        channels,
        h,
        w,
    )?)
}

fn size_error(path: &Path) -> Error {
    Error::Plot {
        path: path.to_path_buf(),
        message: "buffer does not match the image size".to_string(),
    }
}

/// An image in `[0, 1]` as RGB: grey for one channel, the first three channels else.
fn image_panel(s: &Sample) -> RgbImage {
    let plane = s.height * s.width;
    let byte = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let mut rgb = Vec::with_capacity(plane * 3);
    for i in 0..plane {
        for c in 0..3 {
            let ch = if s.channels >= 3 { c } else { 0 };
            rgb.push(byte(s.image[ch * plane + i]));
        }
    }
    rgb_panel(s.width as u32, s.height as u32, rgb)
}

fn rgb_panel(w: u32, h: u32, rgb: Vec<u8>) -> RgbImage {
    ImageBuffer::from_raw(w, h, rgb).unwrap_or_else(|| RgbImage::new(w, h))
}

/// Lays rows of panels out on a white canvas, enlarging small panels.
fn tile(rows: &[[RgbImage; 3]]) -> RgbImage {
    let max_side = rows
        .iter()
        .flatten()
        .map(|p| p.width().max(p.height()) as usize)
        .max()
        .unwrap_or(1);
    let f = MIN_PANEL.div_ceil(max_side).max(1) as u32;
    let col_w = rows.iter().flatten().map(|p| p.width()).max().unwrap_or(1) * f;
    let heights: Vec<u32> = rows
        .iter()
        .map(|r| r.iter().map(|p| p.height()).max().unwrap_or(1) * f)
        .collect();
    let width = 3 * col_w + 4 * GAP;
    let height = heights.iter().sum::<u32>() + (rows.len() as u32 + 1) * GAP;
    let mut canvas = RgbImage::from_pixel(width.max(1), height.max(1), Rgb([255, 255, 255]));
    let mut y0 = GAP;
    for (row, h) in rows.iter().zip(&heights) {
        for (c, panel) in row.iter().enumerate() {
            let x0 = GAP + c as u32 * (col_w + GAP);
            for (x, y, px) in panel.enumerate_pixels() {
                for dy in 0..f {
                    for dx in 0..f {
                        canvas.put_pixel(x0 + x * f + dx, y0 + y * f + dy, *px);
                    }
                }
            }
        }
        y0 += h + GAP;
    }
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_picks_distinct_indices() {
        assert_eq!(spread(30, 3), vec![5, 15, 25]);
        assert_eq!(spread(2, 5), vec![0, 1]);
        assert!(spread(0, 3).is_empty());
    }

    #[test]
    fn tile_enlarges_and_spaces_panels() {
        let p = RgbImage::from_pixel(8, 4, Rgb([1, 2, 3]));
        let grid = tile(&[[p.clone(), p.clone(), p.clone()], [p.clone(), p.clone(), p]]);
        let f = MIN_PANEL.div_ceil(8) as u32;
        assert_eq!(grid.width(), 3 * 8 * f + 4 * GAP);
        assert_eq!(grid.height(), 2 * 4 * f + 3 * GAP);
        assert_eq!(grid.get_pixel(GAP, GAP), &Rgb([1, 2, 3]));
        assert_eq!(grid.get_pixel(0, 0), &Rgb([255, 255, 255]));
    }

    #[test]
    fn reads_grey_and_rgb_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        RgbImage::from_pixel(5, 3, Rgb([255, 0, 0]))
            .save(&path)
            .unwrap();
        let rgb = read_image(&path, 3).unwrap();
        assert_eq!((rgb.channels, rgb.height, rgb.width), (3, 3, 5));
        assert_eq!(rgb.image[0], 1.0);
        assert_eq!(rgb.image[15], 0.0);
        let grey = read_image(&path, 1).unwrap();
        assert_eq!(grey.image.len(), 15);
        assert!(read_image(&dir.path().join("missing.png"), 1).is_err());
    }
}
