//! Evaluation over a whole split: one confusion matrix for the data set (per-class IoU,
//! mIoU and pixel accuracy), and the fine-grained mIoU of Wang et al. (NeurIPS 2023)
//! from per-image IoUs, as a table or JSON.

use candle::Tensor;
use datasets::{Dataset, Sample, VOID};
use lovasz_candle::metrics::{ConfusionMatrix, FineGrainedIou};
use serde::{Deserialize, Serialize};

use crate::data::Normalisation;
use crate::model::UNet;
use crate::{Error, Result};

/// Checks that `dataset` fits `model` (classes and channels).
pub fn check_compatible(model: &UNet, dataset: &dyn Dataset) -> Result<()> {
    let cfg = model.config();
    if dataset.num_classes() != cfg.num_classes {
        return Err(Error::ClassMismatch {
            data: dataset.num_classes(),
            model: cfg.num_classes,
        });
    }
    if dataset.channels() != cfg.in_channels {
        return Err(Error::ChannelMismatch {
            data: dataset.channels(),
            model: cfg.in_channels,
        });
    }
    Ok(())
}

/// Predictions u32 `[H, W]` (row-major) for each of `samples` (raw images, normalised
/// here), batching consecutive samples of one size up to `batch_size`.
pub fn predict_samples(
    model: &UNet,
    samples: &[Sample],
    norm: &Normalisation,
    batch_size: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(samples.len());
    let mut start = 0;
    while start < samples.len() {
        let first = &samples[start];
        let size = (first.channels, first.height, first.width);
        let mut end = start + 1;
        while end < samples.len()
            && end - start < batch_size.max(1)
            && (
                samples[end].channels,
                samples[end].height,
                samples[end].width,
            ) == size
        {
            end += 1;
        }
        let mut images = Vec::with_capacity((end - start) * first.image.len());
        for s in &samples[start..end] {
            let mut image = s.image.clone();
            norm.apply(&mut image, s.channels);
            images.extend_from_slice(&image);
        }
        let (c, h, w) = size;
        let images = Tensor::from_vec(images, (end - start, c, h, w), model.device())?;
        let preds = model.predict(&images)?.to_device(&candle::Device::Cpu)?;
        for p in preds.to_vec3::<u32>()? {
            out.push(p.into_iter().flatten().collect());
        }
        start = end;
    }
    Ok(out)
}

/// The metrics of `model` on a split: the data set's confusion matrix, and the per-image
/// IoUs of the fine-grained mIoU.
#[derive(Debug, Clone)]
pub struct SplitMetrics {
    /// One confusion matrix over every pixel of the split (void skipped).
    pub confusion: ConfusionMatrix,
    /// Per-image IoUs (Wang et al., NeurIPS 2023).
    pub fine_grained: FineGrainedIou,
}

/// The confusion matrix of `model` on every sample of `dataset` (void pixels skipped).
pub fn confusion(
    model: &UNet,
    dataset: &dyn Dataset,
    norm: &Normalisation,
    batch_size: usize,
) -> Result<ConfusionMatrix> {
    let mut cm = ConfusionMatrix::new(dataset.num_classes(), Some(VOID));
    for_each_prediction(
        model,
        dataset,
        norm,
        batch_size,
        |p, l| Ok(cm.update(p, l)?),
    )?;
    Ok(cm)
}

/// The [`SplitMetrics`] of `model` on every sample of `dataset`.
pub fn evaluate(
    model: &UNet,
    dataset: &dyn Dataset,
    norm: &Normalisation,
    batch_size: usize,
) -> Result<SplitMetrics> {
    let k = dataset.num_classes();
    let mut cm = ConfusionMatrix::new(k, Some(VOID));
    let mut fine_grained = FineGrainedIou::new(k, Some(VOID));
    for_each_prediction(model, dataset, norm, batch_size, |p, l| {
        cm.update(p, l)?;
        Ok(fine_grained.update(p, l)?)
    })?;
    Ok(SplitMetrics {
        confusion: cm,
        fine_grained,
    })
}

/// Calls `f` with each sample's prediction and mask, u32 `[1, H, W]` on the CPU, in
/// order, after checking that `dataset` fits `model`.
fn for_each_prediction(
    model: &UNet,
    dataset: &dyn Dataset,
    norm: &Normalisation,
    batch_size: usize,
    mut f: impl FnMut(&Tensor, &Tensor) -> Result<()>,
) -> Result<()> {
    check_compatible(model, dataset)?;
    let chunk = batch_size.max(1) * 4;
    let mut i = 0;
    while i < dataset.len() {
        let samples = (i..(i + chunk).min(dataset.len()))
            .map(|j| dataset.get(j))
            .collect::<datasets::Result<Vec<_>>>()?;
        let preds = predict_samples(model, &samples, norm, batch_size)?;
        for (s, p) in samples.iter().zip(preds) {
            let dev = &candle::Device::Cpu;
            let p = Tensor::from_vec(p, (1, s.height, s.width), dev)?;
            let l = Tensor::from_vec(s.mask.clone(), (1, s.height, s.width), dev)?;
            f(&p, &l)?;
        }
        i += chunk;
    }
    Ok(())
}

/// The share of images (or of each class's images) in the worst-case fine-grained means.
pub const WORST_PERCENT: f64 = 10.0;

/// The fine-grained mIoU of a split (Wang et al., NeurIPS 2023), fractions in `[0, 1]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FineGrainedReport {
    /// mIoU^I: the mean over images of each image's mean IoU over its classes.
    pub miou_image: Option<f64>,
    /// mIoU^C: the mean over classes of each class's mean IoU over the images holding it.
    pub miou_class: Option<f64>,
    /// mIoU^I over the worst [`WORST_PERCENT`] % of images.
    pub miou_image_worst: Option<f64>,
    /// mIoU^C with each class's mean over its worst [`WORST_PERCENT`] % of images.
    pub miou_class_worst: Option<f64>,
}

impl FineGrainedReport {
    /// The means of `m`.
    pub fn new(m: &FineGrainedIou) -> Result<Self> {
        Ok(Self {
            miou_image: m.miou_image(None)?,
            miou_class: m.miou_class(None)?,
            miou_image_worst: m.miou_image(Some(WORST_PERCENT))?,
            miou_class_worst: m.miou_class(Some(WORST_PERCENT))?,
        })
    }
}

/// One class's line of an [`EvalReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassReport {
    /// Class name.
    pub name: String,
    /// IoU in `[0, 1]`; `None` when the class is neither in the ground truth nor predicted.
    pub iou: Option<f64>,
    /// Ground-truth pixels of the class.
    pub pixels: u64,
}

/// Metrics of one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The split evaluated.
    pub split: String,
    /// Number of images.
    pub images: usize,
    /// Mean IoU over the classes whose IoU is defined.
    pub mean_iou: Option<f64>,
    /// Fraction of non-void pixels predicted correctly.
    pub pixel_accuracy: Option<f64>,
    /// Per-class IoU.
    pub classes: Vec<ClassReport>,
    /// Confusion matrix, rows = ground truth, columns = prediction.
    pub confusion: Vec<Vec<u64>>,
    /// The fine-grained mIoU, when per-image IoUs were taken (absent in reports written
    /// before it existed).
    #[serde(default)]
    pub fine_grained: Option<FineGrainedReport>,
}

impl EvalReport {
    /// The report of a confusion matrix over `images` images of `split`.
    pub fn new(cm: &ConfusionMatrix, class_names: &[String], split: &str, images: usize) -> Self {
        let k = cm.n_classes();
        let counts = cm.counts();
        let confusion: Vec<Vec<u64>> = counts.chunks(k.max(1)).map(<[u64]>::to_vec).collect();
        let classes = cm
            .iou_per_class()
            .into_iter()
            .enumerate()
            .map(|(c, iou)| ClassReport {
                name: class_names
                    .get(c)
                    .cloned()
                    .unwrap_or_else(|| format!("class {c}")),
                iou,
                pixels: confusion[c].iter().sum(),
            })
            .collect();
        EvalReport {
            split: split.to_string(),
            images,
            mean_iou: cm.mean_iou(),
            pixel_accuracy: cm.pixel_accuracy(),
            classes,
            confusion,
            fine_grained: None,
        }
    }

    /// The report of a split's [`SplitMetrics`], the fine-grained mIoU included.
    pub fn of(
        m: &SplitMetrics,
        class_names: &[String],
        split: &str,
        images: usize,
    ) -> Result<Self> {
        Ok(Self {
            fine_grained: Some(FineGrainedReport::new(&m.fine_grained)?),
            ..Self::new(&m.confusion, class_names, split, images)
        })
    }

    /// Per-class IoU, mIoU and pixel accuracy as an aligned text table (percent).
    pub fn table(&self) -> String {
        let worst = format!("worst {WORST_PERCENT} %");
        let fine_grained = self.fine_grained.as_ref().map(|f| {
            [
                ("mIoU^I (images)".to_string(), f.miou_image),
                ("mIoU^C (classes)".to_string(), f.miou_class),
                (format!("mIoU^I, {worst}"), f.miou_image_worst),
                (format!("mIoU^C, {worst}"), f.miou_class_worst),
            ]
        });
        let width = (self.classes.iter().map(|c| c.name.len()))
            .chain(
                fine_grained
                    .iter()
                    .flatten()
                    .map(|(name, _)| name.chars().count()),
            )
            .max()
            .unwrap_or(5)
            .max(14);
        let mut s = format!(
            "{:width$}  {:>7}  {:>10}\n",
            format!("{} ({} images)", self.split, self.images),
            "IoU %",
            "GT pixels"
        );
        for c in &self.classes {
            s += &format!(
                "{:width$}  {:>7}  {:>10}\n",
                c.name,
                percent(c.iou),
                c.pixels
            );
        }
        s += &format!("{:width$}  {:>7}\n", "mIoU", percent(self.mean_iou));
        s += &format!(
            "{:width$}  {:>7}\n",
            "pixel accuracy",
            percent(self.pixel_accuracy)
        );
        for (name, v) in fine_grained.into_iter().flatten() {
            s += &format!("{name:width$}  {:>7}\n", percent(v));
        }
        s
    }

    /// The confusion matrix as text, rows = ground truth.
    pub fn confusion_table(&self) -> String {
        let k = self.confusion.len();
        let cell = self
            .confusion
            .iter()
            .flatten()
            .map(|v| v.to_string().len())
            .max()
            .unwrap_or(1)
            .max(k.to_string().len() + 1);
        let mut s = format!("{:>4} |", "gt\\p");
        for p in 0..k {
            s += &format!(" {:>cell$}", p);
        }
        s.push('\n');
        for (l, row) in self.confusion.iter().enumerate() {
            s += &format!("{l:>4} |");
            for v in row {
                s += &format!(" {v:>cell$}");
            }
            s.push('\n');
        }
        s
    }
}

/// A fraction as a percent with one decimal, `-` for `None`.
pub fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{:.1}", 100.0 * v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_of_a_small_matrix() {
        let mut cm = ConfusionMatrix::new(3, Some(VOID));
        let dev = candle::Device::Cpu;
        let p = Tensor::new(&[[0u32, 1, 1, 2]], &dev).unwrap();
        let l = Tensor::new(&[[0u32, 1, 2, VOID]], &dev).unwrap();
        cm.update(&p, &l).unwrap();
        let names = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let r = EvalReport::new(&cm, &names, "val", 1);
        assert_eq!(r.classes[1].iou, Some(0.5));
        assert_eq!(r.classes[2].iou, Some(0.0));
        assert_eq!(r.confusion[2][1], 1);
        assert!(r.table().contains("mIoU"));
        assert!(r.confusion_table().lines().count() == 4);
        assert_eq!(percent(None), "-");
        assert!(r.fine_grained.is_none() && !r.table().contains("mIoU^I"));

        // With per-image IoUs: classes 0, 1, 2 of the one image score 1, 1/2 and 0.
        let mut fine_grained = FineGrainedIou::new(3, Some(VOID));
        fine_grained.update(&p, &l).unwrap();
        let m = SplitMetrics {
            confusion: cm,
            fine_grained,
        };
        let r = EvalReport::of(&m, &names, "val", 1).unwrap();
        let f = r.fine_grained.clone().unwrap();
        assert_eq!(f.miou_image, Some(0.5));
        assert_eq!(f.miou_class, Some(0.5));
        let table = r.table();
        assert!(table.contains("mIoU^I (images)") && table.contains("worst 10 %"));
        // The values stay in one column below the longest name.
        let line = |start: &str| table.lines().find(|l| l.starts_with(start)).unwrap().len();
        assert_eq!(line("mIoU^C, worst"), line("pixel accuracy"));
        // A report written before the field existed still reads.
        let mut json = serde_json::to_value(&r).unwrap();
        json.as_object_mut().unwrap().remove("fine_grained");
        let old: EvalReport = serde_json::from_value(json).unwrap();
        assert_eq!(old.fine_grained, None);
    }
}
