//! Reading image and mask files with the `image` crate into [`crate::Sample`] buffers.

use std::collections::HashMap;
use std::path::Path;

use image::{DynamicImage, ImageReader};

use crate::palette::VOID_COLOUR;
use crate::{Error, Result, VOID};

/// Opens and decodes an image file, guessing the format from its content.
pub(crate) fn read_image(path: &Path) -> Result<DynamicImage> {
    let reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader.decode().map_err(|source| Error::Decode {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads an image's `(height, width)` from its header only.
pub(crate) fn image_size(path: &Path) -> Result<(usize, usize)> {
    let reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let (w, h) = reader.into_dimensions().map_err(|source| Error::Decode {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((h as usize, w as usize))
}

/// Loads an image as f32 `[channels, H, W]` in `[0, 1]`; `channels` is 1 (luma) or 3 (RGB).
/// Returns `(pixels, height, width)`.
pub(crate) fn load_image(path: &Path, channels: usize) -> Result<(Vec<f32>, usize, usize)> {
    let img = read_image(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let planar = match channels {
        1 => img.to_luma32f().into_raw(),
        3 => {
            let interleaved = img.to_rgb32f().into_raw();
            let n = w * h;
            let mut planar = vec![0f32; 3 * n];
            for (p, px) in interleaved.chunks_exact(3).enumerate() {
                for (c, &v) in px.iter().enumerate() {
                    planar[c * n + p] = v;
                }
            }
            planar
        }
        other => {
            return Err(Error::Config(format!(
                "images can be loaded with 1 or 3 channels, not {other}"
            )))
        }
    };
    Ok((planar, h, w))
}

/// Loads a mask. Grey masks (8 or 16 bit) hold class indices directly; colour masks
/// (RGB, or palette PNGs, which the decoder expands to RGB) are mapped through `palette`,
/// with [`VOID_COLOUR`] mapped to [`VOID`].
///
/// Every value must be `< num_classes` or [`VOID`]. Returns `(mask, height, width)`.
pub(crate) fn load_mask(
    path: &Path,
    num_classes: usize,
    palette: &[[u8; 3]],
) -> Result<(Vec<u32>, usize, usize)> {
    let img = read_image(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mask: Vec<u32> = match &img {
        DynamicImage::ImageLuma8(_) | DynamicImage::ImageLumaA8(_) => img
            .to_luma8()
            .into_raw()
            .into_iter()
            .map(u32::from)
            .collect(),
        DynamicImage::ImageLuma16(_) | DynamicImage::ImageLumaA16(_) => img
            .to_luma16()
            .into_raw()
            .into_iter()
            .map(u32::from)
            .collect(),
        _ => return map_colours(path, &img, num_classes, palette),
    };
    if let Some((p, &value)) = mask
        .iter()
        .enumerate()
        .find(|(_, &v)| v != VOID && v as usize >= num_classes)
    {
        return Err(Error::MaskValue {
            path: path.to_path_buf(),
            value,
            row: p / w,
            col: p % w,
            num_classes,
        });
    }
    Ok((mask, h, w))
}

/// Maps an RGB mask to class indices through `palette` (first `num_classes` colours).
fn map_colours(
    path: &Path,
    img: &DynamicImage,
    num_classes: usize,
    palette: &[[u8; 3]],
) -> Result<(Vec<u32>, usize, usize)> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut lookup: HashMap<[u8; 3], u32> = palette
        .iter()
        .take(num_classes)
        .enumerate()
        .map(|(i, &c)| (c, i as u32))
        .collect();
    lookup.insert(VOID_COLOUR, VOID);
    let rgb = img.to_rgb8().into_raw();
    let mut mask = Vec::with_capacity(w * h);
    for (p, px) in rgb.chunks_exact(3).enumerate() {
        let colour = [px[0], px[1], px[2]];
        match lookup.get(&colour) {
            Some(&class) => mask.push(class),
            None => {
                return Err(Error::MaskColour {
                    path: path.to_path_buf(),
                    colour,
                    row: p / w,
                    col: p % w,
                    num_classes,
                })
            }
        }
    }
    Ok((mask, h, w))
}
