//! Input checks and host access: dtype and shape validation, labels copied to the host
//! with void pixels marked, float tensors read as host slices (zero-copy on the CPU).

use candle::{bail, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::test_paths::host_copy_forced;

/// Host label value marking a void (ignored) pixel.
pub(crate) const VOID: u32 = u32::MAX;

/// Checks that `t` has a floating-point dtype and returns the dtype the loss is computed
/// in: f32 for f16 / bf16 / f32, f64 for f64.
pub(crate) fn compute_dtype(t: &Tensor, what: &str) -> Result<DType> {
    match t.dtype() {
        DType::F16 | DType::BF16 | DType::F32 => Ok(DType::F32),
        DType::F64 => Ok(DType::F64),
        dt => bail!("{what} must be f16, bf16, f32 or f64, got {dt:?}"),
    }
}

/// Upcasts half-precision inputs to f32 (the gradient flows through the cast).
pub(crate) fn upcast(t: &Tensor, what: &str) -> Result<Tensor> {
    let dt = compute_dtype(t, what)?;
    if t.dtype() == dt {
        Ok(t.clone())
    } else {
        t.to_dtype(dt)
    }
}

/// Fails on a tensor with no element.
pub(crate) fn check_not_empty(t: &Tensor, what: &str) -> Result<()> {
    if t.elem_count() == 0 {
        bail!("empty input: {what} has shape {:?}", t.dims())
    }
    Ok(())
}

/// Calls `f` with the elements of the float tensor `t` (dtype `T`) in row-major order:
/// borrowed from CPU storage when possible, else copied to the host.
pub(crate) fn with_host_slice<T: candle::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    if t.device().is_cpu() && !host_copy_forced() {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return f(&cpu.as_slice::<T>()?[start..end]);
        }
    }
    let host = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<T>()?;
    f(&host)
}

/// Labels copied to the host as u32, void pixels set to [`VOID`].
pub(crate) struct HostLabels {
    pub values: Vec<u32>,
}

impl HostLabels {
    /// Reads `labels` (u8, u32, i16, i32 or i64), mapping `ignore_index` to [`VOID`] and
    /// failing on any other value outside `[0, n_classes)`. `what` names the tensor in errors.
    pub fn new(
        labels: &Tensor,
        n_classes: usize,
        ignore_index: Option<u32>,
        what: &str,
    ) -> Result<Self> {
        let (n, ig) = (n_classes, ignore_index);
        // Read in place where possible: no widening copy of the common label dtypes.
        match labels.dtype() {
            DType::U8 => with_host_slice::<u8, _>(labels, |raw| Self::map(raw, n, ig, what)),
            DType::U32 => with_host_slice::<u32, _>(labels, |raw| Self::map(raw, n, ig, what)),
            DType::I64 => with_host_slice::<i64, _>(labels, |raw| Self::map(raw, n, ig, what)),
            DType::I16 | DType::I32 => {
                let wide = labels.to_dtype(DType::I64)?;
                with_host_slice::<i64, _>(&wide, |raw| Self::map(raw, n, ig, what))
            }
            dt => bail!("{what} must have an integer dtype (u8, u32 or i64), got {dt:?}"),
        }
    }

    fn map<V: Copy + Into<i64> + Sync>(
        raw: &[V],
        n_classes: usize,
        ignore_index: Option<u32>,
        what: &str,
    ) -> Result<Self> {
        const CHUNK: usize = 1 << 16;
        let ignore = ignore_index.map(i64::from);
        let mut values = vec![0u32; raw.len()];
        // Each chunk maps its labels and reports its first bad one; the first of those in
        // pixel order is the error, whatever the thread timing.
        let bad: Option<(usize, i64)> = values
            .par_chunks_mut(CHUNK)
            .zip(raw.par_chunks(CHUNK))
            .enumerate()
            .map(|(ci, (out, raw))| {
                for (i, (o, &v)) in out.iter_mut().zip(raw).enumerate() {
                    let v: i64 = v.into();
                    if Some(v) == ignore {
                        *o = VOID;
                    } else if v < 0 || v >= n_classes as i64 {
                        return Some((ci * CHUNK + i, v));
                    } else {
                        *o = v as u32;
                    }
                }
                None
            })
            .find_first(Option::is_some)
            .flatten();
        if let Some((i, v)) = bad {
            let allowed = match ignore_index {
                Some(ig) => format!("[0, {n_classes}) or the ignore index {ig}"),
                None => format!("[0, {n_classes}) (no ignore index set)"),
            };
            bail!("{what}: label {v} at flat position {i} is out of range: expected {allowed}")
        }
        Ok(Self { values })
    }
}

/// Checks that `labels` has the dims `expected` (what the prediction implies).
pub(crate) fn check_label_dims(
    labels: &Tensor,
    expected: &[usize],
    pred_name: &str,
    pred_dims: &[usize],
) -> Result<()> {
    if labels.dims() != expected {
        bail!(
            "shape mismatch: labels have shape {:?}, but {pred_name} of shape {pred_dims:?} needs labels of shape {expected:?}",
            labels.dims()
        )
    }
    Ok(())
}

/// The axes of a `[B, C, *spatial]` prediction, or `[B, *spatial, C]` with
/// `channels_last`.
pub(crate) struct ClassAxes {
    pub batch: usize,
    pub classes: usize,
    /// The spatial dims, in order (empty for `[B, C]`).
    pub spatial: Vec<usize>,
    /// The index of the class axis: 1, or the last.
    pub axis: usize,
}

impl ClassAxes {
    /// Reads the axes of `dims`, failing (for `loss` and its input `what`) below rank 2.
    pub fn of(dims: &[usize], channels_last: bool, loss: &str, what: &str) -> Result<Self> {
        if dims.len() < 2 {
            let layout = if channels_last {
                "[B, *spatial, C] (channels_last)"
            } else {
                "[B, C, *spatial]"
            };
            bail!("{loss}: {what} must be {layout}, got shape {dims:?}")
        }
        let axis = if channels_last { dims.len() - 1 } else { 1 };
        let spatial = (dims.iter().enumerate())
            .filter(|&(i, _)| i != 0 && i != axis)
            .map(|(_, &d)| d)
            .collect();
        Ok(Self {
            batch: dims[0],
            classes: dims[axis],
            spatial,
            axis,
        })
    }

    /// The dims the labels must have: `[B, *spatial]`.
    pub fn label_dims(&self) -> Vec<usize> {
        let mut dims = vec![self.batch];
        dims.extend_from_slice(&self.spatial);
        dims
    }
}

/// Predictions and labels of one shape, on the host as u32: preds in `[0, n_classes)`,
/// labels in `[0, n_classes)` or `ignore_index` (then [`VOID`]).
pub(crate) fn host_preds_and_labels(
    preds: &Tensor,
    labels: &Tensor,
    n_classes: usize,
    ignore_index: Option<u32>,
) -> Result<(Vec<u32>, Vec<u32>)> {
    if preds.dims() != labels.dims() {
        bail!(
            "shape mismatch: preds have shape {:?} but labels have shape {:?}",
            preds.dims(),
            labels.dims()
        )
    }
    let preds = HostLabels::new(&preds.to_device(&Device::Cpu)?, n_classes, None, "preds")?;
    let labels = HostLabels::new(labels, n_classes, ignore_index, "labels")?;
    Ok((preds.values, labels.values))
}
