//! Segmentation cross-entropy over a class axis, with an ignore index and class weights.

use candle::{bail, Result, Tensor};

use crate::config::Reduction;
use crate::input::{check_label_dims, check_not_empty, upcast, ClassAxes, HostLabels, VOID};
use crate::kernel::ChannelOrder;
use crate::softmax_nll::softmax_nll;
use crate::test_paths::host_copy_forced;

/// Options of [`cross_entropy`]. `Default`: no ignore index, no class weights, mean,
/// channels first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CrossEntropyConfig {
    /// Label value of void pixels, which contribute nothing.
    pub ignore_index: Option<u32>,
    /// One non-negative weight per class (`C` values), as PyTorch's `weight`.
    pub class_weights: Option<Vec<f32>>,
    /// `Mean`: the weighted mean over valid pixels, `Σ w_y (-log p_y) / Σ w_y` (PyTorch's
    /// convention); `Sum`: the plain sum; `None`: per-pixel losses `[B, *spatial]`, 0 at
    /// void pixels.
    pub reduction: Reduction,
    /// The class axis is the last one: logits `[B, *spatial, C]` instead of
    /// `[B, C, *spatial]`; labels stay `[B, *spatial]`.
    pub channels_last: bool,
}

/// Cross-entropy of `[B, C, *spatial]` logits against `[B, *spatial]` class indices.
///
/// * `logits`: `[B, C, *spatial]` unnormalised scores, f16, bf16, f32 or f64 (the log-softmax
///   over the class axis is taken inside, in f32 or f64); `[B, *spatial, C]` with
///   `cfg.channels_last`.
/// * `labels`: `[B, *spatial]` u8, u32 or i64, each in `[0, C)` or `cfg.ignore_index`.
///
/// Returns a scalar (or per-pixel losses with [`Reduction::None`]), f64 for f64 input and
/// f32 otherwise. With no valid pixel, the mean is 0 with a zero gradient.
///
/// ```
/// # fn main() -> candle::Result<()> {
/// use candle::{Device, Tensor};
/// use lovasz_candle::{cross_entropy, CrossEntropyConfig};
/// let logits = Tensor::zeros((1, 4, 2, 2), candle::DType::F32, &Device::Cpu)?;
/// let labels = Tensor::new(&[[[0u32, 1], [2, 255]]], &Device::Cpu)?;
/// let cfg = CrossEntropyConfig { ignore_index: Some(255), ..Default::default() };
/// let loss = cross_entropy(&logits, &labels, &cfg)?.to_scalar::<f32>()?;
/// assert!((loss - 4f32.ln()).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, cfg: &CrossEntropyConfig) -> Result<Tensor> {
    let dims = logits.dims();
    let axes = ClassAxes::of(dims, cfg.channels_last, "cross_entropy", "logits")?;
    check_not_empty(logits, "logits")?;
    let n_classes = axes.classes;
    let expected = axes.label_dims();
    check_label_dims(labels, &expected, "logits", dims)?;
    let host = HostLabels::new(labels, n_classes, cfg.ignore_index, "cross_entropy labels")?;
    let class_weight = |c: usize| -> f32 { cfg.class_weights.as_ref().map_or(1.0, |w| w[c]) };
    if let Some(w) = &cfg.class_weights {
        if w.len() != n_classes {
            bail!(
                "cross_entropy: class_weights has {} values but logits have {n_classes} classes",
                w.len()
            )
        }
        if let Some((c, v)) = w
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            bail!("cross_entropy: class_weights[{c}] = {v} must be finite and >= 0")
        }
    }
    let pixel_weight: Vec<f32> = host
        .values
        .iter()
        .map(|&l| {
            if l == VOID {
                0.0
            } else {
                class_weight(l as usize)
            }
        })
        .collect();
    let total_weight: f64 = pixel_weight.iter().map(|&w| f64::from(w)).sum();

    let x = upcast(logits, "logits")?;
    let dev = x.device();
    let pixel_weight =
        Tensor::from_vec(pixel_weight, expected.clone(), dev)?.to_dtype(x.dtype())?;
    let nll = if dev.is_cpu() && !host_copy_forced() {
        let order = if cfg.channels_last {
            ChannelOrder::Last
        } else {
            ChannelOrder::First
        };
        softmax_nll(&x, host.values, order, axes.axis)?
    } else {
        let index: Vec<u32> = host
            .values
            .iter()
            .map(|&l| if l == VOID { 0 } else { l })
            .collect();
        let mut index_dims = expected;
        index_dims.insert(axes.axis, 1);
        let index = Tensor::from_vec(index, index_dims, dev)?;
        let log_p = candle_nn::ops::log_softmax(&x, axes.axis)?;
        log_p
            .contiguous()?
            .gather(&index, axes.axis)?
            .squeeze(axes.axis)?
            .neg()?
    };
    let per_pixel = (nll * pixel_weight)?;
    match cfg.reduction {
        Reduction::None => Ok(per_pixel),
        Reduction::Sum => per_pixel.sum_all(),
        Reduction::Mean => {
            let denom = if total_weight > 0.0 {
                total_weight
            } else {
                1.0
            };
            per_pixel.sum_all()?.affine(1.0 / denom, 0.0)
        }
    }
}
