//! Multiclass Lovász-Softmax (Berman et al., CVPR 2018, Sec. 3.2, Eq. 12).

use candle::{bail, Result, Tensor};

use crate::config::{Classes, LovaszSoftmaxConfig};
use crate::input::{check_label_dims, check_not_empty, upcast, ClassAxes, HostLabels};
use crate::kernel::{Call, ChannelOrder, ClassEntry, ErrorKind, Selection};
use crate::op::{has_native_path, Prepared};

/// Lovász-Softmax loss: the Lovász extension of the Jaccard loss of each class applied to
/// the errors `|1[y = c] - p_c|`, averaged over classes (and over images if `per_image`).
///
/// * `probas`: `[B, C, *spatial]` class probabilities (e.g. a softmax over dim 1), f16,
///   bf16, f32 or f64; any number of spatial dims, including none (`[B, C]`). With
///   `cfg.channels_last`, `[B, *spatial, C]`.
/// * `labels`: `[B, *spatial]` class indices, u8, u32 or i64, each in `[0, C)` or equal
///   to `cfg.ignore_index`.
///
/// Returns a scalar (or `[B]` / `[1]` with [`Reduction::None`](crate::Reduction::None)),
/// f64 for f64 input and f32 otherwise (half-precision inputs are upcast before the
/// errors are summed). Differentiable with respect to `probas`; the Jaccard gradient is
/// held constant, as in the reference. A group with no valid pixel or no counted class
/// contributes 0. NaN anywhere in `probas` gives a NaN loss.
///
/// ```
/// # fn main() -> candle::Result<()> {
/// use candle::{Device, Tensor};
/// use lovasz_candle::{lovasz_softmax, LovaszSoftmaxConfig};
/// let dev = Device::Cpu;
/// let logits = Tensor::randn(0f32, 1., (2, 3, 4, 4), &dev)?;
/// let probas = candle_nn::ops::softmax(&logits, 1)?;
/// let labels = Tensor::zeros((2, 4, 4), candle::DType::U32, &dev)?;
/// let loss = lovasz_softmax(&probas, &labels, &LovaszSoftmaxConfig::default())?;
/// assert_eq!(loss.dims(), &[] as &[usize]);
/// # Ok(()) }
/// ```
pub fn lovasz_softmax(
    probas: &Tensor,
    labels: &Tensor,
    cfg: &LovaszSoftmaxConfig,
) -> Result<Tensor> {
    prepare(probas, labels, cfg)?.loss(cfg.reduction)
}

/// [`lovasz_softmax`] of the softmax of `logits` over the class axis: the softmax is taken
/// inside, in f32 or f64, with a working gradient to `logits` (`[B, C, *spatial]`, or
/// `[B, *spatial, C]` with `cfg.channels_last`).
pub fn lovasz_softmax_with_logits(
    logits: &Tensor,
    labels: &Tensor,
    cfg: &LovaszSoftmaxConfig,
) -> Result<Tensor> {
    let axes = ClassAxes::of(logits.dims(), cfg.channels_last, "lovasz_softmax", "logits")?;
    let logits = upcast(logits, "logits")?;
    if has_native_path(logits.device()) {
        // One op for softmax, loss and backward: candle's softmax over a non-last axis
        // and its backward cost several times the loss itself.
        return prepare(&logits, labels, cfg)?.loss_from_logits(cfg.reduction);
    }
    let probas = candle_nn::ops::softmax(&logits, axes.axis)?;
    lovasz_softmax(&probas, labels, cfg)
}

/// The weights `W` of the Lovász-Softmax loss, for advanced use: a detached tensor with
/// the shape and layout of `probas` (`[B, C, *spatial]`, or `[B, *spatial, C]` with
/// `cfg.channels_last`; f32, or f64 for f64 input) such that
/// `lovasz_softmax(probas, labels, cfg) = Σ W ⊙ |onehot(labels) - probas|`, with void
/// pixels and classes that are not counted at weight 0 and the `1 / B` of a per-image
/// mean folded in. Same arguments and checks as [`lovasz_softmax`].
pub fn lovasz_softmax_weights(
    probas: &Tensor,
    labels: &Tensor,
    cfg: &LovaszSoftmaxConfig,
) -> Result<Tensor> {
    let prepared = prepare(probas, labels, cfg)?;
    prepared.weights(cfg.reduction)?.reshape(probas.shape())
}

pub(crate) fn prepare(
    probas: &Tensor,
    labels: &Tensor,
    cfg: &LovaszSoftmaxConfig,
) -> Result<Prepared> {
    let dims = probas.dims();
    let axes = ClassAxes::of(dims, cfg.channels_last, "lovasz_softmax", "probas")?;
    check_not_empty(probas, "probas")?;
    let (batch, n_classes) = (axes.batch, axes.classes);
    let spatial: usize = axes.spatial.iter().product();
    check_label_dims(labels, &axes.label_dims(), "probas", dims)?;
    let x = upcast(probas, "probas")?;
    let host = HostLabels::new(labels, n_classes, cfg.ignore_index, "lovasz_softmax labels")?;

    let weights: Vec<f64> = match &cfg.class_weights {
        None => vec![1.0; n_classes],
        Some(w) => {
            if w.len() != n_classes {
                bail!(
                    "lovasz_softmax: class_weights has {} values but probas has {n_classes} classes",
                    w.len()
                )
            }
            if let Some((c, v)) = w
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
            {
                bail!("lovasz_softmax: class_weights[{c}] = {v} must be finite and >= 0")
            }
            w.iter().map(|&v| f64::from(v)).collect()
        }
    };
    let entry = |c: usize| ClassEntry {
        class: c as u32,
        channel: c,
        weight: weights[c],
    };
    let selection = match &cfg.classes {
        Classes::All | Classes::Present => Selection {
            entries: (0..n_classes).map(entry).collect(),
            only_present: cfg.classes == Classes::Present,
        },
        Classes::List(list) => {
            if let Some(&c) = list.iter().find(|&&c| c >= n_classes) {
                bail!(
                    "lovasz_softmax: class {c} in the class list is out of range for {n_classes} classes (for binary probabilities of class 1, use lovasz_sigmoid)"
                )
            }
            Selection {
                entries: list.iter().map(|&c| entry(c)).collect(),
                only_present: false,
            }
        }
    };
    let order = if cfg.channels_last {
        ChannelOrder::Last
    } else {
        ChannelOrder::First
    };
    Ok(Prepared {
        x,
        call: Call::new(
            (batch, n_classes, spatial),
            order,
            ErrorKind::Abs,
            cfg.per_image,
        ),
        labels: host.values,
        selection,
    })
}
