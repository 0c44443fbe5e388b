//! The loss on CUDA tensors: the fused op's forward pass and the weights `W` through the
//! CUDA backend of the kernel ([`crate::kernel::cuda`]); the coefficients stay on the
//! device for the backward pass.

use candle::backend::BackendStorage;
use candle::op::BackpropOp;
use candle::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

use super::{FusedLovasz, Prepared};
use crate::config::Reduction;
use crate::kernel::cuda::{solve, CudaReal};
use crate::kernel::segmented::Segments;
use crate::kernel::Output;

impl FusedLovasz {
    /// [`candle::CustomOp1::cuda_fwd`]: the per-group losses `[G]`, the coefficients kept.
    pub(super) fn cuda_forward(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match storage.dtype() {
            DType::F32 => self.cuda_forward_as::<f32>(storage, layout),
            DType::F64 => self.cuda_forward_as::<f64>(storage, layout),
            dt => bail!("lovasz: internal dtype {dt:?} (expected f32 or f64)"),
        }
    }

    fn cuda_forward_as<T: CudaReal>(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (plan, labels) = self.take_plan()?;
        let segs = Segments::new(plan, T::DTYPE == DType::F64)?;
        let (values, losses) = solve::<T>(storage, layout, &segs, &labels)?;
        drop((segs, labels));
        let dev = storage.device().clone();
        let coefficients = CudaStorage::wrap_cuda_slice(values, dev.clone());
        self.keep(Tensor::from_storage(
            Storage::Cuda(coefficients),
            layout.shape().clone(),
            BackpropOp::none(),
            false,
        ))?;
        Ok((
            CudaStorage::wrap_cuda_slice(losses, dev),
            Shape::from(self.groups),
        ))
    }
}

impl Prepared {
    /// [`Prepared::weights`] of a CUDA input, computed on its device.
    pub(super) fn cuda_weights(&self, reduction: Reduction) -> Result<Tensor> {
        match self.x.dtype() {
            DType::F32 => self.cuda_weights_as::<f32>(reduction),
            DType::F64 => self.cuda_weights_as::<f64>(reduction),
            dt => bail!("lovasz: internal dtype {dt:?} (expected f32 or f64)"),
        }
    }

    fn cuda_weights_as<T: CudaReal>(&self, reduction: Reduction) -> Result<Tensor> {
        let x = self.x.contiguous()?;
        let plan = self.plan(Output::Weights, reduction, false)?;
        let segs = Segments::new(plan, T::DTYPE == DType::F64)?;
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            bail!("lovasz: expected a CUDA tensor (internal error)")
        };
        let (values, _) = solve::<T>(cuda, layout, &segs, &self.labels)?;
        let values = CudaStorage::wrap_cuda_slice(values, cuda.device().clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(values),
            x.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }
}
