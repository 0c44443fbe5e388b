//! [`BrainSlices`]: axial MRI slices of one brain with 15 anatomical classes, embedded
//! in the crate so training works offline.
//!
//! Source: the Colin27 T1 template (`ch2.nii.gz`) and the AAL atlas (`aal.nii.gz`) on
//! the same 1 mm grid, from Debian's `mricron-data` package (see
//! `datasets/data/brain/ATTRIBUTION.md`). The 116 AAL regions are merged into the 15
//! classes of [`CLASS_NAMES`] (see [`prepare::aal_class`]); the 146 axial slices that
//! contain a labelled voxel are downsampled to 2 mm and padded to 112 × 96
//! (see [`prepare::prepare_slices`]).
//!
//! Neighbouring slices are near-duplicates, so the splits are contiguous slabs, never
//! random: see [`split_of_slice`].

pub mod format;
pub mod prepare;

use std::sync::{Arc, OnceLock};

use crate::{Dataset, Error, Result, Sample, Split};
use format::PreparedSlices;

/// The 15 class names, index 0 = background (everything the atlas leaves unlabelled,
/// including white matter, ventricles and the skull).
pub const CLASS_NAMES: [&str; 15] = [
    "background",
    "frontal",
    "parietal",
    "temporal",
    "occipital",
    "cingulate",
    "insula",
    "hippocampal",
    "amygdala",
    "caudate",
    "putamen",
    "pallidum",
    "thalamus",
    "cerebellum",
    "vermis",
];

/// Slices per slab of the split rule.
pub const SLAB: usize = 5;
/// Shift of the slab grid: slice `i` lies in slab `(i + SLAB_OFFSET) / SLAB`.
pub const SLAB_OFFSET: usize = 4;
/// The split of slab `k` is `SLAB_PATTERN[k % 5]`.
pub const SLAB_PATTERN: [Split; 5] = [
    Split::Train,
    Split::Train,
    Split::Train,
    Split::Val,
    Split::Test,
];

/// The split of the `i`-th labelled slice (0 = most inferior).
///
/// Slices are grouped into contiguous slabs of [`SLAB`] = 5 (10 mm of brain, so a
/// structure seen in one split is never the next slice of another); slab
/// `k = (i + 4) / 5` goes to train, train, train, val, test for `k % 5` = 0..4. This
/// gives 86 / 30 / 30 slices and every class in every split, with at least 6 / 5 / 4
/// slices of each class in train / val / test. Measured on the 2 mm slices: slabs of 6
/// (the rule that works at 1 mm) leave the pallidum out of val for every offset, and
/// slabs of 5 with offset 0 leave it out of test; offsets 1 to 4 all work and 4 keeps
/// the most slices of the rarest classes in test.
pub fn split_of_slice(i: usize) -> Split {
    SLAB_PATTERN[((i + SLAB_OFFSET) / SLAB) % SLAB_PATTERN.len()]
}

/// The prepared slices, compressed (0.9 MB), compiled into the crate.
static EMBEDDED: &[u8] = include_bytes!("../../data/brain/slices.bin.gz");

/// The embedded slices, decompressed once per process.
fn embedded() -> Result<Arc<PreparedSlices>> {
    static DECODED: OnceLock<std::result::Result<Arc<PreparedSlices>, String>> = OnceLock::new();
    DECODED
        .get_or_init(|| PreparedSlices::decode(EMBEDDED).map(Arc::new))
        .clone()
        .map_err(|message| Error::format("embedded data/brain/slices.bin.gz", message))
}

/// Axial T1 brain MRI slices with 15-class anatomical masks (1 channel, 112 × 96,
/// 2 mm pixels, intensities in `[0, 1]`), one of the fixed splits.
///
/// Classes are strongly imbalanced: background ~75 % of pixels, amygdala and pallidum
/// under 0.1 %.
///
/// ```
/// use datasets::{BrainSlices, Dataset, Split};
/// let train = BrainSlices::load(Split::Train)?;
/// assert_eq!((train.len(), train.num_classes(), train.channels()), (86, 15, 1));
/// let s = train.get(0)?;
/// assert_eq!((s.height, s.width), (112, 96));
/// # Ok::<(), datasets::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct BrainSlices {
    data: Arc<PreparedSlices>,
    split: Split,
    /// Indices into `data` of this split's slices, inferior to superior.
    slices: Vec<usize>,
}

impl BrainSlices {
    /// Slice height in pixels.
    pub const HEIGHT: usize = prepare::HEIGHT;
    /// Slice width in pixels.
    pub const WIDTH: usize = prepare::WIDTH;

    /// Loads one split of the embedded slices (decompressed on first use, ~10 ms).
    pub fn load(split: Split) -> Result<Self> {
        let data = embedded()?;
        let slices = (0..data.len())
            .filter(|&i| split_of_slice(i) == split)
            .collect();
        Ok(BrainSlices {
            data,
            split,
            slices,
        })
    }

    /// The split these slices belong to.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Each sample's axial index `z` (mm above the bottom of the 1 mm source volume).
    pub fn z_indices(&self) -> Vec<usize> {
        self.slices
            .iter()
            .map(|&i| self.data.z[i] as usize)
            .collect()
    }
}

impl Dataset for BrainSlices {
    fn len(&self) -> usize {
        self.slices.len()
    }

    fn get(&self, i: usize) -> Result<Sample> {
        let &slice = self.slices.get(i).ok_or(Error::Index {
            index: i,
            len: self.slices.len(),
        })?;
        let n = self.data.height * self.data.width;
        let range = slice * n..(slice + 1) * n;
        let image = self.data.images[range.clone()]
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect();
        let mask = self.data.labels[range].iter().map(|&l| l as u32).collect();
        Sample::new(image, mask, 1, self.data.height, self.data.width)
    }

    fn num_classes(&self) -> usize {
        CLASS_NAMES.len()
    }

    fn channels(&self) -> usize {
        1
    }

    fn class_names(&self) -> Vec<String> {
        CLASS_NAMES.iter().map(|s| s.to_string()).collect()
    }
}
