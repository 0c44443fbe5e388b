//! The normalisation after each convolution, followed by ReLU, on either set of
//! [`Layers`]: batch norm with PyTorch's running statistics (momentum 0.1, unbiased
//! running variance), its batch statistics per rank or synchronised over the ranks of a
//! data-parallel job, or group norm.

use std::sync::Arc;

use candle::{Tensor, Var, D};
use candle_nn::{Init, VarBuilder};
use lovasz_candle::distributed::{ProcessGroup, ReduceBuffer};

use super::all_reduce::all_reduce_sum;
use super::config::Norm;
use super::layers::Layers;
use crate::Result;

const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

/// Batch normalisation over `(B, H, W)`: batch statistics in training (which also
/// update the running ones), running statistics in evaluation.
pub(super) struct BatchNorm {
    /// Scale `[C]`.
    weight: Tensor,
    /// Shift `[C]`.
    bias: Tensor,
    /// Running mean `[C]`.
    running_mean: Var,
    /// Running (unbiased) variance `[C]`.
    running_var: Var,
}

/// Group normalisation: per image, over groups of `C / groups` channels and all pixels.
pub(super) struct GroupNorm {
    groups: usize,
    /// Scale `[C]`.
    weight: Tensor,
    /// Shift `[C]`.
    bias: Tensor,
}

/// The statistics batch norm normalises with in one forward pass (group norm has none).
#[derive(Clone, Copy)]
pub(super) enum Stats<'a> {
    /// The running statistics (evaluation).
    Running,
    /// The batch's (training; they update the running ones). In data-parallel training
    /// without synchronisation, this rank's shard's.
    Batch,
    /// The global batch's, summed over the ranks of the group (synchronised batch norm:
    /// the statistics one process would take over the whole batch).
    Synchronised(&'a Arc<dyn ProcessGroup>),
}

/// One normalisation layer of the network.
pub(super) enum NormLayer {
    Batch(BatchNorm),
    Group(GroupNorm),
}

impl NormLayer {
    /// The layer's tensors under `vb` (`weight`, `bias`, and for batch norm
    /// `running_mean`, `running_var`).
    pub(super) fn new(norm: Norm, channels: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        Ok(match norm {
            Norm::Batch => {
                let stat = |name: &str, v: f64| -> Result<Var> {
                    let t = vb.get_with_hints(channels, name, Init::Const(v))?;
                    Ok(Var::from_tensor(&t)?)
                };
                NormLayer::Batch(BatchNorm {
                    weight,
                    bias,
                    running_mean: stat("running_mean", 0.0)?,
                    running_var: stat("running_var", 1.0)?,
                })
            }
            Norm::Group { groups } => NormLayer::Group(GroupNorm {
                groups,
                weight,
                bias,
            }),
        })
    }

    /// `relu(norm(x))` of activations of `layers`.
    pub(super) fn forward_relu_t(
        &self,
        layers: Layers,
        x: &Tensor,
        stats: Stats,
    ) -> candle::Result<Tensor> {
        match self {
            NormLayer::Batch(bn) => bn.forward_relu_t(layers, x, stats),
            NormLayer::Group(gn) => gn.forward(layers, x)?.relu(),
        }
    }
}

impl BatchNorm {
    fn forward_relu_t(&self, layers: Layers, x: &Tensor, stats: Stats) -> candle::Result<Tensor> {
        let c = self.weight.elem_count();
        let n = x.elem_count() / c.max(1);
        let group = match stats {
            Stats::Running => None,
            Stats::Batch => Some(None),
            Stats::Synchronised(group) => Some(Some(group)),
        };
        let Some(group) = group else {
            // x · s + t with s = γ / √(running σ² + ε), t = β − running μ · s.
            let rm = self.running_mean.as_detached_tensor();
            let rv = self.running_var.as_detached_tensor();
            let scale = (rv + EPS)?.sqrt()?.recip()?.mul(&self.weight)?;
            let shift = (&self.bias - rm.mul(&scale)?)?;
            return x
                .broadcast_mul(&layers.per_channel(&scale)?)?
                .broadcast_add(&layers.per_channel(&shift)?)?
                .relu();
        };
        if let Some(group) = group {
            return self.forward_synchronised(layers, x, group);
        }
        match layers {
            Layers::Fused => {
                let (y, moments) =
                    fused_cpu_layers::batch_norm_relu(x, &self.weight, &self.bias, EPS)?;
                let dev = x.device();
                let mean = Tensor::from_vec(moments.mean, c, dev)?;
                let var = Tensor::from_vec(moments.var, c, dev)?;
                self.update_running(&mean, &var, n)?;
                Ok(y)
            }
            Layers::Candle => {
                let dims = (0, 2, 3);
                let mean = x.mean_keepdim(dims)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim(dims)?;
                self.update_running(
                    &mean.detach().flatten_all()?,
                    &var.detach().flatten_all()?,
                    n,
                )?;
                let scale = (var + EPS)?
                    .sqrt()?
                    .recip()?
                    .broadcast_mul(&layers.per_channel(&self.weight)?)?;
                xc.broadcast_mul(&scale)?
                    .broadcast_add(&layers.per_channel(&self.bias)?)?
                    .relu()
            }
        }
    }

    /// Training with the statistics of the global batch: per channel, the sums of the
    /// values and then of the squared deviations from the global mean are summed over the
    /// ranks (two all-reduces of `[C]`, differentiable, so the gradient also flows through
    /// the other ranks' statistics), as one process would take them over the whole batch.
    fn forward_synchronised(
        &self,
        layers: Layers,
        x: &Tensor,
        group: &Arc<dyn ProcessGroup>,
    ) -> candle::Result<Tensor> {
        let c = self.weight.elem_count();
        let mut count = [(x.elem_count() / c.max(1)) as u64];
        group.all_reduce_sum(ReduceBuffer::U64(&mut count))?;
        let n = count[0] as usize;
        let sum_per_channel = |t: &Tensor| -> candle::Result<Tensor> {
            let t = match layers.channel_axis() {
                0 => t.sum_keepdim((1, 2, 3))?,
                _ => t.sum_keepdim((0, 2, 3))?,
            };
            all_reduce_sum(&t.flatten_all()?, group)? / n.max(1) as f64
        };
        let mean = sum_per_channel(x)?;
        let xc = x.broadcast_sub(&layers.per_channel(&mean)?)?;
        let var = sum_per_channel(&xc.sqr()?)?;
        self.update_running(&mean.detach(), &var.detach(), n)?;
        let scale = (var + EPS)?.sqrt()?.recip()?.mul(&self.weight)?;
        xc.broadcast_mul(&layers.per_channel(&scale)?)?
            .broadcast_add(&layers.per_channel(&self.bias)?)?
            .relu()
    }

    /// PyTorch's running averages from a batch's mean and biased variance `[C]` over
    /// `n` values per channel (the variance made unbiased).
    fn update_running(&self, mean: &Tensor, var: &Tensor, n: usize) -> candle::Result<()> {
        let unbiased = n as f64 / (n.max(2) - 1) as f64;
        let m = MOMENTUM;
        let rm = ((self.running_mean.as_detached_tensor() * (1.0 - m))? + (mean * m)?)?;
        let rv = ((self.running_var.as_detached_tensor() * (1.0 - m))? + (var * (m * unbiased))?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)
    }
}

impl GroupNorm {
    /// Normalises activations of `layers` (candle ops on both: the fused layers' `[C, B,
    /// H, W]` goes through `[B, C, H, W]` and back).
    fn forward(&self, layers: Layers, x: &Tensor) -> candle::Result<Tensor> {
        let nchw = layers.leave(x)?;
        let (b, c, h, w) = nchw.dims4()?;
        let g = self.groups;
        let grouped = nchw.reshape((b, g, (c / g) * h * w))?;
        let mean = grouped.mean_keepdim(D::Minus1)?;
        let xc = grouped.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xc
            .broadcast_div(&(var + EPS)?.sqrt()?)?
            .reshape((b, c, h, w))?
            .broadcast_mul(&Layers::Candle.per_channel(&self.weight)?)?
            .broadcast_add(&Layers::Candle.per_channel(&self.bias)?)?;
        layers.enter(&normed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{DType, Device, Module, ModuleT};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn batch_norm(dev: &Device) -> BatchNorm {
        BatchNorm {
            weight: Tensor::randn(1f32, 0.5, 4, dev).unwrap(),
            bias: Tensor::randn(0f32, 0.5, 4, dev).unwrap(),
            running_mean: Var::zeros(4, DType::F32, dev).unwrap(),
            running_var: Var::ones(4, DType::F32, dev).unwrap(),
        }
    }

    #[test]
    fn candle_batch_norm_matches_candle_nn_in_both_modes() {
        let dev = Device::Cpu;
        let ours = batch_norm(&dev);
        let reference = candle_nn::BatchNorm::new(
            4,
            Tensor::zeros(4, DType::F32, &dev).unwrap(),
            Tensor::ones(4, DType::F32, &dev).unwrap(),
            ours.weight.clone(),
            ours.bias.clone(),
            EPS,
        )
        .unwrap();
        let x = Tensor::randn(1f32, 2., (3, 4, 5, 6), &dev).unwrap();
        let r = reference.forward_t(&x, true).unwrap().relu().unwrap();
        let o = ours
            .forward_relu_t(Layers::Candle, &x, Stats::Batch)
            .unwrap();
        assert!(max_diff(&r, &o) < 1e-5);
        assert!(max_diff(reference.running_mean(), ours.running_mean.as_tensor()) < 1e-6);
        assert!(max_diff(reference.running_var(), ours.running_var.as_tensor()) < 1e-5);
        let r = reference.forward_t(&x, false).unwrap().relu().unwrap();
        let o = ours
            .forward_relu_t(Layers::Candle, &x, Stats::Running)
            .unwrap();
        assert!(max_diff(&r, &o) < 1e-5);
    }

    #[test]
    fn group_norm_matches_candle_nn_on_both_layouts() {
        let dev = Device::Cpu;
        let x = Tensor::randn(1f32, 2., (3, 4, 5, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., 4, &dev).unwrap();
        let b = Tensor::randn(0f32, 1., 4, &dev).unwrap();
        let reference = candle_nn::GroupNorm::new(w.clone(), b.clone(), 4, 2, EPS).unwrap();
        let want = reference.forward(&x).unwrap();
        let ours = GroupNorm {
            groups: 2,
            weight: w,
            bias: b,
        };
        let candle = ours.forward(Layers::Candle, &x).unwrap();
        assert!(max_diff(&want, &candle) < 1e-4);
        let fused = ours
            .forward(Layers::Fused, &Layers::Fused.enter(&x).unwrap())
            .unwrap();
        assert!(max_diff(&want, &Layers::Fused.leave(&fused).unwrap()) < 1e-4);
    }

    /// Two ranks with half a batch each, batch norm synchronised, against one process
    /// with the whole batch: outputs, running statistics and the gradients of the input
    /// slices and of the scale and shift (summed over the ranks, as the gradient of the
    /// summed losses), on both sets of layers.
    #[test]
    fn synchronised_batch_norm_on_two_ranks_is_batch_norm_on_the_whole_batch() {
        use lovasz_candle::distributed::LocalGroup;

        let dev = Device::Cpu;
        let x = Tensor::randn(0.5f32, 2., (4, 3, 5, 6), &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (4, 3, 5, 6), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.5, 3, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, 3, &dev).unwrap();
        let layer = || BatchNorm {
            weight: Var::from_tensor(&w).unwrap().into_inner(),
            bias: Var::from_tensor(&b).unwrap().into_inner(),
            running_mean: Var::zeros(3, DType::F32, &dev).unwrap(),
            running_var: Var::ones(3, DType::F32, &dev).unwrap(),
        };
        /// A pass: y, the running statistics, and d(Σ y·r)/d(x, w, b).
        struct Pass {
            y: Tensor,
            running: [Tensor; 2],
            gx: Tensor,
            gw: Tensor,
            gb: Tensor,
        }
        let run = |bn: &BatchNorm, layers: Layers, x: &Tensor, r: &Tensor, stats: Stats| {
            let x = Var::from_tensor(&layers.enter(x).unwrap()).unwrap();
            let y = bn.forward_relu_t(layers, x.as_tensor(), stats).unwrap();
            let y = layers.leave(&y).unwrap();
            let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |t: &Tensor| g.get(t).unwrap().clone();
            let gx = layers.leave(&grad(x.as_tensor())).unwrap();
            let running =
                [bn.running_mean.as_tensor(), bn.running_var.as_tensor()].map(|t| t.clone());
            Pass {
                y,
                running,
                gx,
                gw: grad(&bn.weight),
                gb: grad(&bn.bias),
            }
        };
        let one = run(&layer(), Layers::Candle, &x, &r, Stats::Batch);
        for layers in [Layers::Candle, Layers::Fused] {
            let ranks: Vec<Pass> = std::thread::scope(|s| {
                let threads: Vec<_> = (LocalGroup::new(2).unwrap().into_iter())
                    .map(|g| {
                        let (x, r, layer, run) = (&x, &r, &layer, &run);
                        s.spawn(move || {
                            let k = g.rank() * 2;
                            let group: Arc<dyn ProcessGroup> = Arc::new(g);
                            let half = |t: &Tensor| t.narrow(0, k, 2).unwrap();
                            let stats = Stats::Synchronised(&group);
                            run(&layer(), layers, &half(x), &half(r), stats)
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let cat = |f: fn(&Pass) -> &Tensor| {
                Tensor::cat(&ranks.iter().map(f).collect::<Vec<_>>(), 0).unwrap()
            };
            let sum = |f: fn(&Pass) -> &Tensor| (f(&ranks[0]) + f(&ranks[1])).unwrap();
            assert!(max_diff(&one.y, &cat(|p| &p.y)) < 1e-5, "{layers}");
            assert!(max_diff(&one.gx, &cat(|p| &p.gx)) < 1e-4, "{layers}");
            assert!(max_diff(&one.gw, &sum(|p| &p.gw)) < 1e-3, "{layers}");
            assert!(max_diff(&one.gb, &sum(|p| &p.gb)) < 1e-3, "{layers}");
            for p in &ranks {
                assert!(max_diff(&one.running[0], &p.running[0]) < 1e-6, "{layers}");
                assert!(max_diff(&one.running[1], &p.running[1]) < 1e-5, "{layers}");
            }
        }
    }
}
