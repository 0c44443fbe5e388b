//! The Lovász extension as a candle op: the choice of device path, the custom op that runs
//! the weight kernel and turns its output into a differentiable loss, and the weight
//! tensor `W`.
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

use crate::config::Reduction;
use crate::input::with_host_slice;
use crate::kernel::segmented::host;
use crate::kernel::softmax::{softmax, softmax_backward};
use crate::kernel::{
    plan_global, solve, solve_global, Call, ChannelOrder, HostSort, Output, Plan, Selection,
};
use crate::process_group::ProcessGroup;
use crate::test_paths::{device_emulation_forced, host_copy_forced};

/// A validated loss input: `x` in f32 or f64, read as `[B, C, S]` (or `[B, S, C]`), what
/// the loss computes over it, its host labels and its classes.
pub(crate) struct Prepared {
    /// Scores (probabilities or logits), f32 or f64, on the caller's device, in the
    /// caller's shape: a reshape in the graph would cost candle's backward pass a second
    /// zeros + add over the whole gradient.
    pub x: Tensor,
    /// The loss over `x` ([`Call::new`]); the output, the group scale and whether `x` is
    /// logits are set by each use.
    pub call: Call,
    /// Labels `[B, S]` with void pixels set to `input::VOID`.
    pub labels: Vec<u32>,
    pub selection: Selection,
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
            self.linear_form(reduction)?
        };
        sum_groups(per_group, reduction)
    }

    /// The loss of `softmax(x, dim 1)`, with `x` logits, in one op whose backward applies
    /// the softmax Jacobian. Only where [`has_native_path`].
    pub fn loss_from_logits(self, reduction: Reduction) -> Result<Tensor> {
        sum_groups(self.fused(true, reduction)?, reduction)
    }

    /// The per-batch loss over the union of the batches of every rank of `group` (of
    /// `softmax(x)` over the class axis when `from_logits`): the value is the same on every
    /// rank, the gradient is this rank's slice of that loss's gradient. A scalar, or `[1]`
    /// for `Reduction::None` (one group). `label_dtype`, the dtype of the caller's labels,
    /// must be the same on every rank, as everything else about the call.
    pub fn global_loss(
        self,
        reduction: Reduction,
        from_logits: bool,
        label_dtype: DType,
        group: &dyn ProcessGroup,
    ) -> Result<Tensor> {
        let call = Call {
            output: Output::Linear,
            group_scale: 1.0,
            from_logits,
            ..self.call
        };
        let (dev, dtype) = (self.x.device().clone(), self.x.dtype());
        let (a, loss) = match dtype {
            DType::F32 => {
                let (a, loss) = self.solve_global::<f32>(call, label_dtype, group)?;
                (Tensor::from_vec(a, self.x.shape(), &dev)?, loss)
            }
            DType::F64 => {
                let (a, loss) = self.solve_global::<f64>(call, label_dtype, group)?;
                (Tensor::from_vec(a, self.x.shape(), &dev)?, loss)
            }
            dt => bail!("lovasz: internal dtype {dt:?} (expected f32 or f64)"),
        };
        // `t - t` is exactly 0 and carries the gradient `A` into `x`; the value is the
        // loss over every rank's pixels, the same bits on every rank.
        let t = (&self.x * a)?.sum_all()?;
        let value = Tensor::new(loss, &dev)?.to_dtype(dtype)?;
        let out = ((&t - t.detach())? + value)?;
        match reduction {
            Reduction::None => out.reshape(1),
            Reduction::Mean | Reduction::Sum => Ok(out),
        }
    }

    /// [`Self::global_loss`]'s coefficients `A` (in `x`'s layout) and loss, on the host.
    fn solve_global<T: HostSort>(
        &self,
        call: Call,
        label_dtype: DType,
        group: &dyn ProcessGroup,
    ) -> Result<(Vec<T>, f64)> {
        let Call {
            dims,
            order,
            from_logits,
            ..
        } = call;
        let labels = &self.labels[..];
        with_host_slice::<T, _>(&self.x, |d| {
            let plan = plan_global::<T>(call, &self.selection, labels, label_dtype, group)?;
            let probas;
            let data = if from_logits {
                probas = softmax(d, dims, order);
                &probas[..]
            } else {
                d
            };
            let mut solved = solve_global(&plan, data, labels, group)?;
            if from_logits {
                softmax_backward(data, &mut solved.values, dims, order);
            }
            Ok((solved.values, solved.losses[0]))
        })
    }

    /// The weight tensor `W`, shape `[B, C, S]`, detached, with `loss = Σ W ⊙ errors`
    /// under `reduction` (`Mean` folds `1 / B` in when `per_image`).
    pub fn weights(&self, reduction: Reduction) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.x.device().is_cuda() {
            return self.cuda_weights(reduction);
        }
        Ok(self.solve_on_host(Output::Weights, reduction)?.0)
    }

    /// The plan of this loss with `output`, the group scale of `reduction` (`1 / B` for a
    /// mean over images, else 1) and `from_logits`.
    fn plan(&self, output: Output, reduction: Reduction, from_logits: bool) -> Result<Plan> {
        let group_scale = if self.call.per_image && reduction == Reduction::Mean {
            1.0 / self.call.dims.0 as f64
        } else {
            1.0
        };
        let call = Call {
            output,
            group_scale,
            from_logits,
            ..self.call
        };
        Plan::new(call, &self.selection, &self.labels)
    }

    /// The fused op: per-group losses `[G]`, scaled by the group scale of `reduction`.
    fn fused(self, from_logits: bool, reduction: Reduction) -> Result<Tensor> {
        let plan = self.plan(Output::Linear, reduction, from_logits)?;
        let op = FusedLovasz {
            call: plan.call,
            groups: plan.groups.len(),
            planned: Mutex::new(Some((plan, self.labels))),
            coefficients: Mutex::new(None),
        };
        self.x.contiguous()?.apply_op1_arc(Arc::new(Box::new(op)))
    }

    /// Per-group losses `[G]` (scaled as `reduction` says) as `K + Σ A ⊙ x` with `A`
    /// computed on the host.
    fn linear_form(&self, reduction: Reduction) -> Result<Tensor> {
        let (values, offsets) = self.solve_on_host(Output::Linear, reduction)?;
        let (batch, channels, spatial) = self.call.dims;
        let groups = offsets.len();
        // Row sums first: a two-level sum keeps f32 accuracy on millions of pixels.
        let products = values * &self.x;
        let rows = match self.call.order {
            ChannelOrder::First => products?.reshape(self.call.dims)?.sum(2)?,
            ChannelOrder::Last => products?.reshape((batch, spatial, channels))?.sum(1)?,
        };
        let per_group = rows
            .reshape((groups, (batch / groups) * channels))?
            .sum(1)?;
        let offsets =
            Tensor::from_vec(offsets, groups, self.x.device())?.to_dtype(self.x.dtype())?;
        per_group + offsets
    }

    /// Runs the kernel on a host view of `x` (copied there when it lives elsewhere) and
    /// returns its per-pixel values as a tensor on `x`'s device, with the group offsets.
    fn solve_on_host(&self, output: Output, reduction: Reduction) -> Result<(Tensor, Vec<f64>)> {
        let plan = self.plan(output, reduction, false)?;
        let (shape, device) = (self.x.shape(), self.x.device());
        let labels = &self.labels[..];
        let emulate = device_emulation_forced();
        match self.x.dtype() {
            DType::F32 => {
                let s = with_host_slice::<f32, _>(&self.x, |d| match emulate {
                    true => host::emulate(plan, d, labels),
                    false => solve(&plan, d, labels),
                })?;
                Ok((Tensor::from_vec(s.values, shape, device)?, s.offsets))
            }
            DType::F64 => {
                let s = with_host_slice::<f64, _>(&self.x, |d| match emulate {
                    true => host::emulate(plan, d, labels),
                    false => solve(&plan, d, labels),
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

/// Combines the per-group losses `[G]` (already scaled by the group scale) as
/// `reduction` says.
fn sum_groups(per_group: Tensor, reduction: Reduction) -> Result<Tensor> {
    match reduction {
        Reduction::None => Ok(per_group),
        Reduction::Mean | Reduction::Sum => per_group.sum(0),
    }
}

/// The fused path (the CPU, and CUDA with the `cuda` feature): one op whose forward runs
/// the kernel and returns the per-group losses `[G]`, and whose backward multiplies the
/// kept coefficients by the incoming gradient.
struct FusedLovasz {
    /// What the op computes (`output` is [`Output::Linear`]).
    call: Call,
    groups: usize,
    /// The plan and the labels, taken by the forward pass, so that they are freed before
    /// the backward pass.
    planned: Mutex<Option<(Plan, Vec<u32>)>>,
    coefficients: Mutex<Option<Tensor>>,
}

impl FusedLovasz {
    fn forward<T: HostSort>(&self, input: &[T], shape: &Shape) -> Result<Vec<T>> {
        let (plan, labels) = self.take_plan()?;
        let Call {
            dims,
            order,
            from_logits,
            ..
        } = self.call;
        if input.len() != dims.0 * dims.1 * dims.2 {
            bail!(
                "lovasz: input of {} values for dims {dims:?} (internal error)",
                input.len()
            )
        }
        if device_emulation_forced() {
            let solved = host::emulate(plan, input, &labels)?;
            self.keep(Tensor::from_vec(solved.values, shape, &Device::Cpu)?)?;
            return Ok(solved.losses.into_iter().map(T::from_f64).collect());
        }
        let probas;
        let data = if from_logits {
            probas = softmax(input, dims, order);
            &probas[..]
        } else {
            input
        };
        let mut solved = solve(&plan, data, &labels)?;
        drop((plan, labels));
        if from_logits {
            softmax_backward(data, &mut solved.values, dims, order);
        }
        self.keep(Tensor::from_vec(solved.values, shape, &Device::Cpu)?)?;
        // NaN anywhere in the input gives a NaN loss, as the device path does. The kernel
        // saw the rows its jobs read; only the others are scanned here.
        let (c_n, s_n) = (dims.1, dims.2);
        let nan = solved.nan
            || (solved.unread_rows.par_iter()).any(|&r| {
                let (b, c) = (r / c_n, r % c_n);
                (0..s_n).any(|i| data[order.index((c_n, s_n), b, c, i)].is_nan())
            });
        Ok(solved
            .losses
            .into_iter()
            .map(|l| T::from_f64(if nan { f64::NAN } else { l }))
            .collect())
    }

    /// The plan and the labels, taken by the one forward pass.
    fn take_plan(&self) -> Result<(Plan, Vec<u32>)> {
        let planned = match self.planned.lock() {
            Ok(mut slot) => slot.take(),
            Err(_) => bail!("lovasz: loss plan poisoned by an earlier panic"),
        };
        match planned {
            Some(planned) => Ok(planned),
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
        per_image[0] = self.call.dims.0;
        Ok(Some(a.broadcast_mul(&grad_res.reshape(per_image)?)?))
    }
}
