//! [`VocDataset`]: the Pascal VOC 2012 segmentation layout.

use std::path::{Path, PathBuf};

use crate::folder::{load_pair, pair_at};
use crate::palette::VOC_CLASS_NAMES;
use crate::{voc_palette, Dataset, Error, Result, Sample, Split};

/// Pascal VOC 2012 semantic segmentation (21 classes, 3-channel images).
///
/// `root` is the `VOC2012` folder of the development kit:
///
/// ```text
/// root/
///   JPEGImages/<id>.jpg
///   SegmentationClass/<id>.png            palette PNGs, void border = (224, 224, 192)
///   ImageSets/Segmentation/train.txt      one <id> per line
///   ImageSets/Segmentation/val.txt
/// ```
///
/// Mask colours are mapped to class indices through the VOC palette, the void colour
/// to [`crate::VOID`]; any other colour is an error naming the file and pixel.
#[derive(Debug, Clone)]
pub struct VocDataset {
    pairs: Vec<(PathBuf, PathBuf)>,
    palette: Vec<[u8; 3]>,
}

impl VocDataset {
    /// The number of VOC classes, background included.
    pub const NUM_CLASSES: usize = 21;

    /// Opens the `train` or `val` list of a VOC 2012 tree ([`Split::Test`] is an error:
    /// VOC test masks are not public). Checks that every listed image and mask exists.
    pub fn open(root: &Path, split: Split) -> Result<Self> {
        if split == Split::Test {
            return Err(Error::Config(
                "Pascal VOC 2012 has no public test masks: use Split::Train or Split::Val"
                    .to_string(),
            ));
        }
        let list = root
            .join("ImageSets")
            .join("Segmentation")
            .join(format!("{}.txt", split.name()));
        let text = std::fs::read_to_string(&list).map_err(|e| Error::io(&list, e))?;
        let mut pairs = Vec::new();
        for id in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let image = root.join("JPEGImages").join(format!("{id}.jpg"));
            let mask = root.join("SegmentationClass").join(format!("{id}.png"));
            if !image.is_file() {
                return Err(Error::io(
                    &image,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("listed in {} but not found", list.display()),
                    ),
                ));
            }
            if !mask.is_file() {
                return Err(Error::MissingMask {
                    image,
                    expected: mask,
                });
            }
            pairs.push((image, mask));
        }
        if pairs.is_empty() {
            return Err(Error::format(&list, "the split list names no image"));
        }
        Ok(VocDataset {
            pairs,
            palette: voc_palette(Self::NUM_CLASSES),
        })
    }

    /// The `(image, mask)` file paths, in list order.
    pub fn pairs(&self) -> &[(PathBuf, PathBuf)] {
        &self.pairs
    }
}

impl Dataset for VocDataset {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn get(&self, i: usize) -> Result<Sample> {
        let (image, mask) = pair_at(&self.pairs, i)?;
        load_pair(image, mask, 3, Self::NUM_CLASSES, &self.palette)
    }

    fn num_classes(&self) -> usize {
        Self::NUM_CLASSES
    }

    fn channels(&self) -> usize {
        3
    }

    fn class_names(&self) -> Vec<String> {
        VOC_CLASS_NAMES.iter().map(|s| s.to_string()).collect()
    }

    fn palette(&self) -> Vec<[u8; 3]> {
        self.palette.clone()
    }
}
