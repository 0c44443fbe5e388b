//! `unet-example`: train, compare, evaluate and run a U-Net with the Lovász-Softmax loss.
//! See `unet-example --help`.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use unet_example::cli::{run, Cli};

fn main() -> std::process::ExitCode {
    unet_example::device::limit_elementwise_threads();
    let kept_freed_memory = unet_example::device::keep_freed_memory();
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    tracing::debug!(kept_freed_memory, "allocator settings");
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
