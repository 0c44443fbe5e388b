//! [`FolderDataset`]: your own images and masks in an `images/` + `masks/` folder pair.

use std::path::{Path, PathBuf};

use crate::decode::{image_size, load_image, load_mask};
use crate::{voc_palette, Dataset, Error, Result, Sample};

/// Image file extensions [`FolderDataset`] picks up (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Image/mask pairs in a folder:
///
/// ```text
/// root/
///   images/  a.png  b.jpg  ...   PNG or JPEG, grey or colour
///   masks/   a.png  b.png  ...   PNG, same stem and size as the image
/// ```
///
/// Masks are 8- or 16-bit grey PNGs whose values are class indices `< num_classes`,
/// with 255 = [`crate::VOID`]; colour masks (RGB or palette PNGs) are also accepted and
/// mapped through the data set's palette (Pascal VOC colours by default, with the VOC
/// void colour `(224, 224, 192)` mapped to void). Samples are ordered by file name.
///
/// [`FolderDataset::open`] checks that every image has a mask of the same size (reading
/// headers only); pixels are decoded and validated in [`Dataset::get`].
#[derive(Debug, Clone)]
pub struct FolderDataset {
    pairs: Vec<(PathBuf, PathBuf)>,
    num_classes: usize,
    channels: usize,
    class_names: Vec<String>,
    palette: Vec<[u8; 3]>,
}

impl FolderDataset {
    /// Opens `root/images` and `root/masks`, with `num_classes` classes (2..=255) and
    /// 3-channel (RGB) images; see [`FolderDataset::with_channels`] for grey.
    ///
    /// Errors name the file: a missing `images/` folder, an image without a mask, an
    /// unreadable image or mask header, an image and mask of different sizes, or no
    /// image at all.
    pub fn open(root: &Path, num_classes: usize) -> Result<Self> {
        if !(1..=255).contains(&num_classes) {
            return Err(Error::Config(format!(
                "num_classes must be in 1..=255 (255 is void), got {num_classes}"
            )));
        }
        let images_dir = root.join("images");
        let masks_dir = root.join("masks");
        let mut images = Vec::new();
        let entries = std::fs::read_dir(&images_dir).map_err(|e| Error::io(&images_dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&images_dir, e))?.path();
            let is_image = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            if is_image && path.is_file() {
                images.push(path);
            }
        }
        images.sort();
        if images.is_empty() {
            return Err(Error::format(
                &images_dir,
                format!("no {} image found", IMAGE_EXTENSIONS.join("/")),
            ));
        }
        let mut pairs = Vec::with_capacity(images.len());
        for image in images {
            let Some(stem) = image.file_stem() else {
                continue;
            };
            let mask = masks_dir.join(stem).with_extension("png");
            if !mask.is_file() {
                return Err(Error::MissingMask {
                    image,
                    expected: mask,
                });
            }
            let (image_hw, mask_hw) = (image_size(&image)?, image_size(&mask)?);
            if image_hw != mask_hw {
                return Err(Error::SizeMismatch {
                    image,
                    mask,
                    image_size: image_hw,
                    mask_size: mask_hw,
                });
            }
            pairs.push((image, mask));
        }
        Ok(FolderDataset {
            pairs,
            num_classes,
            channels: 3,
            class_names: (0..num_classes).map(|c| format!("class{c}")).collect(),
            palette: voc_palette(num_classes),
        })
    }

    /// Loads images with `channels` channels: 1 (grey, converted by luma) or 3 (RGB).
    pub fn with_channels(mut self, channels: usize) -> Result<Self> {
        if channels != 1 && channels != 3 {
            return Err(Error::Config(format!(
                "channels must be 1 or 3, got {channels}"
            )));
        }
        self.channels = channels;
        Ok(self)
    }

    /// Names the classes (`num_classes` names; default `class0`, `class1`, ...).
    pub fn with_class_names(mut self, names: Vec<String>) -> Result<Self> {
        if names.len() != self.num_classes {
            return Err(Error::Config(format!(
                "{} class names given for {} classes",
                names.len(),
                self.num_classes
            )));
        }
        self.class_names = names;
        Ok(self)
    }

    /// Sets the class colours (`num_classes` of them) used for display and for
    /// mapping colour masks to class indices.
    pub fn with_palette(mut self, palette: Vec<[u8; 3]>) -> Result<Self> {
        if palette.len() != self.num_classes {
            return Err(Error::Config(format!(
                "{} palette colours given for {} classes",
                palette.len(),
                self.num_classes
            )));
        }
        self.palette = palette;
        Ok(self)
    }

    /// The `(image, mask)` file paths, in sample order.
    pub fn pairs(&self) -> &[(PathBuf, PathBuf)] {
        &self.pairs
    }
}

/// Loads one image/mask pair, checking sizes; shared with [`crate::VocDataset`].
/// The (image, mask) paths of sample `i`, or an index error.
pub(crate) fn pair_at(pairs: &[(PathBuf, PathBuf)], i: usize) -> Result<&(PathBuf, PathBuf)> {
    pairs.get(i).ok_or(Error::Index {
        index: i,
        len: pairs.len(),
    })
}

pub(crate) fn load_pair(
    image: &Path,
    mask: &Path,
    channels: usize,
    num_classes: usize,
    palette: &[[u8; 3]],
) -> Result<Sample> {
    let (pixels, h, w) = load_image(image, channels)?;
    let (labels, mh, mw) = load_mask(mask, num_classes, palette)?;
    if (h, w) != (mh, mw) {
        return Err(Error::SizeMismatch {
            image: image.to_path_buf(),
            mask: mask.to_path_buf(),
            image_size: (h, w),
            mask_size: (mh, mw),
        });
    }
    Sample::new(pixels, labels, channels, h, w)
}

impl Dataset for FolderDataset {
    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn get(&self, i: usize) -> Result<Sample> {
        let (image, mask) = pair_at(&self.pairs, i)?;
        load_pair(image, mask, self.channels, self.num_classes, &self.palette)
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn channels(&self) -> usize {
        self.channels
    }

    fn class_names(&self) -> Vec<String> {
        self.class_names.clone()
    }

    fn palette(&self) -> Vec<[u8; 3]> {
        self.palette.clone()
    }
}
