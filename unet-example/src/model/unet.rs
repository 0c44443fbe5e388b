//! The U-Net's blocks (conv–norm–ReLU pairs, transposed convolutions) and the [`UNet`]
//! itself: construction from a seed, the forward pass, prediction at any image size,
//! its tensors by name, saving and loading.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use lovasz_candle::distributed::ProcessGroup;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::{Norm, UNetConfig};
use super::init::{lock, SeededInit};
use super::layers::Layers;
use super::norm::{NormLayer, Stats};
use crate::atomic_file::write_atomically;
use crate::{Error, Result};

/// Two 3×3 conv–norm–ReLU layers.
struct ConvBlock {
    conv1: Tensor,
    norm1: NormLayer,
    conv2: Tensor,
    norm2: NormLayer,
}

/// A 3×3 kernel `[cout, cin, 3, 3]`, initialised like candle-nn's `conv2d` (Kaiming
/// normal). No bias: the normalisation that follows removes it.
fn conv_weight(cin: usize, cout: usize, vb: VarBuilder) -> Result<Tensor> {
    Ok(vb.get_with_hints(
        (cout, cin, 3, 3),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?)
}

impl ConvBlock {
    fn new(cin: usize, cout: usize, norm: Norm, vb: VarBuilder) -> Result<Self> {
        Ok(ConvBlock {
            conv1: conv_weight(cin, cout, vb.pp("conv1"))?,
            norm1: NormLayer::new(norm, cout, vb.pp("norm1"))?,
            conv2: conv_weight(cout, cout, vb.pp("conv2"))?,
            norm2: NormLayer::new(norm, cout, vb.pp("norm2"))?,
        })
    }

    /// `cin` channels → `cout` channels, same size.
    fn forward_t(&self, layers: Layers, x: &Tensor, stats: Stats) -> candle::Result<Tensor> {
        let x = layers.conv3x3(x, &self.conv1)?;
        let x = self.norm1.forward_relu_t(layers, &x, stats)?;
        let x = layers.conv3x3(&x, &self.conv2)?;
        self.norm2.forward_relu_t(layers, &x, stats)
    }
}

/// A 2×2 stride-2 transposed convolution's weight `[cin, cout, 2, 2]` and bias.
struct UpConv {
    weight: Tensor,
    bias: Tensor,
}

/// A U-Net whose parameters live in a [`VarMap`] (batch-norm running statistics
/// included, so saving the map saves them), run on one set of [`Layers`]. Inputs and
/// outputs are the usual `[B, C, H, W]` whatever the layers' inner layout.
pub struct UNet {
    cfg: UNetConfig,
    layers: Layers,
    varmap: VarMap,
    down: Vec<ConvBlock>,
    up: Vec<(UpConv, ConvBlock)>,
    head: (Tensor, Tensor),
    device: Device,
    /// The group whose ranks' batch statistics batch norm takes together in training.
    sync_bn: Option<Arc<dyn ProcessGroup>>,
}

impl UNet {
    /// A freshly initialised network on `device`, its weights drawn from `seed`
    /// (candle-nn's initialisation rules: Kaiming normal for 3×3 kernels, uniform
    /// ±1/√fan-in for the transposed convolutions and the head), run on `layers` (`None`:
    /// the device's default, see [`Layers::resolve`]).
    pub fn new(
        cfg: &UNetConfig,
        seed: u64,
        device: &Device,
        layers: Option<Layers>,
    ) -> Result<Self> {
        cfg.validate()?;
        let layers = Layers::resolve(layers, device)?;
        let varmap = VarMap::new();
        let backend = SeededInit {
            varmap: varmap.clone(),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
        let mut down = Vec::with_capacity(cfg.depth);
        for level in 0..cfg.depth {
            let cin = if level == 0 {
                cfg.in_channels
            } else {
                cfg.width(level - 1)
            };
            down.push(ConvBlock::new(
                cin,
                cfg.width(level),
                cfg.norm,
                vb.pp(format!("down.{level}")),
            )?);
        }
        let mut up = Vec::with_capacity(cfg.depth.saturating_sub(1));
        for level in (0..cfg.depth - 1).rev() {
            let vb = vb.pp(format!("up.{level}"));
            let (wide, narrow) = (cfg.width(level + 1), cfg.width(level));
            let bound = 1.0 / (narrow as f64).sqrt() / 2.0;
            let init = Init::Uniform {
                lo: -bound,
                up: bound,
            };
            let upconv = UpConv {
                weight: vb
                    .pp("upconv")
                    .get_with_hints((wide, narrow, 2, 2), "weight", init)?,
                bias: vb.pp("upconv").get_with_hints(narrow, "bias", init)?,
            };
            let block = ConvBlock::new(2 * narrow, narrow, cfg.norm, vb.pp("block"))?;
            up.push((upconv, block));
        }
        let (cin, k) = (cfg.width(0), cfg.num_classes);
        let bound = 1.0 / (cin as f64).sqrt();
        let head_w = vb.pp("head").get_with_hints(
            (k, cin, 1, 1),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let head_b = vb.pp("head").get_with_hints(
            k,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(UNet {
            cfg: cfg.clone(),
            layers,
            varmap,
            down,
            up,
            head: (head_w, head_b),
            device: device.clone(),
            sync_bn: None,
        })
    }

    /// Batch norm in training with the statistics of the global batch over the ranks of
    /// `group` (synchronised batch norm) instead of this rank's: every rank's forward
    /// (and backward) pass then sums per-channel statistics over the group, so every rank
    /// must run the same passes in the same order. An `Err` for a network without batch
    /// norm.
    pub fn synchronise_batch_norm(&mut self, group: Arc<dyn ProcessGroup>) -> Result<()> {
        if self.cfg.norm != Norm::Batch {
            return Err(Error::Usage(format!(
                "synchronised batch norm needs --norm batch, the network has {:?}",
                self.cfg.norm
            )));
        }
        self.sync_bn = Some(group);
        Ok(())
    }

    /// The network's configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The layers the network runs on.
    pub fn layers(&self) -> Layers {
        self.layers
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `[B, C, H, W]` f32 of images `[B, in_channels, H, W]` f32, `H` and `W`
    /// multiples of [`UNetConfig::size_multiple`]. `train` selects batch statistics (and
    /// updates the running ones) instead of the running statistics.
    pub fn forward_t(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let (_, c, h, w) = images.dims4()?;
        if c != self.cfg.in_channels {
            return Err(Error::ChannelMismatch {
                data: c,
                model: self.cfg.in_channels,
            });
        }
        let m = self.cfg.size_multiple();
        if h % m != 0 || w % m != 0 {
            return Err(Error::Usage(format!(
                "a U-Net of depth {} needs image sides that are multiples of {m}, got {h}x{w} (set --crop, or use predict which pads)",
                self.cfg.depth
            )));
        }
        let layers = self.layers;
        let stats = match (&self.sync_bn, train) {
            (_, false) => Stats::Running,
            (None, true) => Stats::Batch,
            (Some(group), true) => Stats::Synchronised(group),
        };
        let mut skips = Vec::with_capacity(self.cfg.depth);
        let mut x = layers.enter(images)?;
        for (level, block) in self.down.iter().enumerate() {
            x = block.forward_t(layers, &x, stats)?;
            if level + 1 < self.cfg.depth {
                skips.push(x.clone());
                x = layers.max_pool2x2(&x)?;
            }
        }
        for (upconv, block) in &self.up {
            let skip = skips
                .pop()
                .ok_or_else(|| candle::Error::Msg("U-Net skip stack underflow".into()))?;
            let x_up = layers.up2x2(&x, &upconv.weight, &upconv.bias)?;
            x = block.forward_t(layers, &layers.cat_channels(&skip, &x_up)?, stats)?;
        }
        Ok(layers.head1x1(&x, &self.head.0, &self.head.1)?)
    }

    /// Class predictions u32 `[B, H, W]` (argmax of the evaluation-mode logits) for
    /// images `[B, in_channels, H, W]` of any size: inputs are zero-padded at the bottom
    /// and right to a multiple of [`UNetConfig::size_multiple`] and the result cropped
    /// back.
    pub fn predict(&self, images: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        let m = self.cfg.size_multiple();
        let (ph, pw) = (h.div_ceil(m) * m, w.div_ceil(m) * m);
        let padded = images
            .pad_with_zeros(2, 0, ph - h)?
            .pad_with_zeros(3, 0, pw - w)?;
        let logits = self.forward_t(&padded, false)?;
        Ok(logits
            .narrow(2, 0, h)?
            .narrow(3, 0, w)?
            .argmax(1)?
            .to_dtype(DType::U32)?)
    }

    /// Every tensor of the model by name: trainable weights and batch-norm running
    /// statistics, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = lock(&self.varmap);
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The tensors the optimiser updates (all but the running statistics), by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.named_vars()
            .into_iter()
            .filter(|(name, _)| !is_running_stat(name))
            .collect()
    }

    /// The number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// A copy of every tensor, by name (for snapshots and checkpoints).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.named_vars()
            .into_iter()
            .map(|(k, v)| Ok((k, v.as_tensor().copy()?)))
            .collect()
    }

    /// Overwrites every tensor from `tensors`, which must hold exactly the model's names
    /// with the model's shapes; `source` names where they came from for the error.
    pub fn set_tensors(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        let vars = self.named_vars();
        let mismatch = |detail: String| Error::CheckpointMismatch {
            path: source.to_path_buf(),
            detail,
        };
        for (name, var) in &vars {
            let t = tensors.get(name).ok_or_else(|| {
                mismatch(format!(
                    "tensor {name} of shape {:?} is missing (was it trained with another depth or width?)",
                    var.dims()
                ))
            })?;
            if t.dims() != var.dims() {
                return Err(mismatch(format!(
                    "tensor {name} has shape {:?} in the file but {:?} in the model",
                    t.dims(),
                    var.dims()
                )));
            }
        }
        if let Some(extra) = tensors
            .keys()
            .filter(|k| !vars.iter().any(|(n, _)| n == *k))
            .min()
        {
            return Err(mismatch(format!(
                "the file has tensor {extra}, which the model does not"
            )));
        }
        for (name, var) in &vars {
            if let Some(t) = tensors.get(name) {
                var.set(&t.to_dtype(DType::F32)?.to_device(&self.device)?)?;
            }
        }
        Ok(())
    }

    /// Writes every tensor to a safetensors file, atomically (temporary file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors = self.tensors()?;
        write_atomically(path, |tmp| Ok(candle::safetensors::save(&tensors, tmp)?))
    }

    /// Reads a safetensors file written by [`UNet::save`] into this model; an
    /// [`Error::CheckpointMismatch`] when its tensors do not fit the configuration.
    pub fn load(&self, path: &Path) -> Result<()> {
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let tensors = candle::safetensors::load(path, &Device::Cpu).map_err(|e| {
            Error::CheckpointMismatch {
                path: path.to_path_buf(),
                detail: format!("not a readable safetensors file ({e})"),
            }
        })?;
        self.set_tensors(&tensors, path)
    }
}

fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> UNetConfig {
        UNetConfig {
            in_channels: 3,
            num_classes: 5,
            depth: 3,
            base_width: 4,
            norm: Norm::Batch,
        }
    }

    type Named = Vec<(String, Tensor)>;

    /// What one training step of a fresh `small()` net (seed 0) on `layers` gives on a
    /// fixed batch: the loss, the logits, every trainable gradient, the running
    /// statistics after the step, and the evaluation-mode logits after it.
    struct Step {
        loss: f32,
        logits: Tensor,
        grads: Named,
        stats: Named,
        eval_logits: Tensor,
    }

    fn batch(dev: &Device) -> (Tensor, Tensor) {
        let x: Vec<f32> = (0..2 * 3 * 16 * 24)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let x = Tensor::from_vec(x, (2, 3, 16, 24), dev).unwrap();
        let labels: Vec<u32> = (0..2 * 16 * 24).map(|i| (i * 7 % 11 % 5) as u32).collect();
        (x, Tensor::from_vec(labels, (2, 16, 24), dev).unwrap())
    }

    fn one_step(layers: Layers) -> Step {
        let dev = Device::Cpu;
        let net = UNet::new(&small(), 0, &dev, Some(layers)).unwrap();
        assert_eq!(net.layers(), layers);
        let (x, labels) = batch(&dev);
        let logits = net.forward_t(&x, true).unwrap();
        let cfg = lovasz_candle::CrossEntropyConfig::default();
        let loss = lovasz_candle::cross_entropy(&logits, &labels, &cfg).unwrap();
        let grads = loss.backward().unwrap();
        let grads = net
            .trainable_vars()
            .into_iter()
            .map(|(name, v)| (name, grads.get(&v).unwrap().clone()))
            .collect();
        let stats = net
            .named_vars()
            .into_iter()
            .filter(|(name, _)| is_running_stat(name))
            .map(|(name, v)| (name, v.as_tensor().clone()))
            .collect();
        Step {
            loss: loss.to_scalar().unwrap(),
            logits,
            grads,
            stats,
            eval_logits: net.forward_t(&x, false).unwrap(),
        }
    }

    /// max |a − b| / max |b|.
    fn relative_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / scale.max(1e-6)
    }

    #[test]
    fn fused_layers_train_and_evaluate_like_candles_own() {
        // The whole network on the fused CPU ops against candle's own ops (the layers of
        // CUDA / Metal): same loss, logits, gradients of every parameter, running
        // statistics, and evaluation-mode logits.
        let fused = one_step(Layers::Fused);
        let candle = one_step(Layers::Candle);
        assert!(
            (fused.loss - candle.loss).abs() < 1e-5,
            "loss {} vs {}",
            fused.loss,
            candle.loss
        );
        assert!(
            relative_diff(&fused.logits, &candle.logits) < 1e-4,
            "logits"
        );
        assert!(
            relative_diff(&fused.eval_logits, &candle.eval_logits) < 1e-4,
            "eval logits"
        );
        assert_eq!(fused.grads.len(), candle.grads.len());
        assert_eq!(fused.stats.len(), 2 * 2 * (2 * small().depth - 1));
        for ((name, a), (other, b)) in fused
            .grads
            .iter()
            .zip(&candle.grads)
            .chain(fused.stats.iter().zip(&candle.stats))
        {
            assert_eq!(name, other);
            let d = relative_diff(a, b);
            assert!(d < 1e-3, "{name}: relative difference {d}");
        }
    }

    #[test]
    fn a_checkpoint_of_one_set_of_layers_loads_into_the_other() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let fused = UNet::new(&small(), 3, &dev, Some(Layers::Fused)).unwrap();
        let (x, _) = batch(&dev);
        fused.forward_t(&x, true).unwrap(); // moves the running statistics
        fused.save(&path).unwrap();
        let candle = UNet::new(&small(), 4, &dev, Some(Layers::Candle)).unwrap();
        candle.load(&path).unwrap();
        let a = fused.forward_t(&x, false).unwrap();
        let b = candle.forward_t(&x, false).unwrap();
        assert!(relative_diff(&a, &b) < 1e-4);
        assert_eq!(
            fused.predict(&x).unwrap().to_vec3::<u32>().unwrap(),
            candle.predict(&x).unwrap().to_vec3::<u32>().unwrap()
        );
    }

    #[test]
    fn fused_layers_name_themselves_on_input_they_cannot_take() {
        let fused = UNet::new(&small(), 0, &Device::Cpu, Some(Layers::Fused)).unwrap();
        let x = Tensor::zeros((1, 3, 8, 8), DType::F64, &Device::Cpu).unwrap();
        let err = fused.forward_t(&x, true).unwrap_err().to_string();
        assert!(
            err.contains("f32") && err.contains("--layers candle"),
            "{err}"
        );
    }

    #[test]
    fn logits_have_input_resolution() {
        let net = UNet::new(&small(), 0, &Device::Cpu, None).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 16, 24), &Device::Cpu).unwrap();
        assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[2, 5, 16, 24]);
        assert_eq!(net.forward_t(&x, false).unwrap().dims(), &[2, 5, 16, 24]);
    }

    #[test]
    fn predict_pads_odd_sizes() {
        let net = UNet::new(&small(), 0, &Device::Cpu, None).unwrap();
        let x = Tensor::zeros((1, 3, 13, 7), DType::F32, &Device::Cpu).unwrap();
        let p = net.predict(&x).unwrap();
        assert_eq!(p.dims(), &[1, 13, 7]);
        assert_eq!(p.dtype(), DType::U32);
        let err = net.forward_t(&x, false).unwrap_err().to_string();
        assert!(err.contains("multiples of 4"), "{err}");
    }

    #[test]
    fn seed_fixes_the_weights() {
        let a = UNet::new(&small(), 7, &Device::Cpu, None)
            .unwrap()
            .tensors()
            .unwrap();
        let b = UNet::new(&small(), 7, &Device::Cpu, None)
            .unwrap()
            .tensors()
            .unwrap();
        let c = UNet::new(&small(), 8, &Device::Cpu, None)
            .unwrap()
            .tensors()
            .unwrap();
        let w = "down.1.conv1.weight";
        let v = |m: &HashMap<String, Tensor>| m[w].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
        assert!(a.contains_key("down.0.norm1.running_var"));
    }

    #[test]
    fn widths_and_trainable_vars() {
        let net = UNet::new(&UNetConfig::default(), 0, &Device::Cpu, None).unwrap();
        let names: Vec<String> = net.trainable_vars().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().all(|n| !n.contains("running")));
        assert!(names.contains(&"up.2.upconv.weight".to_string()));
        // Widths 12/24/48/96: the same count as PyTorch's twin in benches/unet_twin.py.
        assert_eq!(net.num_parameters(), 271_875);
    }

    #[test]
    fn group_norm_checks_divisibility() {
        let mut cfg = small();
        cfg.norm = Norm::Group { groups: 3 };
        assert!(cfg.validate().is_err());
        cfg.norm = Norm::Group { groups: 2 };
        let net = UNet::new(&cfg, 0, &Device::Cpu, None).unwrap();
        let x = Tensor::randn(0f32, 1., (1, 3, 8, 8), &Device::Cpu).unwrap();
        assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[1, 5, 8, 8]);
    }
}
