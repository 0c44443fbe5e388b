//! The Jaccard gradient (Alg. 1 of Berman et al., CVPR 2018): the weights that the
//! Lovász extension of the Jaccard loss gives to errors sorted in decreasing order.

use candle::{bail, DType, Device, Result, Tensor};

use crate::kernel::JaccardWalk;

/// The Jaccard gradient of a ground-truth vector sorted by decreasing error (the
/// reference's `lovasz_grad`, Alg. 1 of the paper).
///
/// * `gt_sorted`: 1-D, values 0 or 1, any integer dtype (u8, u32, i64, ...) or f32 / f64.
///
/// Returns a 1-D tensor of the same length on the same device: f64 if `gt_sorted` is f64,
/// else f32. An empty input gives an empty output.
///
/// ```
/// # fn main() -> candle::Result<()> {
/// use candle::{Device, Tensor};
/// let gt = Tensor::new(&[1u32, 0, 1, 0], &Device::Cpu)?;
/// let g = lovasz_candle::lovasz_grad(&gt)?.to_vec1::<f32>()?;
/// // J = 1 - I/U over the prefixes: 0.5, 2/3, 1, 1
/// assert!((g[0] - 0.5).abs() < 1e-6 && (g[2] - 1.0 / 3.0).abs() < 1e-6 && g[3] == 0.0);
/// # Ok(()) }
/// ```
pub fn lovasz_grad(gt_sorted: &Tensor) -> Result<Tensor> {
    if gt_sorted.rank() != 1 {
        bail!(
            "lovasz_grad expects a 1-D gt_sorted, got shape {:?}",
            gt_sorted.dims()
        )
    }
    let out_dtype = match gt_sorted.dtype() {
        DType::F64 => DType::F64,
        DType::F16 | DType::BF16 | DType::F32 => DType::F32,
        DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64 => DType::F32,
        dt => bail!("lovasz_grad: unsupported dtype {dt:?} for gt_sorted"),
    };
    let host: Vec<f64> = gt_sorted
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1()?;
    let mut fg = Vec::with_capacity(host.len());
    for (i, &v) in host.iter().enumerate() {
        if v == 1.0 {
            fg.push(true);
        } else if v == 0.0 {
            fg.push(false);
        } else {
            bail!("lovasz_grad: gt_sorted must hold 0 or 1, got {v} at position {i}")
        }
    }
    let gts = fg.iter().filter(|&&f| f).count() as u64;
    let mut walk = JaccardWalk::new(gts);
    let grad: Vec<f64> = fg.iter().map(|&f| walk.step(f)).collect();
    Tensor::from_vec(grad, host.len(), gt_sorted.device())?.to_dtype(out_dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_binary_and_bad_rank() {
        let dev = Device::Cpu;
        let err = lovasz_grad(&Tensor::new(&[0u32, 2], &dev).unwrap()).unwrap_err();
        assert!(err.to_string().contains("0 or 1"), "{err}");
        let err = lovasz_grad(&Tensor::zeros((2, 2), DType::U32, &dev).unwrap()).unwrap_err();
        assert!(err.to_string().contains("1-D"), "{err}");
    }
}
