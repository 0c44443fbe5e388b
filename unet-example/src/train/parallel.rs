//! Data-parallel training over the ranks of a process group: each rank holds a replica of
//! the U-Net, takes its shard of every global batch, and the gradients are averaged over
//! the ranks in buckets. The Lovász-Softmax per batch is the one over the global batch
//! (`lovasz_candle::distributed`), so the ranks optimise the same loss as one process.

use std::sync::Arc;

use candle::backprop::GradStore;
use candle::{Tensor, Var};
use lovasz_candle::distributed::{ProcessGroup, ReduceBuffer};

use crate::{Error, Result};

/// Gradient values summed over the ranks per call: the bucket size of the all-reduce.
pub const BUCKET_VALUES: usize = 1 << 20;

/// A trainer's place in a data-parallel job.
#[derive(Clone)]
pub struct DataParallel {
    group: Arc<dyn ProcessGroup>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DataParallel(rank {} of {})",
            self.group.rank(),
            self.group.world_size()
        )
    }
}

impl DataParallel {
    /// This process's rank in `group`.
    pub fn new(group: Arc<dyn ProcessGroup>) -> Self {
        DataParallel { group }
    }

    /// The process group.
    pub fn group(&self) -> &dyn ProcessGroup {
        self.group.as_ref()
    }

    /// The rank that logs and writes the run folder.
    pub fn is_lead(&self) -> bool {
        self.group.rank() == 0
    }

    /// Fails unless the ranks divide `batch_size`, the global batch.
    pub(super) fn check_batch(&self, batch_size: usize) -> Result<()> {
        let n = self.group.world_size();
        if !batch_size.is_multiple_of(n) {
            return Err(Error::Usage(format!(
                "--batch-size {batch_size} is the global batch and must be a multiple of the {n} ranks"
            )));
        }
        Ok(())
    }

    /// This rank's shard of a global batch: images `[B, C, H, W]` and masks `[B, H, W]`
    /// narrowed to the rank's `B / N` images (rank `r`: images `r·B/N ..`).
    pub(super) fn shard(&self, images: &Tensor, masks: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = self.group.world_size();
        let b = images.dim(0)?;
        if !b.is_multiple_of(n) {
            return Err(Error::Usage(format!(
                "a batch of {b} images does not split over {n} ranks (the last batch of an epoch? use a batch size that divides the training split, or drop the last batch)"
            )));
        }
        let (r, k) = (self.group.rank(), b / n);
        Ok((images.narrow(0, r * k, k)?, masks.narrow(0, r * k, k)?))
    }

    /// Rank 0's values of `vars` on every rank.
    pub(super) fn broadcast(&self, vars: &[(String, Var)]) -> Result<()> {
        for (name, var) in vars {
            let t = var.as_tensor();
            let mut bytes: Vec<u8> = (t.flatten_all()?.to_dtype(candle::DType::F32)?)
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            self.group.broadcast(&mut bytes, 0)?;
            if bytes.len() != 4 * t.elem_count() {
                return Err(Error::Usage(format!(
                    "rank 0's {name} has {} values, this rank's {}: the ranks' models differ",
                    bytes.len() / 4,
                    t.elem_count()
                )));
            }
            let values: Vec<f32> = (bytes.chunks_exact(4))
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let v = Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?;
            var.set(&v)?;
        }
        Ok(())
    }

    /// Replaces the gradient of each of `vars` in `grads` by its mean over the ranks, in
    /// all-reduces of [`BUCKET_VALUES`] values (a variable without a gradient counts as
    /// zeros, so every rank sends the same layout).
    pub(super) fn average_gradients(
        &self,
        grads: &mut GradStore,
        vars: &[(String, Var)],
    ) -> Result<()> {
        let mut flat = Vec::new();
        for (_, var) in vars {
            let t = var.as_tensor();
            match grads.get(t) {
                Some(g) => flat.extend(
                    g.flatten_all()?
                        .to_dtype(candle::DType::F32)?
                        .to_vec1::<f32>()?,
                ),
                None => flat.extend(std::iter::repeat_n(0f32, t.elem_count())),
            }
        }
        for bucket in flat.chunks_mut(BUCKET_VALUES) {
            self.group.all_reduce_sum(ReduceBuffer::F32(bucket))?;
        }
        let scale = 1.0 / self.group.world_size() as f32;
        let mut at = 0;
        for (_, var) in vars {
            let t = var.as_tensor();
            let n = t.elem_count();
            let mean: Vec<f32> = flat[at..at + n].iter().map(|v| v * scale).collect();
            at += n;
            let g = Tensor::from_vec(mean, t.shape(), t.device())?.to_dtype(t.dtype())?;
            grads.insert(t, g);
        }
        Ok(())
    }
}
