//! The Lovász extension as candle tensors: runs the weight kernel and turns its output
//! into a differentiable loss, or into the weight tensor `W`.
//!
//! Two paths give the same loss. On the CPU, and on CUDA with the `cuda` feature
//! (`cuda.rs`, the device kernel), a custom op computes the per-group losses inside the
//! kernel and keeps the coefficients `A` for its backward pass (`∂loss/∂x = A`). On other
//! devices (Metal; and on the CPU when the host-copy path is forced) the input is copied
//! to the host for the kernel and the loss is `K + Σ A ⊙ x`, a multiply and a sum on the
//! device.

#[cfg(feature = "cuda")]
mod cuda;

use std::sync::{Arc, Mutex};

use candle::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::channel_softmax::{softmax, softmax_backward};
use crate::config::Reduction;
use crate::input::{device_emulation_forced, host_copy_forced, with_host_slice};
use crate::kernel::segmented::{self, host::HostPrimitives, Call};
use crate::kernel::{
    solve, ChannelOrder, ErrorKind, HostSort, Output, Problem, Real, Selection, Solved,
};

/// Everything about a loss but its input tensor.
pub(crate) struct LossSpec {
    /// Labels `[B, S]` with void pixels set to `input::VOID`.
    pub labels: Vec<u32>,
    pub per_image: bool,
    pub kind: ErrorKind,
    pub selection: Selection,
    /// Where the class axis of the input is: `[B, C, S]` or `[B, S, C]`.
    pub order: ChannelOrder,
}

impl LossSpec {
    fn groups(&self, batch: usize) -> usize {
        if self.per_image {
            batch
        } else {
            1
        }
    }

    fn solve<T: HostSort>(
        &self,
        data: &[T],
        (batch, channels, spatial): (usize, usize, usize),
        output: Output,
        group_scale: f64,
    ) -> Result<Solved<T>> {
        let problem = Problem {
            data,
            order: self.order,
            labels: &self.labels,
            batch,
            channels,
            spatial,
            per_image: self.per_image,
            kind: self.kind,
            output,
            group_scale,
        };
        solve(&problem, &self.selection)
    }

    /// The device path's plan of this loss over inputs of `dims` and dtype `T`.
    pub(crate) fn call<T: Real>(
        &self,
        dims: (usize, usize, usize),
        output: Output,
        group_scale: f64,
        from_logits: bool,
    ) -> Result<Call> {
        let shape = segmented::Shape {
            dims,
            order: self.order,
            kind: self.kind,
            output,
            per_image: self.per_image,
            group_scale,
            from_logits,
            wide: T::DTYPE == DType::F64,
        };
        Call::new(shape, &self.selection, &self.labels)
    }

    /// The device path on the host ([`segmented::host`]): per-pixel values and per-group
    /// losses, as [`Self::solve`] gives them (with the softmax and its Jacobian inside
    /// when `from_logits`).
    fn emulate<T: HostSort>(
        &self,
        data: &[T],
        dims: (usize, usize, usize),
        output: Output,
        group_scale: f64,
        from_logits: bool,
    ) -> Result<Solved<T>> {
        let call = self.call::<T>(dims, output, group_scale, from_logits)?;
        let mut host = HostPrimitives::new(&call, data, &self.labels)?;
        segmented::run(&mut host, &call)?;
        Ok(Solved {
            values: host.out,
            nan: host.losses.iter().any(|l| l.to_f64().is_nan()),
            offsets: host.offsets,
            losses: host.losses.iter().map(|l| l.to_f64()).collect(),
            unread_rows: Vec::new(),
        })
    }
}

/// A validated loss input: `x` in f32 or f64, read as `[B, C, S]` (or `[B, S, C]`, as
/// its spec's `order` says), and its [`LossSpec`].
pub(crate) struct Prepared {
    /// Scores (probabilities or logits), f32 or f64, on the caller's device, in the
    /// caller's shape: a reshape in the graph would cost candle's backward pass a second
    /// zeros + add over the whole gradient.
    pub x: Tensor,
    /// `(B, C, S)`: `x` read with its spatial axes (and, for binary losses, a unit class
    /// axis) flattened, whichever the order of the class and spatial axes.
    pub dims: (usize, usize, usize),
    pub spec: LossSpec,
}

impl Prepared {
    /// The loss, reduced over images as `reduction` says. Gradients flow into `x` only.
    ///
    /// A mean over images is folded into the kernel's weights and the groups are summed:
    /// on the CPU path the usual backward pass (a gradient of 1) then returns the kept
    /// coefficients as they are, without a pass over them, and both paths round alike.
    pub fn loss(self, reduction: Reduction) -> Result<Tensor> {
        let per_group = if has_native_path(self.x.device()) {
            self.fused(false, reduction)?
        } else {
            self.linear_form(self.group_scale(reduction)?)?
        };
        sum_groups(per_group, reduction)
    }

    /// The loss of `softmax(x, dim 1)`, with `x` logits, in one op whose backward applies
    /// the softmax Jacobian. Only where [`has_native_path`].
    pub fn loss_from_logits(self, reduction: Reduction) -> Result<Tensor> {
        sum_groups(self.fused(true, reduction)?, reduction)
    }

    /// The factor on each group's loss: `1 / B` for a mean over images, else 1.
    fn group_scale(&self, reduction: Reduction) -> Result<f64> {
        Ok(if self.spec.per_image && reduction == Reduction::Mean {
            1.0 / self.dims.0 as f64
        } else {
            1.0
        })
    }

    /// The CPU op: per-group losses `[G]`, scaled by [`Self::group_scale`].
    fn fused(self, from_logits: bool, reduction: Reduction) -> Result<Tensor> {
        let op = FusedLovasz {
            groups: self.spec.groups(self.dims.0),
            dims: self.dims,
            group_scale: self.group_scale(reduction)?,
            order: self.spec.order,
            spec: Mutex::new(Some(self.spec)),
            from_logits,
            coefficients: Mutex::new(None),
        };
        self.x.contiguous()?.apply_op1_arc(Arc::new(Box::new(op)))
    }

    /// Per-group losses `[G]` (times `scale`) as `K + Σ A ⊙ x` with `A` computed on the
    /// host.
    fn linear_form(&self, scale: f64) -> Result<Tensor> {
        let (values, offsets) = self.solve_on_host(Output::Linear, scale)?;
        let (batch, channels, _) = self.dims;
        let groups = offsets.len();
        // Row sums first: a two-level sum keeps f32 accuracy on millions of pixels.
        let products = values * &self.x;
        let rows = match self.spec.order {
            ChannelOrder::First => products?.reshape(self.dims)?.sum(2)?,
            ChannelOrder::Last => {
                let (b, c, s) = self.dims;
                products?.reshape((b, s, c))?.sum(1)?
            }
        };
        let per_group = rows
            .reshape((groups, (batch / groups) * channels))?
            .sum(1)?;
        let offsets =
            Tensor::from_vec(offsets, groups, self.x.device())?.to_dtype(self.x.dtype())?;
        per_group + offsets
    }

    /// The weight tensor `W`, shape `[B, C, S]`, detached, with `loss = Σ W ⊙ errors`
    /// under `reduction` (`Mean` folds `1 / B` in when `per_image`).
    pub fn weights(&self, reduction: Reduction) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.x.device().is_cuda() {
            return self.cuda_weights(self.group_scale(reduction)?);
        }
        Ok(self
            .solve_on_host(Output::Weights, self.group_scale(reduction)?)?
            .0)
    }

    /// Runs the kernel on a host view of `x` (copied there when it lives elsewhere) and
    /// returns its per-pixel values as a tensor on `x`'s device, with the group offsets.
    fn solve_on_host(&self, output: Output, scale: f64) -> Result<(Tensor, Vec<f64>)> {
        let dims = self.dims;
        let (shape, device) = (self.x.shape(), self.x.device());
        let emulate = device_emulation_forced();
        match self.x.dtype() {
            DType::F32 => {
                let s = with_host_slice::<f32, _>(&self.x, |d| match emulate {
                    true => self.spec.emulate(d, dims, output, scale, false),
                    false => self.spec.solve(d, dims, output, scale),
                })?;
                Ok((Tensor::from_vec(s.values, shape, device)?, s.offsets))
            }
            DType::F64 => {
                let s = with_host_slice::<f64, _>(&self.x, |d| match emulate {
                    true => self.spec.emulate(d, dims, output, scale, false),
                    false => self.spec.solve(d, dims, output, scale),
                })?;
                Ok((Tensor::from_vec(s.values, shape, device)?, s.offsets))
            }
            dt => bail!("lovasz: internal dtype {dt:?} (expected f32 or f64)"),
        }
    }
}

/// Whether the loss runs as the fused op on `device`: on the CPU (unless the host-copy
/// path is forced) and, with the `cuda` feature, on CUDA devices. Elsewhere (Metal) the
/// input is copied to the host for the kernel.
pub(crate) fn has_native_path(device: &Device) -> bool {
    (device.is_cpu() && !host_copy_forced()) || (cfg!(feature = "cuda") && device.is_cuda())
}

/// Combines the per-group losses `[G]` (already scaled by `Prepared::group_scale`) as
/// `reduction` says.
fn sum_groups(per_group: Tensor, reduction: Reduction) -> Result<Tensor> {
    match reduction {
        Reduction::None => Ok(per_group),
        Reduction::Mean | Reduction::Sum => per_group.sum(0),
    }
}

/// The CPU path: one op whose forward runs the kernel and returns the per-group losses
/// `[G]`, and whose backward multiplies the kept coefficients by the incoming gradient.
struct FusedLovasz {
    /// Taken by the forward pass, so that the labels are freed before the backward pass.
    spec: Mutex<Option<LossSpec>>,
    groups: usize,
    /// `(B, C, S)` of the input.
    dims: (usize, usize, usize),
    /// A factor on every group's loss and coefficients (`1 / B` for a mean over images).
    group_scale: f64,
    /// The input is logits: the op applies the softmax over the class axis itself, and
    /// keeps the gradient with respect to the logits.
    from_logits: bool,
    /// Where the class axis of the input is.
    order: ChannelOrder,
    coefficients: Mutex<Option<Tensor>>,
}

impl FusedLovasz {
    fn forward<T: HostSort>(&self, input: &[T], shape: &Shape) -> Result<Vec<T>> {
        let dims = self.dims;
        if input.len() != dims.0 * dims.1 * dims.2 {
            bail!(
                "lovasz: input of {} values for dims {dims:?} (internal error)",
                input.len()
            )
        }
        let spec = self.take_spec()?;
        if device_emulation_forced() {
            let solved = spec.emulate(
                input,
                dims,
                Output::Linear,
                self.group_scale,
                self.from_logits,
            )?;
            self.keep(Tensor::from_vec(solved.values, shape, &Device::Cpu)?)?;
            return Ok(solved.losses.into_iter().map(T::from_f64).collect());
        }
        let probas;
        let data = if self.from_logits {
            probas = softmax(input, dims, self.order);
            &probas[..]
        } else {
            input
        };
        let mut solved = spec.solve(data, dims, Output::Linear, self.group_scale)?;
        drop(spec);
        if self.from_logits {
            softmax_backward(data, &mut solved.values, dims, self.order);
        }
        self.keep(Tensor::from_vec(solved.values, shape, &Device::Cpu)?)?;
        // NaN anywhere in the input gives a NaN loss, as the device path does. The kernel
        // saw the rows its jobs read; only the others are scanned here.
        let (c_n, s_n) = (dims.1, dims.2);
        let nan = solved.nan
            || (solved.unread_rows.par_iter()).any(|&r| {
                let (b, c) = (r / c_n, r % c_n);
                (0..s_n).any(|i| {
                    data[self.order.index((c_n, s_n), b, c, i)]
                        .to_f64()
                        .is_nan()
                })
            });
        Ok(solved
            .losses
            .into_iter()
            .map(|l| T::from_f64(if nan { f64::NAN } else { l }))
            .collect())
    }
}

impl FusedLovasz {
    /// The loss spec, taken by the one forward pass.
    fn take_spec(&self) -> Result<LossSpec> {
        let spec = match self.spec.lock() {
            Ok(mut slot) => slot.take(),
            Err(_) => bail!("lovasz: loss spec poisoned by an earlier panic"),
        };
        match spec {
            Some(spec) => Ok(spec),
            None => bail!("lovasz: the forward pass of this op ran twice (internal error)"),
        }
    }

    /// Keeps the coefficients `A` for the backward pass.
    fn keep(&self, coefficients: Tensor) -> Result<()> {
        match self.coefficients.lock() {
            Ok(mut slot) => *slot = Some(coefficients),
            Err(_) => bail!("lovasz: coefficient store poisoned by an earlier panic"),
        }
        Ok(())
    }
}

impl CustomOp1 for FusedLovasz {
    fn name(&self) -> &'static str {
        "lovasz-fused"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("lovasz: input must be contiguous")
        };
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.forward(&v[start..end], layout.shape())?),
            CpuStorage::F64(v) => CpuStorage::F64(self.forward(&v[start..end], layout.shape())?),
            _ => bail!("lovasz: internal dtype (expected f32 or f64)"),
        };
        Ok((out, Shape::from(self.groups)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.cuda_forward(storage, layout)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let coefficients = match self.coefficients.lock() {
            Ok(slot) => slot.clone(),
            Err(_) => bail!("lovasz: coefficient store poisoned by an earlier panic"),
        };
        let Some(a) = coefficients else {
            bail!("lovasz: backward called before forward")
        };
        // The incoming gradient is one value per group; when it is the same for every
        // group (a plain sum or mean), scaling `A` needs no broadcast, and none at all for 1.
        let g = grad_res.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if g.iter().all(|&v| v == g[0]) {
            return Ok(Some(if g[0] == 1.0 { a } else { a.affine(g[0], 0.0)? }));
        }
        let mut per_image = vec![1; arg.rank()];
        per_image[0] = self.dims.0;
        Ok(Some(a.broadcast_mul(&grad_res.reshape(per_image)?)?))
    }
}
