//! Binary Lovász losses: the Lovász hinge on logits (Berman et al., CVPR 2018, Sec. 3.1)
//! and the Lovász-Sigmoid on foreground probabilities, plus the multilabel hinge.

use candle::{bail, Result, Tensor};

use crate::config::{LovaszHingeConfig, LovaszSigmoidConfig};
use crate::input::{check_label_dims, check_not_empty, upcast, HostLabels};
use crate::kernel::{Call, ChannelOrder, ClassEntry, ErrorKind, Selection};
use crate::op::Prepared;

fn prepare_binary(
    x: &Tensor,
    labels: &Tensor,
    per_image: bool,
    ignore_index: Option<u32>,
    kind: ErrorKind,
    what: &str,
) -> Result<Prepared> {
    let (loss, input) = match kind {
        ErrorKind::Hinge => ("lovasz_hinge", "logits"),
        ErrorKind::Abs => ("lovasz_sigmoid", "probas"),
    };
    let dims = x.dims();
    if dims.is_empty() {
        bail!("{loss}: {input} must be [B, *spatial], got a scalar")
    }
    check_not_empty(x, input)?;
    check_label_dims(labels, dims, input, dims)?;
    let batch = dims[0];
    let spatial = x.elem_count() / batch;
    let x = upcast(x, input)?;
    let host = HostLabels::new(labels, 2, ignore_index, what)?;
    Ok(Prepared {
        x,
        call: Call::new((batch, 1, spatial), ChannelOrder::First, kind, per_image),
        labels: host.values,
        selection: Selection {
            entries: vec![ClassEntry {
                class: 1,
                channel: 0,
                weight: 1.0,
            }],
            only_present: false,
        },
    })
}

/// Binary Lovász hinge loss.
///
/// * `logits`: `[B, *spatial]` foreground scores (logits, not probabilities), f16, bf16,
///   f32 or f64.
/// * `labels`: `[B, *spatial]` 0 / 1 (u8, u32 or i64), or `cfg.ignore_index`.
///
/// Errors `1 - x (2y - 1)` are sorted unclamped in decreasing order and
/// `relu(errors)` are dotted with the Jaccard gradient, as in the reference. Returns a
/// scalar, f64 for f64 input and f32 otherwise. With `per_image` (the default) the mean
/// over all `B` images, an image with no valid pixel counting as 0.
///
/// ```
/// # fn main() -> candle::Result<()> {
/// use candle::{Device, Tensor};
/// use lovasz_candle::{lovasz_hinge, LovaszHingeConfig};
/// let logits = Tensor::new(&[[2.0f32, -1.0, 0.5]], &Device::Cpu)?;
/// let labels = Tensor::new(&[[1u8, 0, 0]], &Device::Cpu)?;
/// let loss = lovasz_hinge(&logits, &labels, &LovaszHingeConfig::default())?;
/// // Sorted errors: 1.5 (background), 0, -1. The first prefix has Jaccard loss
/// // 1 - 1/2, so the only positive error has weight 0.5.
/// assert!((loss.to_scalar::<f32>()? - 0.75).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn lovasz_hinge(logits: &Tensor, labels: &Tensor, cfg: &LovaszHingeConfig) -> Result<Tensor> {
    prepare_hinge(logits, labels, cfg)?.loss(cfg.reduction)
}

/// The weights `W` of the Lovász hinge: a detached tensor with the shape of `logits`
/// (f32, or f64 for f64 input) with `lovasz_hinge = Σ W ⊙ relu(1 - logits (2y - 1))`
/// (with `Reduction::None`, each image's loss is the sum over its own pixels). Same
/// arguments and checks as [`lovasz_hinge`].
pub fn lovasz_hinge_weights(
    logits: &Tensor,
    labels: &Tensor,
    cfg: &LovaszHingeConfig,
) -> Result<Tensor> {
    prepare_hinge(logits, labels, cfg)?
        .weights(cfg.reduction)?
        .reshape(logits.shape())
}

/// The hinge's call, shared by [`lovasz_hinge`] and [`lovasz_hinge_weights`].
pub(crate) fn prepare_hinge(
    logits: &Tensor,
    labels: &Tensor,
    cfg: &LovaszHingeConfig,
) -> Result<Prepared> {
    prepare_binary(
        logits,
        labels,
        cfg.per_image,
        cfg.ignore_index,
        ErrorKind::Hinge,
        "lovasz_hinge labels",
    )
}

/// Multilabel Lovász hinge: one binary hinge per channel, averaged over channels.
///
/// * `logits`: `[B, C, *spatial]`, f16, bf16, f32 or f64.
/// * `labels`: `[B, C, *spatial]` 0 / 1 per channel, or `cfg.ignore_index`.
///
/// Returns a scalar: `mean_c lovasz_hinge(logits[:, c], labels[:, c], cfg)`.
pub fn lovasz_hinge_multilabel(
    logits: &Tensor,
    labels: &Tensor,
    cfg: &LovaszHingeConfig,
) -> Result<Tensor> {
    if logits.rank() < 2 {
        bail!(
            "lovasz_hinge_multilabel: logits must be [B, C, *spatial], got shape {:?}",
            logits.dims()
        )
    }
    check_label_dims(labels, logits.dims(), "logits", logits.dims())?;
    check_not_empty(logits, "logits")?;
    let channels = logits.dim(1)?;
    let mut losses = Vec::with_capacity(channels);
    for c in 0..channels {
        let x = logits.narrow(1, c, 1)?.squeeze(1)?;
        let y = labels.narrow(1, c, 1)?.squeeze(1)?;
        losses.push(lovasz_hinge(&x, &y, cfg)?);
    }
    Tensor::stack(&losses, 0)?.mean(0)
}

/// Lovász-Sigmoid: the Lovász-Softmax of the foreground class of binary probabilities
/// (the reference's `lovasz_softmax(probas, labels, classes=[1])` on `[B, H, W]` input).
///
/// * `probas`: `[B, *spatial]` foreground probabilities (e.g. a sigmoid of logits), f16,
///   bf16, f32 or f64.
/// * `labels`: `[B, *spatial]` 0 / 1 (u8, u32 or i64), or `cfg.ignore_index`.
///
/// Errors are `|y - p|`; the foreground class counts even when absent. Returns a scalar,
/// f64 for f64 input and f32 otherwise.
pub fn lovasz_sigmoid(
    probas: &Tensor,
    labels: &Tensor,
    cfg: &LovaszSigmoidConfig,
) -> Result<Tensor> {
    prepare_sigmoid(probas, labels, cfg)?.loss(cfg.reduction)
}

/// The weights `W` of the Lovász-Sigmoid: a detached tensor with the shape of `probas`
/// (f32, or f64 for f64 input) with `lovasz_sigmoid = Σ W ⊙ |y − p|` (with
/// `Reduction::None`, each image's loss is the sum over its own pixels). Same arguments
/// and checks as [`lovasz_sigmoid`].
///
/// ```
/// # fn main() -> candle::Result<()> {
/// use candle::{Device, Tensor};
/// use lovasz_candle::{lovasz_sigmoid, lovasz_sigmoid_weights, LovaszSigmoidConfig};
/// let p = Tensor::new(&[[0.9f32, 0.2, 0.6, 0.1]], &Device::Cpu)?;
/// let y = Tensor::new(&[[1u8, 0, 0, 1]], &Device::Cpu)?;
/// let cfg = LovaszSigmoidConfig::default();
/// let w = lovasz_sigmoid_weights(&p, &y, &cfg)?;
/// let errors = (y.to_dtype(candle::DType::F32)? - &p)?.abs()?;
/// let via_weights = (w * errors)?.sum_all()?.to_scalar::<f32>()?;
/// let loss = lovasz_sigmoid(&p, &y, &cfg)?.to_scalar::<f32>()?;
/// assert!((via_weights - loss).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn lovasz_sigmoid_weights(
    probas: &Tensor,
    labels: &Tensor,
    cfg: &LovaszSigmoidConfig,
) -> Result<Tensor> {
    prepare_sigmoid(probas, labels, cfg)?
        .weights(cfg.reduction)?
        .reshape(probas.shape())
}

/// The Lovász-Sigmoid's call, shared by [`lovasz_sigmoid`] and
/// [`lovasz_sigmoid_weights`].
pub(crate) fn prepare_sigmoid(
    probas: &Tensor,
    labels: &Tensor,
    cfg: &LovaszSigmoidConfig,
) -> Result<Prepared> {
    prepare_binary(
        probas,
        labels,
        cfg.per_image,
        cfg.ignore_index,
        ErrorKind::Abs,
        "lovasz_sigmoid labels",
    )
}
