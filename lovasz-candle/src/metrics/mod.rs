//! Segmentation metrics: the reference's `iou_binary` / `iou` (as fractions, not percent),
//! a [`ConfusionMatrix`] that accumulates over a whole data set, and the per-image
//! [`FineGrainedIou`] of Wang et al. (NeurIPS 2023).

use candle::{bail, Result, Tensor};

use crate::input::{host_preds_and_labels, VOID};

mod fine_grained;

pub use fine_grained::FineGrainedIou;

/// Options of [`iou_binary`] and [`iou`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IouConfig {
    /// IoU given to a class whose union is empty (the reference's `EMPTY`, default 1).
    pub empty: f64,
    /// Label value of void pixels: predictions there are not counted.
    pub ignore_index: Option<u32>,
    /// Compute the IoU per image and average over images (else over the whole batch).
    pub per_image: bool,
}

impl Default for IouConfig {
    fn default() -> Self {
        Self {
            empty: 1.0,
            ignore_index: None,
            per_image: false,
        }
    }
}

/// Predictions and labels on the host, one slice per image (or one for the batch).
struct Pairs {
    preds: Vec<u32>,
    labels: Vec<u32>,
    groups: usize,
}

impl Pairs {
    fn new(preds: &Tensor, labels: &Tensor, n_classes: usize, cfg: &IouConfig) -> Result<Self> {
        let (preds_host, labels_host) =
            host_preds_and_labels(preds, labels, n_classes, cfg.ignore_index)?;
        if preds.elem_count() == 0 {
            bail!("empty input: preds have shape {:?}", preds.dims())
        }
        let groups = if cfg.per_image && preds.rank() > 0 {
            preds.dim(0)?
        } else {
            1
        };
        Ok(Self {
            preds: preds_host,
            labels: labels_host,
            groups,
        })
    }

    /// IoU of class `c` in each group, with the reference's union
    /// `(label == c) | (pred == c & label != void)`.
    fn class_iou(&self, c: u32, empty: f64) -> Vec<f64> {
        let n = self.preds.len() / self.groups;
        (0..self.groups)
            .map(|g| {
                let (mut inter, mut union) = (0u64, 0u64);
                for (&p, &l) in self.preds[g * n..][..n]
                    .iter()
                    .zip(&self.labels[g * n..][..n])
                {
                    let (is_l, is_p) = (l == c, p == c && l != VOID);
                    inter += u64::from(is_l && p == c);
                    union += u64::from(is_l || is_p);
                }
                if union == 0 {
                    empty
                } else {
                    inter as f64 / union as f64
                }
            })
            .collect()
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Foreground (class 1) IoU of binary predictions, a fraction in `[0, 1]` (the reference
/// returns percent).
///
/// * `preds`, `labels`: the same shape `[B, *spatial]`, integer dtypes (u8, u32, i64);
///   preds 0 / 1, labels 0 / 1 or `cfg.ignore_index`.
///
/// With `per_image`, the mean over images of each image's IoU (an image with an empty
/// union scores `cfg.empty`).
pub fn iou_binary(preds: &Tensor, labels: &Tensor, cfg: &IouConfig) -> Result<f64> {
    let pairs = Pairs::new(preds, labels, 2, cfg)?;
    Ok(mean(&pairs.class_iou(1, cfg.empty)))
}

/// Per-class IoU, fractions in `[0, 1]`, one per class in `0..n_classes` other than the
/// ignore index (the reference's `iou`, which returns percent).
///
/// * `preds`, `labels`: the same shape `[B, *spatial]`, integer dtypes; preds in
///   `[0, n_classes)`, labels in `[0, n_classes)` or `cfg.ignore_index`.
///
/// With `per_image`, each class's IoU is averaged over images (an empty union scoring
/// `cfg.empty`).
pub fn iou(preds: &Tensor, labels: &Tensor, n_classes: usize, cfg: &IouConfig) -> Result<Vec<f64>> {
    let pairs = Pairs::new(preds, labels, n_classes, cfg)?;
    Ok((0..n_classes as u32)
        .filter(|&c| Some(c) != cfg.ignore_index)
        .map(|c| mean(&pairs.class_iou(c, cfg.empty)))
        .collect())
}

/// A confusion matrix accumulated over many batches: rows are ground-truth classes,
/// columns predicted classes; void pixels are not counted.
///
/// ```
/// # fn main() -> candle::Result<()> {
/// use candle::{Device, Tensor};
/// use lovasz_candle::metrics::ConfusionMatrix;
/// let mut cm = ConfusionMatrix::new(3, Some(255));
/// let preds = Tensor::new(&[[0u32, 1, 2, 2]], &Device::Cpu)?;
/// let labels = Tensor::new(&[[0u32, 1, 1, 255]], &Device::Cpu)?;
/// cm.update(&preds, &labels)?;
/// assert_eq!(cm.iou_per_class()[1], Some(0.5));
/// assert_eq!(cm.pixel_accuracy(), Some(2.0 / 3.0));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    n_classes: usize,
    ignore_index: Option<u32>,
    counts: Vec<u64>,
}

impl ConfusionMatrix {
    /// An empty matrix for `n_classes` classes; labels equal to `ignore_index` are skipped.
    pub fn new(n_classes: usize, ignore_index: Option<u32>) -> Self {
        Self {
            n_classes,
            ignore_index,
            counts: vec![0; n_classes * n_classes],
        }
    }

    /// Number of classes.
    pub fn n_classes(&self) -> usize {
        self.n_classes
    }

    /// Adds a batch: `preds` and `labels` of the same shape, integer dtypes (u8, u32, i64),
    /// preds in `[0, n_classes)`, labels in `[0, n_classes)` or the ignore index.
    pub fn update(&mut self, preds: &Tensor, labels: &Tensor) -> Result<()> {
        let (preds, labels) =
            host_preds_and_labels(preds, labels, self.n_classes, self.ignore_index)?;
        for (&p, &l) in preds.iter().zip(&labels) {
            if l != VOID {
                self.counts[l as usize * self.n_classes + p as usize] += 1;
            }
        }
        Ok(())
    }

    /// Adds the counts of another matrix of the same size.
    pub fn merge(&mut self, other: &ConfusionMatrix) -> Result<()> {
        if other.n_classes != self.n_classes {
            bail!(
                "cannot merge a {}-class confusion matrix into a {}-class one",
                other.n_classes,
                self.n_classes
            )
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        Ok(())
    }

    /// Pixels of ground-truth class `label` predicted as `pred`.
    pub fn count(&self, label: usize, pred: usize) -> u64 {
        self.counts[label * self.n_classes + pred]
    }

    /// All counts, row-major `[n_classes (ground truth), n_classes (prediction)]`.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Total of counted (non-void) pixels.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// IoU of each class, `TP / (TP + FP + FN)`; `None` for a class that appears neither in
    /// the ground truth nor in the predictions.
    pub fn iou_per_class(&self) -> Vec<Option<f64>> {
        let n = self.n_classes;
        (0..n)
            .map(|c| {
                let tp = self.count(c, c);
                let gt: u64 = (0..n).map(|p| self.count(c, p)).sum();
                let pred: u64 = (0..n).map(|l| self.count(l, c)).sum();
                let union = gt + pred - tp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean IoU over the classes whose IoU is defined (`None` if none is).
    pub fn mean_iou(&self) -> Option<f64> {
        let ious: Vec<f64> = self.iou_per_class().into_iter().flatten().collect();
        (!ious.is_empty()).then(|| mean(&ious))
    }

    /// Fraction of counted pixels predicted correctly (`None` before any pixel).
    pub fn pixel_accuracy(&self) -> Option<f64> {
        let total = self.total();
        let correct: u64 = (0..self.n_classes).map(|c| self.count(c, c)).sum();
        (total > 0).then(|| correct as f64 / total as f64)
    }

    /// Recall of each class, `TP / (TP + FN)`; `None` for a class absent from the ground truth.
    pub fn class_accuracy(&self) -> Vec<Option<f64>> {
        (0..self.n_classes)
            .map(|c| {
                let gt: u64 = (0..self.n_classes).map(|p| self.count(c, p)).sum();
                (gt > 0).then(|| self.count(c, c) as f64 / gt as f64)
            })
            .collect()
    }
}
