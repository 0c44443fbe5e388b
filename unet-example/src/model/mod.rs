//! The U-Net (Ronneberger et al., 2015): `depth` levels of conv–norm–ReLU pairs,
//! max-pooling down, 2×2 transposed convolutions up, skip connections by concatenation,
//! and a 1×1 convolution to class logits at the input resolution. It runs on one of two
//! sets of [`Layers`], chosen when it is built: the fused CPU ops of `fused-cpu-layers`
//! or candle's own ops. Parameters live in a candle-nn [`VarMap`](candle_nn::VarMap)
//! under candle-nn's names (`down.0.conv1.weight`, `down.0.norm1.running_var`,
//! `up.2.upconv.bias`, `head.weight`), the same for both sets of layers.
//!
//! Weights are drawn from a seeded generator (candle's own initialisers are not
//! seedable), so a seed fixes the initial model on every run and every device.
//!
//! - `config.rs`: [`Norm`] and [`UNetConfig`], the network's shape and its validation;
//! - `layers.rs`: [`Layers`] and the U-Net's operations on each;
//! - `norm.rs`: batch and group norm (+ ReLU) on either set of layers, batch norm
//!   with per-rank or synchronised statistics in data-parallel training;
//! - `all_reduce.rs`: a differentiable sum over the ranks (synchronised batch norm);
//! - `unet.rs`: the blocks and the [`UNet`] (forward pass, prediction, tensors by name,
//!   saving and loading);
//! - `init.rs`: the seeded initialiser, a candle-nn VarBuilder backend.

mod all_reduce;
mod config;
mod init;
mod layers;
mod norm;
mod unet;

pub use config::{Norm, UNetConfig};
pub use layers::Layers;
pub use unet::UNet;
