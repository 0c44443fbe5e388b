//! The error type shared by every loader, transform and the batcher.
//!
//! Each variant that comes from a file names that file, so a user with a broken
//! data folder sees which file to fix.

use std::path::PathBuf;

/// Errors from loading, transforming or batching segmentation samples.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read (missing, permissions, ...).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file or folder that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A file exists but could not be decoded as an image (corrupt or unsupported).
    #[error("cannot decode image {}: {source}", path.display())]
    Decode {
        /// The file that failed to decode.
        path: PathBuf,
        /// The decoder's error.
        source: image::ImageError,
    },

    /// An image has no mask with the same stem.
    #[error("missing mask for image {}: expected {}", image.display(), expected.display())]
    MissingMask {
        /// The image without a mask.
        image: PathBuf,
        /// Where the mask was looked for.
        expected: PathBuf,
    },

    /// An image and its mask have different sizes.
    #[error(
        "size mismatch: image {} is {}x{} (HxW) but mask {} is {}x{}",
        image.display(), image_size.0, image_size.1, mask.display(), mask_size.0, mask_size.1
    )]
    SizeMismatch {
        /// The image file.
        image: PathBuf,
        /// The mask file.
        mask: PathBuf,
        /// Image `(height, width)`.
        image_size: (usize, usize),
        /// Mask `(height, width)`.
        mask_size: (usize, usize),
    },

    /// A mask pixel holds a class index `>= num_classes` that is not [`crate::VOID`].
    #[error(
        "mask {} has value {value} at (row {row}, col {col}): not a class index below {num_classes} nor 255 (void)",
        path.display()
    )]
    MaskValue {
        /// The mask file.
        path: PathBuf,
        /// The offending value.
        value: u32,
        /// Pixel row.
        row: usize,
        /// Pixel column.
        col: usize,
        /// The data set's number of classes.
        num_classes: usize,
    },

    /// A colour mask pixel has a colour that is neither in the palette nor the void colour.
    #[error(
        "mask {} has colour {colour:?} at (row {row}, col {col}), which is not in the palette of {num_classes} classes nor the void colour",
        path.display()
    )]
    MaskColour {
        /// The mask file.
        path: PathBuf,
        /// The offending RGB colour.
        colour: [u8; 3],
        /// Pixel row.
        row: usize,
        /// Pixel column.
        col: usize,
        /// The data set's number of classes.
        num_classes: usize,
    },

    /// A file was read but its content is not what the format requires
    /// (a bad NIfTI header, an empty split list, ...).
    #[error("bad format in {}: {message}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// An invalid option (a zero batch size, a negative std, an unsupported split, ...).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A sample index past the end of a data set.
    #[error("index {index} out of range for a data set of {len} samples")]
    Index {
        /// The requested index.
        index: usize,
        /// The data set's length.
        len: usize,
    },

    /// Samples of one batch have different shapes (set a crop in the transform).
    #[error("{0}")]
    Batch(String),

    /// An error from candle while building tensors.
    #[error(transparent)]
    Candle(#[from] candle::Error),

    /// An error from a [`crate::Dataset`] implemented outside this crate
    /// (`Error::Other(e.into())` wraps an `anyhow::Error` or any `std` error).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync + 'static>),

    /// The background thread preparing batches stopped unexpectedly.
    #[error("the batch preparation thread stopped: {0}")]
    Worker(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Format`] for `path`.
    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}
