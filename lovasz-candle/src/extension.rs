//! The Lovász extension as candle tensors: runs the weight kernel on host data and turns
//! its output into a differentiable loss (`K + Σ A ⊙ x`) or into the weight tensor `W`.

use candle::{bail, DType, Result, Tensor};

use crate::config::Reduction;
use crate::input::with_host_slice;
use crate::weights::{solve, ErrorKind, Output, Problem, Real, Selection};

/// A validated loss input: `x` of shape `[B, C, S]` in f32 or f64 with its host labels.
pub(crate) struct Prepared {
    /// Scores `[B, C, S]` (probabilities or logits), f32 or f64, on the caller's device.
    pub x: Tensor,
    /// Labels `[B, S]` with void pixels set to `input::VOID`.
    pub labels: Vec<u32>,
    pub per_image: bool,
    pub kind: ErrorKind,
    pub selection: Selection,
}

impl Prepared {
    fn dims(&self) -> Result<(usize, usize, usize)> {
        self.x.dims3()
    }

    fn solve_as<T: Real>(&self, output: Output, group_scale: f64) -> Result<(Vec<T>, Vec<f64>)> {
        let (batch, channels, spatial) = self.dims()?;
        with_host_slice::<T, _>(&self.x, |data| {
            let problem = Problem {
                data,
                labels: &self.labels,
                batch,
                channels,
                spatial,
                per_image: self.per_image,
                kind: self.kind,
                output,
                group_scale,
            };
            let solved = solve(&problem, &self.selection)?;
            Ok((solved.values, solved.offsets))
        })
    }

    /// The loss, reduced over images as `reduction` says. Gradients flow into `x` only.
    pub fn loss(&self, reduction: Reduction) -> Result<Tensor> {
        let (values, offsets) = match self.x.dtype() {
            DType::F32 => {
                let (v, k) = self.solve_as::<f32>(Output::Linear, 1.0)?;
                (Tensor::from_vec(v, self.x.shape(), self.x.device())?, k)
            }
            DType::F64 => {
                let (v, k) = self.solve_as::<f64>(Output::Linear, 1.0)?;
                (Tensor::from_vec(v, self.x.shape(), self.x.device())?, k)
            }
            dt => bail!("lovasz: internal dtype {dt:?} (expected f32 or f64)"),
        };
        let (batch, channels, _) = self.dims()?;
        // Row sums first: a two-level sum keeps f32 accuracy on millions of pixels.
        let rows = (values * &self.x)?.sum(2)?;
        let groups = offsets.len();
        let per_group = rows
            .reshape((groups, (batch / groups) * channels))?
            .sum(1)?;
        let per_group = (per_group
            + Tensor::from_vec(offsets, groups, self.x.device())?.to_dtype(self.x.dtype())?)?;
        match (self.per_image, reduction) {
            (true, Reduction::Mean) => per_group.mean(0),
            (true, Reduction::Sum) | (false, Reduction::Mean | Reduction::Sum) => per_group.sum(0),
            (_, Reduction::None) => Ok(per_group),
        }
    }

    /// The weight tensor `W`, shape `[B, C, S]`, detached, with `loss = Σ W ⊙ errors`
    /// under `reduction` (`Mean` folds `1 / B` in when `per_image`).
    pub fn weights(&self, reduction: Reduction) -> Result<Tensor> {
        let (batch, _, _) = self.dims()?;
        let scale = if self.per_image && reduction == Reduction::Mean {
            1.0 / batch as f64
        } else {
            1.0
        };
        match self.x.dtype() {
            DType::F64 => {
                let (v, _) = self.solve_as::<f64>(Output::Weights, scale)?;
                Tensor::from_vec(v, self.x.shape(), self.x.device())
            }
            _ => {
                let (v, _) = self.solve_as::<f32>(Output::Weights, scale)?;
                Tensor::from_vec(v, self.x.shape(), self.x.device())
            }
        }
    }
}
