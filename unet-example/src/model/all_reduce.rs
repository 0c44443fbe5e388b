//! A differentiable sum over the ranks of a process group, for statistics that must be
//! those of the global batch (synchronised batch norm).

use std::sync::Arc;

use candle::{bail, CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use lovasz_candle::distributed::{ProcessGroup, ReduceBuffer};

/// The element-wise sum of `t` (f32, any shape, the same on every rank) over the ranks of
/// `group`, the same bits on every rank. Differentiable: the gradient of a rank's input
/// is the sum over the ranks of the gradients of the output, since every rank's output
/// depends on every rank's input (summed, these are the gradients of the sum of the
/// ranks' losses). Every rank must call it at the same point of its forward pass, and so
/// of its backward pass. The values go through the host (they are per-channel
/// statistics, a few hundred values).
pub(super) fn all_reduce_sum(t: &Tensor, group: &Arc<dyn ProcessGroup>) -> candle::Result<Tensor> {
    let op = AllReduceSum {
        group: group.clone(),
    };
    t.to_device(&Device::Cpu)?
        .contiguous()?
        .apply_op1(op)?
        .to_device(t.device())
}

struct AllReduceSum {
    group: Arc<dyn ProcessGroup>,
}

impl CustomOp1 for AllReduceSum {
    fn name(&self) -> &'static str {
        "all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            bail!("all_reduce_sum: f32 values only")
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            bail!("all_reduce_sum: the values must be contiguous")
        };
        let mut values = data[a..b].to_vec();
        self.group.all_reduce_sum(ReduceBuffer::F32(&mut values))?;
        Ok((CpuStorage::F32(values), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle::Result<Option<Tensor>> {
        let op = AllReduceSum {
            group: self.group.clone(),
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(op)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Var;
    use lovasz_candle::distributed::LocalGroup;

    #[test]
    fn sums_over_the_ranks_and_so_do_the_gradients() {
        let got: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let threads: Vec<_> = (LocalGroup::new(2).unwrap().into_iter())
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank() as f32;
                        let group: Arc<dyn ProcessGroup> = Arc::new(g);
                        let x = Var::new(&[1.0 + r, 10.0 * (r + 1.0)], &Device::Cpu).unwrap();
                        let y = all_reduce_sum(x.as_tensor(), &group).unwrap();
                        // This rank's loss weighs the sums by (rank + 1): the gradient of
                        // the summed losses is 1 + 2 = 3 for every input.
                        let loss = (&y * (r as f64 + 1.0)).unwrap().sum_all().unwrap();
                        let grads = loss.backward().unwrap();
                        let g = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
                        (y.to_vec1().unwrap(), g)
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for (y, g) in got {
            assert_eq!(y, [3.0, 30.0]);
            assert_eq!(g, [3.0, 3.0]);
        }
    }
}
