//! [`Layers`]: the two implementations a [`UNet`](super::UNet) can run its layers on,
//! chosen once when the model is built, and the U-Net's operations on each.
//!
//! - [`Layers::Fused`]: the `fused-cpu-layers` crate's single-node autograd ops (f32 on
//!   the CPU), on channel-first activations `[C, B, H, W]`. The default on the CPU.
//! - [`Layers::Candle`]: candle's own ops on `[B, C, H, W]`: `conv2d` (cuDNN with the
//!   `cudnn` feature, Metal's kernels with `metal`), `conv_transpose2d`, batch norm from
//!   reductions, and 2×2 max pooling as a max over each window's 4 values (candle 0.11's
//!   `max_pool2d` backward scales a window's gradient by tied maxima / 4, a quarter for a
//!   unique maximum). The default on CUDA and Metal; any dtype.
//!
//! Both take the same weights under the same names (`[O, C, 3, 3]` kernels, `[C, O, 2, 2]`
//! transposed kernels), so a checkpoint written with one loads into the other.

use std::str::FromStr;

use candle::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which implementation of the layers a [`UNet`](super::UNet) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layers {
    /// The fused CPU ops of `fused-cpu-layers` (f32 on the CPU only).
    Fused,
    /// candle's own ops, on every device.
    Candle,
}

impl FromStr for Layers {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fused" => Ok(Layers::Fused),
            "candle" => Ok(Layers::Candle),
            _ => Err(Error::Usage(format!(
                "unknown layers {s:?}: expected fused (the CPU's fused ops) or candle (candle's own ops)"
            ))),
        }
    }
}

impl std::fmt::Display for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layers::Fused => "fused",
            Layers::Candle => "candle",
        })
    }
}

impl Layers {
    /// The layers `choice` names, or the default for `device` when it is `None`:
    /// [`Layers::Fused`] on the CPU, [`Layers::Candle`] on CUDA and Metal. Fused layers
    /// on another device than the CPU are an [`Error::Usage`] naming the fix.
    pub fn resolve(choice: Option<Layers>, device: &Device) -> Result<Layers> {
        match choice {
            None if device.is_cpu() => Ok(Layers::Fused),
            None => Ok(Layers::Candle),
            Some(Layers::Fused) if !device.is_cpu() => Err(Error::Usage(format!(
                "--layers fused runs on the CPU only, and the device is {}; use --layers candle (the default there) or --device cpu",
                crate::device::device_name(device)
            ))),
            Some(layers) => Ok(layers),
        }
    }

    /// The channel axis of the activations: 0 in `[C, B, H, W]`, 1 in `[B, C, H, W]`.
    pub(super) fn channel_axis(self) -> usize {
        match self {
            Layers::Fused => 0,
            Layers::Candle => 1,
        }
    }

    /// Images `[B, C, H, W]` as activations of these layers.
    pub(super) fn enter(self, images: &Tensor) -> candle::Result<Tensor> {
        match self {
            Layers::Fused => images.transpose(0, 1)?.contiguous(),
            Layers::Candle => Ok(images.clone()),
        }
    }

    /// Activations back as `[B, C, H, W]` (contiguous): the swap of the first two axes
    /// is its own inverse, so this is [`Layers::enter`] again.
    pub(super) fn leave(self, x: &Tensor) -> candle::Result<Tensor> {
        self.enter(x)
    }

    /// A per-channel vector `[C]` shaped to broadcast over the activations.
    pub(super) fn per_channel(self, v: &Tensor) -> candle::Result<Tensor> {
        let c = v.elem_count();
        match self {
            Layers::Fused => v.reshape((c, 1, 1, 1)),
            Layers::Candle => v.reshape((1, c, 1, 1)),
        }
    }

    /// A 3×3 convolution, stride 1, zero padding 1, no bias; `weight` `[O, C, 3, 3]`.
    pub(super) fn conv3x3(self, x: &Tensor, weight: &Tensor) -> candle::Result<Tensor> {
        match self {
            Layers::Fused => fused_cpu_layers::conv3x3(x, weight),
            Layers::Candle => x.conv2d(weight, 1, 1, 1, 1),
        }
    }

    /// A 2×2 transposed convolution, stride 2, with bias; `weight` `[C, O, 2, 2]`.
    pub(super) fn up2x2(
        self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
    ) -> candle::Result<Tensor> {
        match self {
            Layers::Fused => fused_cpu_layers::conv_transpose2x2(x, weight, bias),
            Layers::Candle => x
                .conv_transpose2d(weight, 0, 0, 2, 1)?
                .broadcast_add(&self.per_channel(bias)?),
        }
    }

    /// 2×2 max pooling, stride 2 (even `H` and `W`).
    pub(super) fn max_pool2x2(self, x: &Tensor) -> candle::Result<Tensor> {
        match self {
            Layers::Fused => fused_cpu_layers::max_pool2x2(x),
            Layers::Candle => {
                let (b, c, h, w) = x.dims4()?;
                if h % 2 != 0 || w % 2 != 0 {
                    candle::bail!("max_pool2x2: H and W must be even, got {h}x{w}")
                }
                // Each window's 4 values last, then their max: the gradient goes to the
                // window's maxima (to each of tied ones; after a ReLU those are mostly
                // windows of zeros, whose gradient the ReLU stops).
                x.reshape((b * c, h / 2, 2, w / 2, 2))?
                    .permute((0, 1, 3, 2, 4))?
                    .reshape((b * c, h / 2, w / 2, 4))?
                    .max_keepdim(3)?
                    .reshape((b, c, h / 2, w / 2))
            }
        }
    }

    /// The skip connection: `skip` and `up` joined along the channels, `skip` first.
    pub(super) fn cat_channels(self, skip: &Tensor, up: &Tensor) -> candle::Result<Tensor> {
        Tensor::cat(&[skip, up], self.channel_axis())
    }

    /// The 1×1 head with bias (`weight` `[K, C, 1, 1]`, `bias` `[K]`): logits
    /// `[B, K, H, W]`, contiguous.
    pub(super) fn head1x1(
        self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
    ) -> candle::Result<Tensor> {
        match self {
            Layers::Fused => fused_cpu_layers::head1x1(x, weight, bias),
            Layers::Candle => x
                .conv2d(weight, 0, 1, 1, 1)?
                .broadcast_add(&self.per_channel(bias)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves() {
        assert_eq!("fused".parse::<Layers>().unwrap(), Layers::Fused);
        assert_eq!("Candle".parse::<Layers>().unwrap(), Layers::Candle);
        let err = "cudnn".parse::<Layers>().unwrap_err().to_string();
        assert!(err.contains("fused") && err.contains("candle"), "{err}");
        let cpu = Device::Cpu;
        assert_eq!(Layers::resolve(None, &cpu).unwrap(), Layers::Fused);
        assert_eq!(
            Layers::resolve(Some(Layers::Candle), &cpu).unwrap(),
            Layers::Candle
        );
    }
}
