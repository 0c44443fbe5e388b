//! The error type of the example: every failure a user can cause (a bad flag, a missing
//! folder, a checkpoint from another model) is a variant with a message that says what
//! to fix, so the binary never panics on user input.

use std::path::PathBuf;

/// Errors from building, training, evaluating or loading a U-Net.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An invalid option or combination of options.
    #[error("invalid option: {0}")]
    Usage(String),

    /// A `--dataset` value that names no known data set.
    #[error(
        "unknown data set {0:?}: expected brain, shapes, shapes:SIZE, folder:PATH or voc:PATH"
    )]
    UnknownDataset(String),

    /// A data set and a model that disagree on the number of classes.
    #[error(
        "class count mismatch: the data set has {data} classes but the model predicts {model}"
    )]
    ClassMismatch {
        /// Classes of the data set.
        data: usize,
        /// Classes the model predicts.
        model: usize,
    },

    /// A data set and a model that disagree on the number of image channels.
    #[error(
        "channel count mismatch: the data set has {data}-channel images but the model takes {model}"
    )]
    ChannelMismatch {
        /// Channels of the data set's images.
        data: usize,
        /// Channels the model takes.
        model: usize,
    },

    /// A checkpoint whose tensors do not fit the model its `config.json` describes.
    #[error("checkpoint {} does not match the model configuration: {detail}", path.display())]
    CheckpointMismatch {
        /// The weights file.
        path: PathBuf,
        /// Which tensor is missing, extra or of the wrong shape.
        detail: String,
    },

    /// A folder that should hold a run (`config.json`, weights, state) but does not.
    #[error("{} is not a training run folder: {detail}", path.display())]
    NotARun {
        /// The folder.
        path: PathBuf,
        /// What is missing.
        detail: String,
    },

    /// A device that was asked for but cannot be used.
    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),

    /// An error from a data set loader (names the offending file).
    #[error(transparent)]
    Data(#[from] datasets::Error),

    /// A file or folder that could not be read or written.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A JSON file that could not be parsed or written.
    #[error("bad JSON in {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },

    /// An image that could not be read or written.
    #[error("image {}: {source}", path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// The codec's error.
        source: image::ImageError,
    },

    /// A plot that could not be drawn.
    #[error("cannot draw {}: {message}", path.display())]
    Plot {
        /// The output file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// An error from candle (tensor shapes, devices, safetensors).
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Json`] for `path`.
    pub fn json(path: impl Into<PathBuf>, source: serde_json::Error) -> Self {
        Error::Json {
            path: path.into(),
            source,
        }
    }
}
