//! An RGB pixel buffer that plotters draws on and that is saved as a PNG. Text uses a
//! subset of DejaVu Sans bundled next to this file, so no system font is needed.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use plotters::coord::Shift;
use plotters::prelude::{BitMapBackend, DrawingArea, IntoDrawingArea};
use plotters::style::FontStyle;

/// DejaVu Sans cut down to Latin-1 (see `DejaVuSans-Latin1.LICENSE`).
static FONT: &[u8] = include_bytes!("DejaVuSans-Latin1.ttf");

/// The drawing area plotters draws on.
pub type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// A white `width × height` RGB image.
pub struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            pixels: vec![255; width as usize * height as usize * 3],
        }
    }

    /// Sets pixel `(x, y)`, which must lie on the canvas.
    pub fn put(&mut self, x: u32, y: u32, rgb: [u8; 3]) {
        let at = (y as usize * self.width as usize + x as usize) * 3;
        self.pixels[at..at + 3].copy_from_slice(&rgb);
    }

    /// Lets `draw` draw with plotters over the current pixels ("sans-serif" text works).
    pub fn draw(&mut self, draw: impl FnOnce(&Area) -> Result<()>) -> Result<()> {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the bundled font DejaVuSans-Latin1.ttf is not a valid font"))?;
        let root = BitMapBackend::with_buffer(&mut self.pixels, (self.width, self.height))
            .into_drawing_area();
        draw(&root)?;
        root.present()?;
        Ok(())
    }

    /// Writes the image as a PNG at `path`.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let encoder = PngEncoder::new_with_quality(
            std::io::BufWriter::new(file),
            CompressionType::Best,
            FilterType::Adaptive,
        );
        encoder
            .write_image(
                &self.pixels,
                self.width,
                self.height,
                ExtendedColorType::Rgb8,
            )
            .with_context(|| format!("cannot write {}", path.display()))
    }
}
