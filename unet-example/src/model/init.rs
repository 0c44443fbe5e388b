//! The seeded initialiser: a candle-nn VarBuilder backend that creates the U-Net's
//! variables in a [`VarMap`] with values drawn from a seeded generator as candle-nn's
//! [`Init`] hints describe (candle's own initialisers are not seedable).

use std::collections::HashMap;
use std::sync::Mutex;

use candle::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarMap};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The variables of `varmap` by name, locked.
pub(super) fn lock(varmap: &VarMap) -> std::sync::MutexGuard<'_, HashMap<String, Var>> {
    // A poisoned lock only means another thread panicked mid-update; the map is intact.
    varmap.data().lock().unwrap_or_else(|e| e.into_inner())
}

/// A VarBuilder backend that creates missing variables in a [`VarMap`] from a seeded
/// generator, following candle-nn's initialisation hints.
pub(super) struct SeededInit {
    pub(super) varmap: VarMap,
    pub(super) rng: Mutex<ChaCha8Rng>,
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle::Result<Tensor> {
        let mut data = lock(&self.varmap);
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle::bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape())
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let values = sample_init(init, &shape, &mut *rng);
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle::Result<Tensor> {
        candle::bail!("the U-Net builder needs a shape for {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        lock(&self.varmap).contains_key(name)
    }
}

/// Values of a tensor of `shape` drawn as candle-nn's `Init` describes.
fn sample_init(init: Init, shape: &Shape, rng: &mut impl Rng) -> Vec<f32> {
    let n = shape.elem_count();
    let uniform = |lo: f64, up: f64, rng: &mut dyn FnMut() -> f64| -> Vec<f32> {
        (0..n).map(|_| (lo + (up - lo) * rng()) as f32).collect()
    };
    let mut unit = || rng.random::<f64>();
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } => uniform(lo, up, &mut unit),
        Init::Randn { mean, stdev } => normals(n, mean, stdev, &mut unit),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(-bound, bound, &mut unit)
                }
                candle_nn::init::NormalOrUniform::Normal => normals(n, 0.0, std, &mut unit),
            }
        }
    }
}

/// `n` normal draws by Box–Muller from uniform draws in `[0, 1)`.
fn normals(n: usize, mean: f64, std: f64, unit: &mut dyn FnMut() -> f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = unit().max(f64::MIN_POSITIVE);
            let u2 = unit();
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (mean + std * z) as f32
        })
        .collect()
}
