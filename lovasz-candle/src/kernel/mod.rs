//! The weight kernel: for every (group, class) of a loss, the Lovász weight of each pixel.
//!
//! For one group of pixels (an image, or the whole batch) and one class, the Lovász
//! extension of the Jaccard loss is `Σ_k e_π(k) g_k` with `π` sorting the errors in
//! decreasing order and `g` the Jaccard gradient of the sorted ground truth (Berman et al.,
//! CVPR 2018, Eq. 9 and Alg. 1). The reference holds `g` constant, so the loss is linear
//! in the errors with one weight per pixel and class; every class mean, class weight and
//! image mean folds into that weight.
//!
//! Each error is itself affine in the input where it is differentiable
//! (`|fg - p| = s (fg - p)` with `s = ±1`; a positive hinge error is `1 - x t`), so the
//! kernel can also return, instead of the weights `W`, coefficients `A` and one offset `K`
//! per group with `Σ W ⊙ errors = K + Σ A ⊙ input`: the loss is then a single multiply and
//! sum, and its gradient is `A`.
//!
//! # The path of one call
//!
//! [`crate::op`] describes the loss as a [`Call`] (the input's dims and layout, the error
//! kind, the output, the groups), and builds its [`Plan`] once from the call, its classes
//! ([`Selection`]) and its host labels:
//!
//! 1. [`plan`]: the groups, the merged classes, and from the label counts
//!    ([`label_counts`]) one job per (group, class) with its foreground count `G`
//!    and the factor on its weights.
//!
//! The CPU backend ([`cpu`], entry [`solve`]) then runs the plan's jobs:
//!
//! 2. [`cpu::job`], for each job on a rayon thread (or on all of them, split, when
//!    there are fewer jobs than threads):
//!    - [`cpu::build_keys`] packs each pixel's error, index, slope and foreground bits
//!      into one integer ([`keys`]), void pixels left out;
//!    - [`cpu::prune`] leaves out the background keys of weight exactly 0 when a sample
//!      says that pays;
//!    - [`cpu::sort`] sorts them: [`cpu::radix`] on one thread, [`cpu::partition`] on
//!      all threads, leaving the result across two buffers ([`cpu::sorted`]);
//!    - [`cpu::walk`] steps the closed-form Jaccard gradient ([`jaccard_walk`]) along
//!      the sorted keys and writes each pixel's output ([`call::ErrorKind::linear`]).
//! 3. The per-group offsets and losses are summed into [`call::Solved`].
//!
//! Working memory lives in [`cpu::buffer`].
//!
//! # On a GPU
//!
//! [`segmented`] lays the same plan out as a GPU wants it ([`segmented::Segments`]): the
//! jobs side by side in flat arrays,
//! ranked by one radix sort per chunk of jobs, counted by one prefix sum and weighed in
//! closed form slot by slot, as [`segmented::Primitives`] steps. `kernel/cuda/` (feature
//! `cuda`) runs each step as a kernel of `cuda/lovasz.cu` or a CUB call on candle's
//! stream; [`segmented::host`] runs them as host loops, which is how the tests check the
//! device path's composition against [`cpu`] on any machine. The [`Plan`],
//! the error keys ([`keys`]), the float operations ([`real`]), the channel softmax of a
//! call from logits ([`softmax`], which the cross-entropy takes too) and the closed form
//! ([`jaccard_walk`]) are shared.

pub(crate) mod call;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod jaccard_walk;
pub(crate) mod keys;
pub(crate) mod label_counts;
pub(crate) mod plan;
pub(crate) mod real;
pub(crate) mod segmented;
pub(crate) mod softmax;

pub(crate) use call::{Call, ChannelOrder, ClassEntry, ErrorKind, Output, Selection};
pub use cpu::{cached_buffer_bytes, release_cached_buffers, CACHE_MAX_BYTES};
pub(crate) use cpu::{plan_global, solve, solve_global, HostSort};
pub(crate) use jaccard_walk::JaccardWalk;
pub(crate) use plan::Plan;
pub(crate) use real::Real;
