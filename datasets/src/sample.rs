//! One image with its segmentation mask, as host arrays.

use crate::{Error, Result, VOID};

/// One segmentation sample held on the host.
///
/// - `image`: f32 `[channels, height, width]`, row-major (planar, not interleaved).
///   Loaders give intensities in `[0, 1]`; a [`crate::Transform`] may normalise them.
/// - `mask`: u32 `[height, width]`, row-major; each value is a class index
///   `< num_classes` or [`VOID`] (255, ignored by losses and metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// f32 `[channels, height, width]` row-major.
    pub image: Vec<f32>,
    /// u32 `[height, width]` row-major, class indices or [`VOID`].
    pub mask: Vec<u32>,
    /// Number of image channels (1 for grey, 3 for RGB).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

impl Sample {
    /// Builds a sample after checking that `image` holds `channels * height * width`
    /// values and `mask` holds `height * width`.
    pub fn new(
        image: Vec<f32>,
        mask: Vec<u32>,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Result<Self> {
        let sample = Sample {
            image,
            mask,
            channels,
            height,
            width,
        };
        sample.check()?;
        Ok(sample)
    }

    /// Checks that the buffer lengths agree with `channels`, `height` and `width`.
    pub fn check(&self) -> Result<()> {
        let pixels = self.height * self.width;
        if self.image.len() != self.channels * pixels || self.mask.len() != pixels {
            return Err(Error::Config(format!(
                "sample buffers do not match its shape [{}, {}, {}]: image has {} values, mask has {}",
                self.channels,
                self.height,
                self.width,
                self.image.len(),
                self.mask.len()
            )));
        }
        Ok(())
    }

    /// The number of pixels of each class: a vector of `num_classes` counts;
    /// [`VOID`] and out-of-range values are not counted.
    pub fn class_counts(&self, num_classes: usize) -> Vec<u64> {
        let mut counts = vec![0u64; num_classes];
        for &m in &self.mask {
            if m != VOID {
                if let Some(c) = counts.get_mut(m as usize) {
                    *c += 1;
                }
            }
        }
        counts
    }
}
