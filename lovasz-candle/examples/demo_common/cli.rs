//! Command-line options that both demos take.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Options shared by the demos (flattened into each demo's `Args`).
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Seed of everything random: label images, features and initial weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Folder the PNGs are written to (created if missing).
    #[arg(long, default_value = "demo-out")]
    pub output: PathBuf,

    /// Side of the square label images, in pixels.
    #[arg(long, default_value_t = 200)]
    pub size: usize,

    /// Threads of candle's CPU kernels in each run (sets CANDLE_NUM_THREADS). The runs
    /// already train in parallel, one per loss; more threads per run only spin-wait on
    /// these small tensors.
    #[arg(long, default_value_t = 1)]
    pub candle_threads: usize,
}

impl CommonArgs {
    /// Checks the options and creates the output folder.
    pub fn prepare(&self) -> Result<()> {
        ensure!(
            self.size >= 2,
            "--size must be at least 2 pixels, got {}",
            self.size
        );
        std::fs::create_dir_all(&self.output)
            .with_context(|| format!("cannot create the output folder {}", self.output.display()))
    }

    /// The random generator all draws of a run come from, seeded with `--seed`.
    pub fn rng(&self) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.seed)
    }
}
