//! Which data set to train on (`--dataset brain | shapes[:SIZE[:LEN]] | folder:PATH |
//! voc:PATH`), its train / val / test splits, and the intensity normalisation.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use datasets::{
    BrainSlices, Dataset, FolderDataset, Sample, ShapesConfig, ShapesDataset, Split, VocDataset,
};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A data set named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSpec {
    /// The embedded brain MRI slices (15 classes, 1 channel, 112×96).
    Brain,
    /// Synthetic shapes (6 classes, RGB) of `size`×`size` pixels, `len` training images
    /// (a quarter of that, at least 8, for validation and for test).
    Shapes {
        /// Side in pixels.
        size: usize,
        /// Training images.
        len: usize,
    },
    /// A folder with `images/` and `masks/` (split 4:1 into train / val, test = val), or
    /// with `train/`, `val/` and optionally `test/` sub-folders laid out that way.
    Folder(PathBuf),
    /// A Pascal VOC 2012 tree (the `VOC2012` folder); test = val.
    Voc(PathBuf),
}

impl FromStr for DataSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let unknown = || Error::UnknownDataset(s.to_string());
        let (kind, rest) = match s.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => (s, None),
        };
        match (kind.to_ascii_lowercase().as_str(), rest) {
            ("brain", None) => Ok(DataSpec::Brain),
            ("shapes", None) => Ok(DataSpec::Shapes { size: 64, len: 512 }),
            ("shapes", Some(r)) => {
                let mut parts = r.split(':').map(str::parse::<usize>);
                let size = parts.next().and_then(|p| p.ok()).ok_or_else(unknown)?;
                let len = match parts.next() {
                    None => 512,
                    Some(Ok(n)) => n,
                    Some(Err(_)) => return Err(unknown()),
                };
                if parts.next().is_some() || size < 8 || len == 0 {
                    return Err(Error::Usage(format!(
                        "{s:?}: shapes:SIZE[:LEN] needs SIZE >= 8 and LEN >= 1"
                    )));
                }
                Ok(DataSpec::Shapes { size, len })
            }
            ("folder", Some(p)) if !p.is_empty() => Ok(DataSpec::Folder(PathBuf::from(p))),
            ("voc", Some(p)) if !p.is_empty() => Ok(DataSpec::Voc(PathBuf::from(p))),
            _ => Err(unknown()),
        }
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSpec::Brain => f.write_str("brain"),
            DataSpec::Shapes { size, len } => write!(f, "shapes:{size}:{len}"),
            DataSpec::Folder(p) => write!(f, "folder:{}", p.display()),
            DataSpec::Voc(p) => write!(f, "voc:{}", p.display()),
        }
    }
}

/// What a model needs to know about its data: stored in `config.json` so evaluation and
/// prediction can name and colour the classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    /// Number of classes.
    pub num_classes: usize,
    /// Image channels.
    pub channels: usize,
    /// One name per class.
    pub class_names: Vec<String>,
    /// One RGB colour per class.
    pub palette: Vec<[u8; 3]>,
}

impl DataInfo {
    /// The description of `dataset`.
    pub fn of(dataset: &dyn Dataset) -> Self {
        DataInfo {
            num_classes: dataset.num_classes(),
            channels: dataset.channels(),
            class_names: dataset.class_names(),
            palette: dataset.palette(),
        }
    }
}

/// Opens one split of `spec`. `num_classes` is required for folders and, when given for
/// another source, must agree with it ([`Error::ClassMismatch`]).
pub fn open_split(
    spec: &DataSpec,
    split: Split,
    num_classes: Option<usize>,
) -> Result<Arc<dyn Dataset>> {
    let dataset: Arc<dyn Dataset> = match spec {
        DataSpec::Brain => Arc::new(BrainSlices::load(split)?),
        DataSpec::Shapes { size, len } => {
            let n = match split {
                Split::Train => *len,
                _ => (len / 4).max(8),
            };
            let seed = match split {
                Split::Train => 1,
                Split::Val => 2,
                Split::Test => 3,
            };
            let cfg = ShapesConfig {
                height: *size,
                width: *size,
                len: n,
                seed,
                num_classes: num_classes.unwrap_or(ShapesConfig::default().num_classes),
                ..Default::default()
            };
            Arc::new(ShapesDataset::try_new(cfg)?)
        }
        DataSpec::Folder(root) => {
            let k = num_classes.ok_or_else(|| {
                Error::Usage(format!(
                    "--dataset folder:{} needs --num-classes N",
                    root.display()
                ))
            })?;
            if !root.is_dir() {
                return Err(Error::io(
                    root,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
                ));
            }
            let sub = |name: &str| root.join(name);
            if sub("train").is_dir() {
                let dir = match split {
                    Split::Train => sub("train"),
                    Split::Val => sub("val"),
                    Split::Test if sub("test").is_dir() => sub("test"),
                    Split::Test => sub("val"),
                };
                Arc::new(FolderDataset::open(&dir, k)?)
            } else {
                let all: Arc<dyn Dataset> = Arc::new(FolderDataset::open(root, k)?);
                let indices = (0..all.len())
                    .filter(|i| (i % 5 == 4) != (split == Split::Train))
                    .collect::<Vec<_>>();
                if indices.is_empty() {
                    return Err(Error::Usage(format!(
                        "{} has {} image(s): too few to hold out every fifth for validation",
                        root.display(),
                        all.len()
                    )));
                }
                Arc::new(Subset {
                    inner: all,
                    indices,
                })
            }
        }
        DataSpec::Voc(root) => {
            let split = if split == Split::Test {
                Split::Val
            } else {
                split
            };
            Arc::new(VocDataset::open(root, split)?)
        }
    };
    if let Some(k) = num_classes {
        if k != dataset.num_classes() {
            return Err(Error::ClassMismatch {
                data: dataset.num_classes(),
                model: k,
            });
        }
    }
    if dataset.is_empty() {
        return Err(Error::Usage(format!(
            "the {split} split of {spec} is empty"
        )));
    }
    Ok(dataset)
}

/// A fixed selection of another data set's samples.
struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, i: usize) -> datasets::Result<Sample> {
        let &j = self.indices.get(i).ok_or(datasets::Error::Index {
            index: i,
            len: self.indices.len(),
        })?;
        self.inner.get(j)
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn channels(&self) -> usize {
        self.inner.channels()
    }
    fn class_names(&self) -> Vec<String> {
        self.inner.class_names()
    }
    fn palette(&self) -> Vec<[u8; 3]> {
        self.inner.palette()
    }
}

/// Per-channel intensity mean and standard deviation, measured on the training images
/// and applied to every image the model sees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalisation {
    /// One mean per channel.
    pub mean: Vec<f32>,
    /// One standard deviation per channel.
    pub std: Vec<f32>,
}

impl Normalisation {
    /// Measures the first `max_samples` images of `dataset` (all of them for the brain
    /// slices; a prefix keeps large folders fast).
    pub fn measure(dataset: &dyn Dataset, max_samples: usize) -> Result<Self> {
        let c = dataset.channels();
        let (mut sum, mut sq, mut n) = (vec![0f64; c], vec![0f64; c], 0usize);
        for i in 0..dataset.len().min(max_samples) {
            let s = dataset.get(i)?;
            let plane = s.height * s.width;
            for (ch, values) in s.image.chunks(plane.max(1)).enumerate().take(c) {
                for &v in values {
                    sum[ch] += f64::from(v);
                    sq[ch] += f64::from(v) * f64::from(v);
                }
            }
            n += plane;
        }
        let n = n.max(1) as f64;
        let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
        let std = sq
            .iter()
            .zip(&sum)
            .map(|(q, s)| ((q / n - (s / n).powi(2)).max(0.0).sqrt() as f32).max(1e-3))
            .collect();
        Ok(Normalisation { mean, std })
    }

    /// Normalises an image f32 `[C, H, W]` in place.
    pub fn apply(&self, image: &mut [f32], channels: usize) {
        let plane = image.len() / channels.max(1);
        for (ch, values) in image.chunks_mut(plane.max(1)).enumerate() {
            let (m, s) = (
                self.mean[ch % self.mean.len()],
                self.std[ch % self.std.len()],
            );
            values.iter_mut().for_each(|v| *v = (*v - m) / s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!("brain".parse::<DataSpec>().unwrap(), DataSpec::Brain);
        assert_eq!(
            "shapes:32:16".parse::<DataSpec>().unwrap(),
            DataSpec::Shapes { size: 32, len: 16 }
        );
        assert_eq!(
            "folder:/x/y".parse::<DataSpec>().unwrap(),
            DataSpec::Folder("/x/y".into())
        );
        for bad in ["mnist", "folder:", "voc", "shapes:abc", "shapes:4"] {
            assert!(bad.parse::<DataSpec>().is_err(), "{bad}");
        }
        let round = DataSpec::Shapes { size: 40, len: 9 };
        assert_eq!(round.to_string().parse::<DataSpec>().unwrap(), round);
    }

    #[test]
    fn folder_needs_a_class_count_and_an_existing_path() {
        let spec = DataSpec::Folder("/definitely/not/here".into());
        let err = open_split(&spec, Split::Train, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--num-classes"), "{err}");
        let err = open_split(&spec, Split::Train, Some(3))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/definitely/not/here"), "{err}");
    }

    #[test]
    fn normalisation_whitens() {
        let ds = ShapesDataset::new(ShapesConfig {
            len: 4,
            height: 16,
            width: 16,
            ..Default::default()
        });
        let n = Normalisation::measure(&ds, 4).unwrap();
        assert_eq!(n.mean.len(), 3);
        let mut s = ds.get(0).unwrap();
        n.apply(&mut s.image, 3);
        assert!(s.image.iter().all(|v| v.is_finite()));
    }
}
