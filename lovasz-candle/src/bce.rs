//! Numerically stable binary cross-entropy with logits (the reference's `binary_xloss`).

use candle::{Result, Tensor};

use crate::input::{check_label_dims, check_not_empty, upcast, HostLabels, VOID};

/// Binary cross-entropy with logits, `relu(x) - x y + log(1 + exp(-|x|))`, averaged over
/// the valid pixels (stable for any logit magnitude).
///
/// * `logits`: any shape, f16, bf16, f32 or f64.
/// * `labels`: the same shape, 0 / 1 (u8, u32 or i64), or `ignore_index`.
///
/// Returns a scalar, f64 for f64 input and f32 otherwise. With no valid pixel the loss is
/// 0 with a zero gradient (the reference would give NaN).
///
/// ```
/// # fn main() -> candle::Result<()> {
/// use candle::{Device, Tensor};
/// let logits = Tensor::new(&[0.0f32, 0.0], &Device::Cpu)?;
/// let labels = Tensor::new(&[1u32, 0], &Device::Cpu)?;
/// let loss = lovasz_candle::binary_xloss(&logits, &labels, None)?.to_scalar::<f32>()?;
/// assert!((loss - std::f32::consts::LN_2).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn binary_xloss(logits: &Tensor, labels: &Tensor, ignore_index: Option<u32>) -> Result<Tensor> {
    check_not_empty(logits, "logits")?;
    check_label_dims(labels, logits.dims(), "logits", logits.dims())?;
    let x = upcast(logits, "logits")?;
    let host = HostLabels::new(labels, 2, ignore_index, "binary_xloss labels")?;
    let valid: Vec<f32> = host
        .values
        .iter()
        .map(|&l| f32::from(u8::from(l != VOID)))
        .collect();
    let target: Vec<f32> = host
        .values
        .iter()
        .map(|&l| f32::from(u8::from(l == 1)))
        .collect();
    let n_valid = valid.iter().filter(|&&v| v > 0.0).count();
    let dev = x.device();
    let valid = Tensor::from_vec(valid, x.shape(), dev)?.to_dtype(x.dtype())?;
    let target = Tensor::from_vec(target, x.shape(), dev)?.to_dtype(x.dtype())?;
    let per_pixel =
        ((x.relu()? - (&x * target)?)? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
    let total = (per_pixel * valid)?.sum_all()?;
    total.affine(1.0 / n_valid.max(1) as f64, 0.0)
}
