//! What one invocation of a run was given ([`Invocation`]): the run folder, if any, and
//! the options that do not change the results; and the preparation of a folder for a
//! new run.

use std::path::{Path, PathBuf};

use super::checkpoint::{
    CONFIG_FILE, CURVES_FILE, METRICS_FILE, MODEL_FILE, PREDICTIONS_FILE, STATE_FILE, SUMMARY_FILE,
};
use super::config::{RunConfig, RunOptions};
use crate::atomic_file::write_json;
use crate::{Error, Result};

/// The run folder (none: nothing is written) and the options of one invocation.
#[derive(Debug, Clone)]
pub(super) struct Invocation {
    out: Option<PathBuf>,
    options: RunOptions,
}

impl Invocation {
    /// An invocation writing to `out`, if any, with `options`.
    pub(super) fn new(out: Option<&Path>, options: RunOptions) -> Self {
        Invocation {
            out: out.map(Path::to_path_buf),
            options,
        }
    }

    /// The run folder, if any.
    pub(super) fn out(&self) -> Option<&Path> {
        self.out.as_deref()
    }

    /// Writes nothing from now on (a data-parallel rank other than 0).
    pub(super) fn without_output(&mut self) {
        self.out = None;
    }

    /// The options that do not change the results.
    pub(super) fn options(&self) -> &RunOptions {
        &self.options
    }

    /// With a run folder: creates it for the new run `run` and writes `config.json`. A
    /// folder that already holds a run is an error unless `options.overwrite`, which
    /// deletes the run's files.
    pub(super) fn start(&self, run: &RunConfig) -> Result<()> {
        if let Some(dir) = &self.out {
            prepare_output(dir, self.options.overwrite)?;
            write_json(&dir.join(CONFIG_FILE), run)?;
        }
        Ok(())
    }
}

/// Creates the run folder `dir`; one that already holds a run is an error unless
/// `overwrite`, which deletes the run's files.
fn prepare_output(dir: &Path, overwrite: bool) -> Result<()> {
    if dir.join(STATE_FILE).exists() || dir.join(CONFIG_FILE).exists() {
        if !overwrite {
            return Err(Error::Usage(format!(
                "{} already holds a run: continue it with `train --resume {}`, pick another --output, or pass --overwrite",
                dir.display(),
                dir.display()
            )));
        }
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let ours = name.is_some_and(|n| {
                n.starts_with("checkpoint-epoch")
                    || [
                        CONFIG_FILE,
                        STATE_FILE,
                        MODEL_FILE,
                        METRICS_FILE,
                        SUMMARY_FILE,
                        CURVES_FILE,
                        PREDICTIONS_FILE,
                    ]
                    .contains(&n.as_str())
            });
            if ours && path.is_file() {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}
