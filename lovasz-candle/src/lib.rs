//! Lovász-Softmax and Lovász hinge losses for [candle](https://github.com/huggingface/candle).
//!
//! These losses optimise the intersection-over-union (Jaccard index) directly: they are the
//! Lovász extension of the Jaccard loss, a convex surrogate that is exact on binary
//! predictions (M. Berman, A. Rannen Triki, M. B. Blaschko, *The Lovász-Softmax loss: A
//! tractable surrogate for the optimization of the intersection-over-union measure in
//! neural networks*, CVPR 2018). The numbers are those of the authors' reference
//! implementation, checked against fixtures computed with it.
//!
//! | loss | input | reference |
//! |---|---|---|
//! | [`lovasz_softmax`] | class probabilities `[B, C, *]`, labels `[B, *]` | `lovasz_softmax` |
//! | [`lovasz_softmax_with_logits`] | logits `[B, C, *]` | softmax + `lovasz_softmax` |
//! | [`lovasz_hinge`] | binary logits `[B, *]`, labels 0/1 | `lovasz_hinge` |
//! | [`lovasz_sigmoid`] | foreground probabilities `[B, *]` | `lovasz_softmax(.., classes=[1])` |
//! | [`lovasz_hinge_multilabel`] | logits `[B, C, *]`, labels `[B, C, *]` 0/1 | per-channel hinge |
//! | [`binary_xloss`], [`cross_entropy`] | logits | `binary_xloss`, `F.cross_entropy` |
//!
//! `*` stands for any number of spatial dims (none, `H, W`, `D, H, W`). Labels are class
//! indices (u8, u32, i16, i32 or i64); the configs' `ignore_index` marks void pixels, which are left
//! out, and their `Default` gives the reference's defaults. Bad input (a label out of
//! range, a shape or dtype mismatch, an empty tensor) is an `Err` that names the problem.
//!
//! To train a segmentation model, add [`lovasz_softmax_with_logits`] to the cross-entropy
//! of the same logits, or fine-tune with it after a cross-entropy phase. The
//! [example](#example) below takes the loss and its gradient; the repository's
//! `examples/own_training_loop.rs` trains a small candle-nn model with both.
//! [`metrics`] has the IoU and a [`ConfusionMatrix`](metrics::ConfusionMatrix) for the
//! mean IoU over a data set; [`lovasz_softmax_weights`], [`lovasz_hinge_weights`],
//! [`lovasz_sigmoid_weights`] and [`lovasz_grad`] expose the loss's parts, and
//! [`metrics::FineGrainedIou`] the per-image mIoU of Wang et al. (NeurIPS 2023).
//!
//! Coming from the authors' PyTorch or TensorFlow code, segmentation_models_pytorch,
//! mmsegmentation or kornia: [`guide`] maps every option to this crate's calls.
//!
//! # How the Jaccard gradient is held constant
//!
//! For each class and group of pixels, the loss sorts the errors in decreasing order and
//! dots them with the Jaccard gradient `g` of the sorted ground truth ([`lovasz_grad`],
//! Alg. 1 of the paper). The reference treats `g` as a constant: in PyTorch it is built
//! from `.detach()`ed data (the old `Variable(data)`), in TensorFlow it would sit behind
//! `tf.stop_gradient`. This crate does the same with weights built outside the graph (as
//! [`candle::Tensor::detach`] would): a weight tensor `W`, one value per pixel and class
//! with every class mean, class weight and image mean folded in, is computed by a sort
//! outside the autograd graph, and the loss is `Σ W ⊙ errors`. Gradients therefore flow only
//! through the errors, exactly as in the reference; [`lovasz_softmax_weights`] returns `W`.
//!
//! # Devices and precision
//!
//! `W` needs a sort of every class's errors. On the CPU the loss is one custom op (rayon
//! over (group, class) jobs, a radix sort per job, exact integer prefix counts) that keeps
//! its coefficients for the backward pass ([`lovasz_softmax_with_logits`] also folds in
//! the softmax and its Jacobian). With the `cuda` feature the same op runs on CUDA
//! tensors on the device (`cuda/lovasz.cu`: the keys, a CUB radix sort per chunk of jobs,
//! the prefix counts and the weights, on candle's stream): the predictions never leave
//! the device; only the labels are read on the host, to check them. On Metal (no kernel
//! yet) the inputs are copied to the host for the sort and the coefficients copied back;
//! the loss expression and its backward pass then run on the input's device. Inputs
//! may be f16, bf16, f32 or f64: half-precision inputs are upcast to f32 (the loss is
//! returned in f32), f64 stays f64.
//!
//! # Cargo features
//!
//! None is on by default (CPU only). `cuda`, `cudnn`, `metal`, `accelerate` and `mkl`
//! turn on candle's (and candle-nn's) features of the same names. `test-paths` is for
//! tests: it adds `force_host_copy` and `force_device_emulation`, which send the losses
//! down the Metal and CUDA paths on the CPU. `mpi` adds `distributed::MpiGroup`, a
//! process group over an MPI job's processes for the [`distributed`] losses (it needs an
//! MPI library, such as OpenMPI, and libclang to build). `nccl` (with `cuda`) adds
//! `distributed::NcclGroup`, a process group of CUDA devices over NCCL (cudarc loads
//! `libnccl.so.2` at run time).
//!
//! # Memory
//!
//! The kernel's working memory is freed when a call returns, but for a small, bounded
//! cache of sort buffers that the binary losses per batch reuse from one training step to
//! the next; [`memory`] tells its size and frees it, and says how to keep the allocator
//! from paying for fresh pages at every step.
//!
//! # Example
//!
//! ```
//! # fn main() -> candle::Result<()> {
//! use candle::{DType, Device, Tensor, Var};
//! use lovasz_candle::{lovasz_softmax_with_logits, Classes, LovaszSoftmaxConfig};
//!
//! let dev = Device::Cpu;
//! // Logits of a batch of 2 images, 3 classes, 8×8 pixels: [B, C, H, W].
//! let logits = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 8, 8), &dev)?)?;
//! // Labels [B, H, W]: every pixel of class 1 here; a label of 255 would be void.
//! let labels = Tensor::ones((2, 8, 8), DType::U32, &dev)?;
//! let cfg = LovaszSoftmaxConfig {
//!     classes: Classes::Present,
//!     per_image: true,
//!     ignore_index: Some(255),
//!     ..Default::default()
//! };
//! let loss = lovasz_softmax_with_logits(logits.as_tensor(), &labels, &cfg)?;
//! let grads = loss.backward()?;
//! let g = grads.get(&logits).expect("gradient of the logits");
//! assert_eq!(g.dims(), &[2, 3, 8, 8]);
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod bce;
mod binary;
mod config;
mod cross_entropy;
pub mod distributed;
pub mod guide;
mod input;
mod jaccard;
mod kernel;
pub mod memory;
pub mod metrics;
mod op;
mod process_group;
mod softmax;
mod softmax_nll;
mod test_paths;
#[cfg(test)]
mod test_rng;

pub use bce::binary_xloss;
pub use binary::{
    lovasz_hinge, lovasz_hinge_multilabel, lovasz_hinge_weights, lovasz_sigmoid,
    lovasz_sigmoid_weights,
};
pub use config::{Classes, LovaszHingeConfig, LovaszSigmoidConfig, LovaszSoftmaxConfig, Reduction};
pub use cross_entropy::{cross_entropy, CrossEntropyConfig};
pub use jaccard::lovasz_grad;
pub use softmax::{lovasz_softmax, lovasz_softmax_weights, lovasz_softmax_with_logits};
#[cfg(feature = "test-paths")]
pub use test_paths::{force_device_emulation, force_host_copy};

/// The crate README's examples, compiled and run by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
