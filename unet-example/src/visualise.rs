//! Colourised predictions as PNG: grids of image | ground truth | prediction for a data
//! set (the rows chosen by [`spread`]), titled, with a legend of the classes' colours;
//! and a mask for a single image file.

use std::path::Path;

use datasets::{mask_to_rgb, Dataset, Sample};
use image::{ImageBuffer, Rgb, RgbImage};
use plotters::prelude::*;

use crate::data::{DataInfo, Normalisation};
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

/// The column titles of a prediction grid.
const TITLES: [&str; 3] = ["image", "ground truth", "prediction"];
/// Height of the title band and of a legend line, in pixels.
const LINE: u32 = 22;

/// Writes a PNG with one row per index of `dataset`: the image, the ground-truth mask
/// and the model's prediction under the column titles, masks coloured with `data`'s
/// palette (void in VOC's beige), and a legend of every class's colour and name below.
pub fn prediction_grid(
    model: &UNet,
    dataset: &dyn Dataset,
    indices: &[usize],
    norm: &Normalisation,
    data: &DataInfo,
    path: &Path,
) -> Result<()> {
    let palette = &data.palette;
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
    let (grid, col_w) = tile(&rows);
    let mut legend: Vec<(&str, [u8; 3])> = data
        .class_names
        .iter()
        .map(String::as_str)
        .zip(palette.iter().copied())
        .collect();
    if samples.iter().any(|s| s.mask.contains(&datasets::VOID)) {
        legend.push(("void (not scored)", datasets::VOID_COLOUR));
    }
    let grid = annotate(&grid, col_w, &legend).map_err(|message| Error::Plot {
        path: path.to_path_buf(),
        message,
    })?;
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

/// Lays rows of panels out on a white canvas, enlarging small panels; also returns the
/// width of a column.
fn tile(rows: &[[RgbImage; 3]]) -> (RgbImage, u32) {
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
    (canvas, col_w)
}

/// `grid` (columns `col_w` wide) under a band of [`TITLES`], above a legend of
/// `(class name, colour)` swatches wrapped to the grid's width.
fn annotate(
    grid: &RgbImage,
    col_w: u32,
    legend: &[(&str, [u8; 3])],
) -> std::result::Result<RgbImage, String> {
    crate::plot::register_font()?;
    let font = ("sans-serif", 14).into_font();
    let text_w = |s: &str| font.box_size(s).map(|(w, _)| w).map_err(|e| e.to_string());
    // The legend's layout: a 14-pixel swatch, its name, wrapped at the grid's width.
    let width = grid.width();
    let (mut x, mut y) = (GAP, 0);
    let mut places = Vec::with_capacity(legend.len());
    for (name, _) in legend {
        let w = 14 + 5 + text_w(name)? + 16;
        if x > GAP && x + w > width {
            (x, y) = (GAP, y + LINE);
        }
        places.push((x, y));
        x += w;
    }
    let legend_h = if legend.is_empty() { 0 } else { y + LINE + GAP };
    let height = LINE + grid.height() + legend_h;
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    image::imageops::replace(&mut canvas, grid, 0, LINE as i64);
    let mut buf = canvas.into_raw();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| e.to_string();
        let style = font.color(&BLACK);
        for (c, title) in TITLES.iter().enumerate() {
            let x0 = GAP + c as u32 * (col_w + GAP) + col_w.saturating_sub(text_w(title)?) / 2;
            root.draw_text(title, &style, (x0 as i32, 4)).map_err(err)?;
        }
        let top = (LINE + grid.height()) as i32;
        for ((name, [r, g, b]), (x, y)) in legend.iter().zip(places) {
            let (x, y) = (x as i32, top + y as i32);
            let swatch = [(x, y + 3), (x + 14, y + 17)];
            root.draw(&Rectangle::new(swatch, RGBColor(*r, *g, *b).filled()))
                .map_err(err)?;
            root.draw(&Rectangle::new(swatch, BLACK.mix(0.5).stroke_width(1)))
                .map_err(err)?;
            root.draw_text(name, &style, (x + 19, y + 2)).map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    RgbImage::from_raw(width, height, buf).ok_or_else(|| "buffer size mismatch".to_string())
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
        let (grid, col_w) = tile(&[[p.clone(), p.clone(), p.clone()], [p.clone(), p.clone(), p]]);
        let f = MIN_PANEL.div_ceil(8) as u32;
        assert_eq!(grid.width(), 3 * 8 * f + 4 * GAP);
        assert_eq!(grid.height(), 2 * 4 * f + 3 * GAP);
        assert_eq!(grid.get_pixel(GAP, GAP), &Rgb([1, 2, 3]));
        assert_eq!(grid.get_pixel(0, 0), &Rgb([255, 255, 255]));
        assert_eq!(col_w, 8 * f);
    }

    #[test]
    fn the_grid_has_titles_and_a_legend_of_every_class() {
        let p = RgbImage::from_pixel(40, 30, Rgb([1, 2, 3]));
        let (grid, col_w) = tile(&[[p.clone(), p.clone(), p]]);
        let names = [
            "background",
            "caudate",
            "putamen",
            "pallidum",
            "thalamus",
            "vermis",
        ];
        let colours = [
            [0, 0, 0],
            [230, 25, 75],
            [60, 180, 75],
            [0, 130, 200],
            [245, 130, 48],
            [145, 30, 180],
        ];
        let legend: Vec<(&str, [u8; 3])> = names.into_iter().zip(colours).collect();
        let out = annotate(&grid, col_w, &legend).unwrap();
        assert_eq!(out.width(), grid.width());
        assert!(
            out.height() >= grid.height() + 2 * LINE,
            "a title band and a legend"
        );
        // The grid sits under the title band, whose text darkens some pixels.
        assert_eq!(out.get_pixel(GAP, LINE + GAP), &Rgb([1, 2, 3]));
        let dark = |y0: u32, y1: u32| {
            (y0..y1)
                .flat_map(|y| (0..out.width()).map(move |x| (x, y)))
                .filter(|&(x, y)| out.get_pixel(x, y)[0] < 128)
                .count()
        };
        assert!(dark(0, LINE) > 20, "no title text");
        // Every class's swatch shows its colour.
        let top = LINE + grid.height();
        for [r, g, b] in colours {
            let found = (top..out.height())
                .flat_map(|y| (0..out.width()).map(move |x| (x, y)))
                .any(|(x, y)| out.get_pixel(x, y) == &Rgb([r, g, b]));
            assert!(found, "no swatch of colour {r},{g},{b}");
        }
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
