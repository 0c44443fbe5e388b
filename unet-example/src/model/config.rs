//! The shape of a U-Net: [`UNetConfig`] (input channels, classes, depth, width) and the
//! [`Norm`] after each convolution, with their validation.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The normalisation after each convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Norm {
    /// Batch normalisation: batch statistics in training, running statistics (saved in
    /// the checkpoint) in evaluation.
    Batch,
    /// Group normalisation with this many groups (must divide every width); no running
    /// statistics, the same computation in training and evaluation.
    Group {
        /// Number of channel groups.
        groups: usize,
    },
}

impl std::str::FromStr for Norm {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "batch" | "bn" => Ok(Norm::Batch),
            "group" | "gn" => Ok(Norm::Group { groups: 4 }),
            other => match other.strip_prefix("group:").map(str::parse::<usize>) {
                Some(Ok(groups)) => Ok(Norm::Group { groups }),
                _ => Err(Error::Usage(format!(
                    "unknown normalisation {s:?}: expected batch, group or group:G"
                ))),
            },
        }
    }
}

/// The shape of a [`UNet`](super::UNet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Image channels of the input (1 for the brain slices, 3 for RGB).
    pub in_channels: usize,
    /// Number of classes `C` of the output logits.
    pub num_classes: usize,
    /// Number of resolution levels (the input is pooled `depth - 1` times), at least 1.
    pub depth: usize,
    /// Channels of the first level; level `i` has `base_width · 2^i`.
    pub base_width: usize,
    /// Normalisation after each convolution.
    pub norm: Norm,
}

impl Default for UNetConfig {
    /// The default network: widths 12/24/48/96, batch norm, 1 channel, 15 classes.
    fn default() -> Self {
        UNetConfig {
            in_channels: 1,
            num_classes: 15,
            depth: 4,
            base_width: 12,
            norm: Norm::Batch,
        }
    }
}

impl UNetConfig {
    /// Checks the options: positive sizes, a depth of at most 8, group counts that divide
    /// every width.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Usage(m));
        if self.in_channels == 0 || self.num_classes < 2 {
            return bad(format!(
                "the model needs at least 1 input channel and 2 classes, got {} and {}",
                self.in_channels, self.num_classes
            ));
        }
        if !(1..=8).contains(&self.depth) {
            return bad(format!("depth {} is not in 1..=8", self.depth));
        }
        if self.base_width == 0 {
            return bad("base width must be at least 1".to_string());
        }
        if let Norm::Group { groups } = self.norm {
            if groups == 0 || !self.base_width.is_multiple_of(groups) {
                return bad(format!(
                    "group norm with {groups} groups needs a base width divisible by {groups}, got {}",
                    self.base_width
                ));
            }
        }
        Ok(())
    }

    /// Channels of level `i`.
    pub fn width(&self, level: usize) -> usize {
        self.base_width << level
    }

    /// Image sides must be multiples of this (`2^(depth - 1)`).
    pub fn size_multiple(&self) -> usize {
        1 << (self.depth - 1)
    }
}
