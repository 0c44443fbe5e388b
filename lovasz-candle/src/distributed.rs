//! Data-parallel training: per-batch Lovász losses that are exact over the global batch.
//!
//! In data-parallel training each process (rank) holds a replica of the model and a shard
//! of every global batch, and the gradients are averaged. A per-batch Lovász loss does not
//! split over shards: its Jaccard weights depend on each class's error ranks over the
//! whole batch, so computed per rank it is a per-shard loss, a different objective. The
//! functions here compute the loss over the union of every rank's pixels: the value is the
//! same on every rank, and each rank's gradient is its own slice of that loss's gradient,
//! exactly what one process computing the loss on the concatenated batch (the ranks'
//! batches in rank order) gives; the weights match it bit for bit, the value up to the
//! order of the sum.
//!
//! The ranks are a [`ProcessGroup`]: [`LocalGroup`] runs them as threads of one process;
//! with the `mpi` feature, `MpiGroup` is one process of an MPI job (`mpirun -np N`); with
//! the `nccl` feature, `NcclGroup` is one CUDA device of an NCCL job (bootstrapped through
//! MPI with `mpi` too, or a world of one).
//!
//! # What is exchanged
//!
//! Four collectives per call: an all-gather of each rank's label counts per class (with a
//! description of its call, so that ranks whose calls differ fail with a clear error); an
//! all-gather of each (class) job's foreground floor (the smallest foreground error, 16
//! bytes a job); an all-gather of, per job, the error keys of the rank's pixels split into
//! a foreground and a background list; and an all-reduce of the loss. Void pixels are not
//! sent, nor are background pixels whose error is below every foreground error of the
//! union (they weigh exactly 0), nor, for the hinge, errors `≤ 0`. At most, each rank
//! sends `B·S·K·w` bytes and receives `(N − 1)` times that, for `B` images of `S` pixels,
//! `K` counted classes, `N` ranks and `w` = 4 bytes (f32 input) or 8 (f64); e.g. the
//! Lovász-Softmax over 21 classes of one 512×512 image per rank in f32 sends at most
//! 22 MB, and far less once a model's background errors fall below its foreground ones.
//!
//! # Gradient scale
//!
//! Each rank's backward pass gives the gradient of the global loss through its own
//! pixels; the gradient of the global loss with respect to the weights is the **sum** of
//! the ranks' gradients. A training loop that averages gradients over `N` ranks (PyTorch
//! DDP's convention) must therefore multiply this loss by `N` (or sum instead of average)
//! to descend the global loss at the rate one process would.
//!
//! Per-image losses (`per_image: true`) need no communication and none takes place: the
//! functions return this rank's loss (the mean over its own images for
//! `Reduction::Mean`), and with equal shards the average over the ranks is the mean over
//! the global batch. In a world of one rank, every function is the single-process loss
//! (its kernel, on the device), without communication.
//!
//! # Devices
//!
//! The exchange and the weights are computed on the host: inputs on a GPU are copied to
//! the host once per call, and the loss is formed on the input's device.
//!
//! ```
//! # fn main() -> candle::Result<()> {
//! use candle::{Device, Tensor};
//! use lovasz_candle::distributed::{self, LocalGroup, ProcessGroup};
//! use lovasz_candle::{lovasz_softmax, LovaszSoftmaxConfig};
//!
//! let dev = Device::Cpu;
//! // A batch of 4 images, 3 classes, 8×8 pixels, and its two halves on two ranks.
//! let probas = candle_nn::ops::softmax(&Tensor::randn(0f32, 1., (4, 3, 8, 8), &dev)?, 1)?;
//! let labels = Tensor::rand(0f32, 3., (4, 8, 8), &dev)?.floor()?.to_dtype(candle::DType::U32)?;
//! let cfg = LovaszSoftmaxConfig { per_image: false, ..Default::default() };
//! let whole = lovasz_softmax(&probas, &labels, &cfg)?.to_scalar::<f32>()?;
//! let ranks = LocalGroup::new(2)?;
//! let per_rank: Vec<f32> = std::thread::scope(|s| {
//!     let threads: Vec<_> = ranks
//!         .into_iter()
//!         .map(|g| {
//!             let (p, l) = (probas.narrow(0, 2 * g.rank(), 2), labels.narrow(0, 2 * g.rank(), 2));
//!             let cfg = &cfg;
//!             s.spawn(move || -> candle::Result<f32> {
//!                 distributed::lovasz_softmax(&p?, &l?, cfg, &g)?.to_scalar::<f32>()
//!             })
//!         })
//!         .collect();
//!     threads.into_iter().map(|t| t.join().unwrap()).collect::<candle::Result<_>>()
//! })?;
//! assert!((per_rank[0] - whole).abs() < 1e-6 && per_rank[0] == per_rank[1]);
//! # Ok(()) }
//! ```

use candle::{Result, Tensor};

use crate::binary::{prepare_hinge, prepare_sigmoid};
use crate::config::{LovaszHingeConfig, LovaszSigmoidConfig, LovaszSoftmaxConfig};
use crate::input::{upcast, ClassAxes};
#[cfg(feature = "mpi")]
pub use crate::process_group::MpiGroup;
pub use crate::process_group::{LocalGroup, ProcessGroup, ReduceBuffer};
#[cfg(feature = "nccl")]
pub use crate::process_group::{NcclGroup, NcclId};
use crate::softmax::prepare;

/// [`crate::lovasz_softmax`] over the global batch of `group`: this rank's `probas`
/// (`[B, C, *spatial]`, or channels last) and `labels` (`[B, *spatial]`) are its shard.
/// With `cfg.per_image`, or in a world of one rank, the local loss, without
/// communication. Every rank must call it with the same config and shapes; otherwise
/// every rank gets an `Err`.
pub fn lovasz_softmax(
    probas: &Tensor,
    labels: &Tensor,
    cfg: &LovaszSoftmaxConfig,
    group: &dyn ProcessGroup,
) -> Result<Tensor> {
    if cfg.per_image || group.world_size() == 1 {
        return crate::lovasz_softmax(probas, labels, cfg);
    }
    prepare(probas, labels, cfg)?.global_loss(cfg.reduction, false, labels.dtype(), group)
}

/// [`crate::lovasz_softmax_with_logits`] over the global batch of `group` (see
/// [`lovasz_softmax`]); the softmax and its Jacobian are taken on each rank.
pub fn lovasz_softmax_with_logits(
    logits: &Tensor,
    labels: &Tensor,
    cfg: &LovaszSoftmaxConfig,
    group: &dyn ProcessGroup,
) -> Result<Tensor> {
    if cfg.per_image || group.world_size() == 1 {
        return crate::lovasz_softmax_with_logits(logits, labels, cfg);
    }
    ClassAxes::of(logits.dims(), cfg.channels_last, "lovasz_softmax", "logits")?;
    let logits = upcast(logits, "logits")?;
    prepare(&logits, labels, cfg)?.global_loss(cfg.reduction, true, labels.dtype(), group)
}

/// [`crate::lovasz_hinge`] over the global batch of `group` (see [`lovasz_softmax`]).
pub fn lovasz_hinge(
    logits: &Tensor,
    labels: &Tensor,
    cfg: &LovaszHingeConfig,
    group: &dyn ProcessGroup,
) -> Result<Tensor> {
    if cfg.per_image || group.world_size() == 1 {
        return crate::lovasz_hinge(logits, labels, cfg);
    }
    prepare_hinge(logits, labels, cfg)?.global_loss(cfg.reduction, false, labels.dtype(), group)
}

/// [`crate::lovasz_sigmoid`] over the global batch of `group` (see [`lovasz_softmax`]).
pub fn lovasz_sigmoid(
    probas: &Tensor,
    labels: &Tensor,
    cfg: &LovaszSigmoidConfig,
    group: &dyn ProcessGroup,
) -> Result<Tensor> {
    if cfg.per_image || group.world_size() == 1 {
        return crate::lovasz_sigmoid(probas, labels, cfg);
    }
    prepare_sigmoid(probas, labels, cfg)?.global_loss(cfg.reduction, false, labels.dtype(), group)
}
