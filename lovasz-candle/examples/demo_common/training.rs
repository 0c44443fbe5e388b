//! The training loop of the demos (Adam, full batch) and the history it records.

use std::time::Instant;

use anyhow::{anyhow, Result};
use candle::{Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

/// What one training run recorded.
pub struct History {
    /// Name of the loss, as shown in the figures.
    pub name: &'static str,
    /// Loss before each Adam step, then after the last one (`iters + 1` values).
    pub loss: Vec<f64>,
    /// Metric (an IoU, a fraction) at the same points as `loss`.
    pub metric: Vec<f64>,
    /// Wall time of the run, in seconds (runs share the CPU when run in parallel).
    pub seconds: f64,
}

impl History {
    /// Metric before training.
    pub fn initial(&self) -> f64 {
        self.metric.first().copied().unwrap_or(f64::NAN)
    }

    /// Metric after training.
    pub fn last(&self) -> f64 {
        self.metric.last().copied().unwrap_or(f64::NAN)
    }
}

/// The checks of the demos' smoke tests: `expected` runs, each with `iters + 1` finite
/// losses and metrics in `[0, 1]`, all starting from the same model.
#[cfg(test)]
pub fn assert_smoke_runs(runs: &[History], expected: usize, iters: usize) {
    assert_eq!(runs.len(), expected);
    for r in runs {
        assert_eq!(r.loss.len(), iters + 1, "{}", r.name);
        assert_eq!(r.metric.len(), iters + 1, "{}", r.name);
        assert!(
            r.loss.iter().all(|l| l.is_finite()),
            "{}: {:?}",
            r.name,
            r.loss
        );
        assert!(
            r.metric.iter().all(|m| (0.0..=1.0).contains(m)),
            "{}",
            r.name
        );
        assert_eq!(r.initial(), runs[0].initial(), "{}", r.name);
    }
}

/// Runs `iters` steps of Adam (AdamW without weight decay) with learning rate `lr` on
/// `vars`. `evaluate` returns the scalar loss to minimise and the metric of the current
/// parameters; it is called before each step and once more at the end.
pub fn train_adam(
    name: &'static str,
    vars: Vec<Var>,
    lr: f64,
    iters: usize,
    mut evaluate: impl FnMut() -> Result<(Tensor, f64)>,
) -> Result<History> {
    let start = Instant::now();
    let params = ParamsAdamW {
        lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut adam = AdamW::new(vars, params)?;
    let mut history = History {
        name,
        loss: Vec::with_capacity(iters + 1),
        metric: Vec::with_capacity(iters + 1),
        seconds: 0.0,
    };
    for step in 0..=iters {
        let (loss, metric) = evaluate()?;
        history
            .loss
            .push(loss.to_dtype(candle::DType::F64)?.to_scalar::<f64>()?);
        history.metric.push(metric);
        if step < iters {
            adam.backward_step(&loss)?;
        }
    }
    history.seconds = start.elapsed().as_secs_f64();
    Ok(history)
}

/// Runs `train` on every item, each on its own thread, and returns the results in the
/// order of `items`. The demos' runs are independent and candle runs each on one core,
/// so this is how they use the machine's cores.
pub fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    train: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    std::thread::scope(|scope| {
        let train = &train;
        let handles: Vec<_> = items
            .iter()
            .map(|item| scope.spawn(move || train(item)))
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .map_err(|_| anyhow!("a training thread panicked"))?
            })
            .collect()
    })
}

/// Prints the initial and final metric (in percent) and the wall time of each run.
pub fn print_summary(metric: &str, runs: &[History]) {
    println!(
        "{:<22} {:>16} {:>10} {:>9}",
        "loss",
        format!("{metric} start"),
        "final",
        "time"
    );
    for run in runs {
        println!(
            "{:<22} {:>16.2} {:>10.2} {:>8.1}s",
            run.name,
            100.0 * run.initial(),
            100.0 * run.last(),
            run.seconds
        );
    }
}
