//! The command line: `train`, `compare`, `eval` and `predict`, every flag documented.
//!
//! - `args.rs`: the clap argument structs ([`Cli`], [`Command`], [`TrainArgs`], ...),
//!   their value parsers and the default output folder;
//! - `commands.rs`: [`run`], which carries out a parsed command line, and
//!   [`load_run`].

mod args;
mod commands;

pub use args::{
    default_output, Cli, Command, CompareArgs, EvalArgs, PredictArgs, RuntimeArgs, TrainArgs,
    TrainingArgs,
};
pub use commands::{load_run, run};
