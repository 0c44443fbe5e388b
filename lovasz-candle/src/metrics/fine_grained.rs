//! Fine-grained mIoU (Wang et al., *Revisiting Evaluation Metrics for Semantic
//! Segmentation*, NeurIPS 2023): IoUs taken per image rather than over one confusion
//! matrix of the whole data set, so that small objects and hard images weigh as much as
//! large ones, and worst-case variants that average only the lowest scores.

use candle::{bail, Device, Result, Tensor};

use crate::input::{HostLabels, VOID};

/// Per-image IoUs accumulated over batches, and the image- and class-wise means of
/// Wang et al. (NeurIPS 2023).
///
/// For each image with at least one valid (non-void) pixel, the IoU of each class present
/// in its ground truth, `TP / (TP + FP + FN)` over its valid pixels. With two classes an
/// image's one score is its foreground (class 1) IoU, 1 when neither prediction nor
/// ground truth has foreground.
///
/// - [`miou_image`](Self::miou_image), mIoU^I: the mean over images of each image's mean
///   over its classes;
/// - [`miou_class`](Self::miou_class), mIoU^C: the mean over classes (present in at least
///   one image) of the class's mean over the images where it is present; for two classes,
///   equal to mIoU^I.
///
/// With `worst_percent = Some(q)`, each mean is over its worst `max(1, ⌊q/100 · n⌋)`
/// values only (of its `n`).
///
/// ```
/// # fn main() -> candle::Result<()> {
/// use candle::{Device, Tensor};
/// use lovasz_candle::metrics::FineGrainedIou;
/// let mut m = FineGrainedIou::new(3, Some(255));
/// // Image 0: class 0 IoU 1/2, class 1 IoU 2/3; image 1: class 2 IoU 1 (void left out).
/// let preds = Tensor::new(&[[0u32, 1, 1, 1], [2, 2, 2, 0]], &Device::Cpu)?;
/// let labels = Tensor::new(&[[0u32, 0, 1, 1], [2, 2, 2, 255]], &Device::Cpu)?;
/// m.update(&preds, &labels)?;
/// let image = m.miou_image(None)?.unwrap();
/// assert!((image - (7.0 / 12.0 + 1.0) / 2.0).abs() < 1e-12);
/// assert!((m.miou_image(Some(50.0))?.unwrap() - 7.0 / 12.0).abs() < 1e-12);
/// assert!((m.miou_class(None)?.unwrap() - (0.5 + 2.0 / 3.0 + 1.0) / 3.0).abs() < 1e-12);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FineGrainedIou {
    n_classes: usize,
    ignore_index: Option<u32>,
    /// For each counted image, `(class, IoU)` of each class its ground truth holds (with
    /// two classes, the foreground score only).
    images: Vec<Vec<(u32, f64)>>,
}

impl FineGrainedIou {
    /// No images yet, for `n_classes` classes; labels equal to `ignore_index` are void.
    pub fn new(n_classes: usize, ignore_index: Option<u32>) -> Self {
        Self {
            n_classes,
            ignore_index,
            images: Vec::new(),
        }
    }

    /// Adds a batch: `preds` and `labels` of the same shape `[B, *spatial]`, integer
    /// dtypes (u8, u32, i64); preds in `[0, n_classes)`, labels in `[0, n_classes)` or the
    /// ignore index. Each of the `B` images with a valid pixel adds its scores.
    pub fn update(&mut self, preds: &Tensor, labels: &Tensor) -> Result<()> {
        if preds.dims() != labels.dims() {
            bail!(
                "shape mismatch: preds have shape {:?} but labels have shape {:?}",
                preds.dims(),
                labels.dims()
            )
        }
        if preds.rank() == 0 {
            bail!("FineGrainedIou: preds and labels must be [B, *spatial], got a scalar")
        }
        let batch = preds.dim(0)?;
        if preds.elem_count() == 0 {
            return Ok(());
        }
        let pixels = preds.elem_count() / batch;
        let preds = HostLabels::new(
            &preds.to_device(&Device::Cpu)?,
            self.n_classes,
            None,
            "preds",
        )?;
        let labels = HostLabels::new(labels, self.n_classes, self.ignore_index, "labels")?;
        for (p, l) in preds
            .values
            .chunks(pixels)
            .zip(labels.values.chunks(pixels))
        {
            if let Some(scores) = self.image_scores(p, l) {
                self.images.push(scores);
            }
        }
        Ok(())
    }

    /// How many images have been scored (images without a valid pixel are not).
    pub fn images(&self) -> usize {
        self.images.len()
    }

    /// mIoU^I, a fraction in `[0, 1]`: the mean over images of each image's mean IoU over
    /// the classes of its ground truth; with `Some(q)`, over the worst `q` % of images
    /// (at least one). `None` before any image; an error unless `0 < q <= 100`.
    pub fn miou_image(&self, worst_percent: Option<f64>) -> Result<Option<f64>> {
        let per_image: Vec<f64> = (self.images.iter())
            .map(|s| s.iter().map(|&(_, v)| v).sum::<f64>() / s.len() as f64)
            .collect();
        worst_mean(per_image, worst_percent)
    }

    /// mIoU^C, a fraction in `[0, 1]`: the mean over classes present in at least one image
    /// of each class's mean IoU over the images where it is present; with `Some(q)`, each
    /// class's mean is over its worst `q` % of images (at least one). `None` before any
    /// image; an error unless `0 < q <= 100`.
    pub fn miou_class(&self, worst_percent: Option<f64>) -> Result<Option<f64>> {
        let mut per_class: Vec<Vec<f64>> = vec![Vec::new(); self.n_classes];
        for &(c, v) in self.images.iter().flatten() {
            per_class[c as usize].push(v);
        }
        let mut means = Vec::new();
        for scores in per_class.into_iter().filter(|s| !s.is_empty()) {
            means.extend(worst_mean(scores, worst_percent)?);
        }
        worst_mean(means, None)
    }

    /// The scores of one image's valid pixels, or `None` if it has none.
    fn image_scores(&self, preds: &[u32], labels: &[u32]) -> Option<Vec<(u32, f64)>> {
        let n = self.n_classes;
        let (mut gt, mut pred, mut tp) = (vec![0u64; n], vec![0u64; n], vec![0u64; n]);
        let mut valid = 0u64;
        for (&p, &l) in preds.iter().zip(labels) {
            if l != VOID {
                valid += 1;
                gt[l as usize] += 1;
                pred[p as usize] += 1;
                tp[l as usize] += u64::from(p == l);
            }
        }
        if valid == 0 {
            return None;
        }
        let iou = |c: usize| {
            let union = gt[c] + pred[c] - tp[c];
            (union > 0).then(|| tp[c] as f64 / union as f64)
        };
        Some(if n == 2 {
            // Binary: the foreground's IoU, 1 when neither side has foreground.
            vec![(1, iou(1).unwrap_or(1.0))]
        } else {
            (0..n)
                .filter(|&c| gt[c] > 0)
                .filter_map(|c| iou(c).map(|v| (c as u32, v)))
                .collect()
        })
    }
}

/// The mean of `values`, or of their worst `max(1, ⌊q/100 · n⌋)` with `Some(q)`.
fn worst_mean(mut values: Vec<f64>, worst_percent: Option<f64>) -> Result<Option<f64>> {
    if let Some(q) = worst_percent {
        if !(q > 0.0 && q <= 100.0) {
            bail!("FineGrainedIou: worst_percent must be in (0, 100], got {q}")
        }
    }
    if values.is_empty() {
        return Ok(None);
    }
    if let Some(q) = worst_percent {
        let k = ((q / 100.0 * values.len() as f64).floor() as usize).max(1);
        values.sort_by(f64::total_cmp);
        values.truncate(k);
    }
    Ok(Some(values.iter().sum::<f64>() / values.len() as f64))
}
