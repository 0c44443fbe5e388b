//! The [`Dataset`] trait every source implements, and the [`Split`] names.

use crate::{Result, Sample};
use std::sync::Arc;

/// A random-access collection of segmentation samples.
///
/// Implementations are `Send + Sync` so a [`crate::Batcher`] can read them from a
/// background thread. `get` must be deterministic: the same index gives the same
/// sample every time (randomness belongs in a [`crate::Transform`]).
pub trait Dataset: Send + Sync {
    /// The number of samples.
    fn len(&self) -> usize;

    /// `true` when there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sample `i` (`i < len()`): image f32 `[channels, H, W]`, mask u32 `[H, W]`.
    fn get(&self, i: usize) -> Result<Sample>;

    /// The number of classes `C`; mask values are `< C` or [`crate::VOID`].
    fn num_classes(&self) -> usize;

    /// The number of image channels of every sample.
    fn channels(&self) -> usize;

    /// A name per class, `num_classes()` of them.
    fn class_names(&self) -> Vec<String>;

    /// An RGB colour per class, `num_classes()` of them, for visualising masks
    /// (the Pascal VOC palette unless a data set says otherwise).
    fn palette(&self) -> Vec<[u8; 3]> {
        crate::voc_palette(self.num_classes())
    }
}

/// Which part of a data set to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training samples.
    Train,
    /// Validation samples (model selection, early stopping).
    Val,
    /// Held-out test samples.
    Test,
}

impl Split {
    /// All three splits, in order.
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    /// The lower-case name: `"train"`, `"val"` or `"test"`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Split {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "val" | "valid" | "validation" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            other => Err(crate::Error::Config(format!(
                "unknown split {other:?}: expected train, val or test"
            ))),
        }
    }
}

/// Pointer types whose target is a data set are data sets too.
macro_rules! forward_dataset {
    ($($ptr:ident),*) => {$(
        impl<D: Dataset + ?Sized> Dataset for $ptr<D> {
            fn len(&self) -> usize {
                (**self).len()
            }
            fn get(&self, i: usize) -> Result<Sample> {
                (**self).get(i)
            }
            fn num_classes(&self) -> usize {
                (**self).num_classes()
            }
            fn channels(&self) -> usize {
                (**self).channels()
            }
            fn class_names(&self) -> Vec<String> {
                (**self).class_names()
            }
            fn palette(&self) -> Vec<[u8; 3]> {
                (**self).palette()
            }
        }
    )*};
}

forward_dataset!(Arc, Box);

/// Pixels per class over a whole data set: `num_classes()` counts, [`crate::VOID`]
/// pixels not counted. Reads every sample once.
pub fn class_counts<D: Dataset + ?Sized>(dataset: &D) -> Result<Vec<u64>> {
    let k = dataset.num_classes();
    let mut total = vec![0u64; k];
    for i in 0..dataset.len() {
        let counts = dataset.get(i)?.class_counts(k);
        total.iter_mut().zip(counts).for_each(|(t, c)| *t += c);
    }
    Ok(total)
}
