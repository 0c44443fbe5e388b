//! `--device auto|cpu|cuda[:N]|metal`: parsing the choice and opening the device, with an
//! error that names the cargo feature when the binary was built without it.

use std::str::FromStr;

use candle::Device;

use crate::{Error, Result};

/// Where to run the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 if available, else Metal, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device `N` (needs the `cuda` feature).
    Cuda(usize),
    /// The Metal device (needs the `metal` feature).
    Metal,
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            "metal" | "mps" => Ok(DeviceChoice::Metal),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(Error::Usage(format!(
                    "unknown device {s:?}: expected auto, cpu, cuda, cuda:N or metal"
                ))),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal => f.write_str("metal"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device. `Auto` falls back silently; an explicit CUDA or Metal choice
    /// that cannot be honoured is an [`Error::DeviceUnavailable`] naming the feature to
    /// build with, or the driver's error.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => {
                if candle::utils::cuda_is_available() {
                    if let Ok(dev) = Device::new_cuda(0) {
                        return Ok(dev);
                    }
                }
                if candle::utils::metal_is_available() {
                    if let Ok(dev) = Device::new_metal(0) {
                        return Ok(dev);
                    }
                }
                Ok(Device::Cpu)
            }
            DeviceChoice::Cuda(n) => {
                if !candle::utils::cuda_is_available() {
                    return Err(Error::DeviceUnavailable(format!(
                        "cuda:{n} was requested but this binary was built without CUDA support; rebuild with `--features cudnn` (candle's convolutions on cuDNN; `--features cuda` without it), e.g. `cargo run --release -p unet-example --features cudnn -- ...`"
                    )));
                }
                Device::new_cuda(n).map_err(|e| {
                    Error::DeviceUnavailable(format!("cannot open CUDA device {n}: {e}"))
                })
            }
            DeviceChoice::Metal => {
                if !candle::utils::metal_is_available() {
                    return Err(Error::DeviceUnavailable(
                        "metal was requested but this binary was built without Metal support; rebuild with `--features metal` on macOS".to_string(),
                    ));
                }
                Device::new_metal(0).map_err(|e| {
                    Error::DeviceUnavailable(format!("cannot open the Metal device: {e}"))
                })
            }
        }
    }
}

/// Makes candle run its element-wise CPU kernels on the calling thread, unless
/// `CANDLE_NUM_THREADS` is set. Call it first thing in `main`, before any thread starts.
///
/// candle 0.11 splits element-wise ops over a pool of spinning worker threads. On this
/// project's 2-core machines, shared with other jobs, a descheduled worker leaves the
/// main thread spinning: a training step of the default U-Net took ~1 s instead of
/// ~0.18 s (measured). Matrix products and the Lovász sorts still use every core (rayon).
pub fn limit_elementwise_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Runs `f` for work on `device`: on the CPU, on a worker thread of rayon's global pool;
/// on a GPU, on the calling thread (the one that owns its context). Returns `f`'s result.
///
/// The fused CPU layers and the Lovász kernel split each op over that pool. Called from
/// a thread outside it, every split hands its tasks to the workers and puts the caller
/// to sleep until they are done, and the workers sleep again while the caller runs the
/// serial parts of the step: two futex round trips per op. Called from a worker, the
/// caller takes part in its own ops and only the other workers wait. A step of the
/// default U-Net on 2 cores: ~6 % faster (`--example step_time`, 2026-12-05, AMD EPYC
/// Zen 4). The results are the same bits. Pair it with [`keep_freed_memory`], which
/// makes the worker allocate from the main arena. Do not run several jobs that wait on
/// one another this way (e.g. the thread ranks of `--ranks N`): each holds a worker
/// while it waits.
pub fn on_compute_pool<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// Tells glibc's allocator to keep the memory a training step frees for the next step,
/// instead of handing large blocks back to the kernel and faulting them in again, zeroed,
/// on the next step. Does nothing when `GLIBC_TUNABLES` is set (the user's own choice of
/// allocator settings wins) or outside Linux with glibc. Returns whether it changed a
/// setting. Call it first thing in `main`.
///
/// glibc serves every block of more than 32 MiB (and, after a free, smaller ones above a
/// moving threshold) with its own `mmap` and returns it with `munmap` when freed, and it
/// trims the top of its heap when more than a few MiB there are free. A training step
/// allocates and frees the same tensors every time, so each step paid for fresh, zeroed
/// pages: about a fifth of a default U-Net step on this project's 2-core VM (~175 against
/// ~225 ms per step, `--example step_time`, three runs each, 2026-11-29). With these
/// settings the process keeps its peak heap size for its whole life, as training loops
/// usually do. Every thread allocates from the main arena (one arena): a thread's own
/// arena would still map large blocks on their own (glibc's fallback when such an arena
/// cannot grow), and the training loop allocates a step's tensors on a worker thread of
/// rayon's pool ([`on_compute_pool`]). Measured with `--example step_time` (2026-12-05,
/// AMD EPYC Zen 4): the step on a worker with one arena 37–38 ms and 101 MB peak RSS;
/// with a worker's own arena the default `train` peaked at 331 MB instead of 208 MB.
pub fn keep_freed_memory() -> bool {
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return false;
    }
    glibc_keep_freed_memory()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_keep_freed_memory() -> bool {
    // SAFETY: `mallopt` only sets allocator parameters; glibc serialises it against
    // allocations in other threads.
    unsafe {
        // Blocks of the main arena (the main thread's) never get an `mmap` of their own:
        // the heap serves them, and freed ones return there.
        let no_mmap = libc::mallopt(libc::M_MMAP_MAX, 0) == 1;
        // Free memory at the top of the heap stays mapped (up to 2 GiB).
        let no_trim = libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1;
        // Every thread allocates from that arena: the step runs on a worker thread of
        // rayon's pool (`on_compute_pool`), whose own arena would map big blocks anew.
        let one_arena = libc::mallopt(libc::M_ARENA_MAX, 1) == 1;
        no_mmap && no_trim && one_arena
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_keep_freed_memory() -> bool {
    false
}

/// A short name of an opened device for logs and summaries.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", candle::utils::get_num_threads()),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_compute_pool_runs_on_a_worker_and_returns_its_result() {
        assert_eq!(rayon::current_thread_index(), None);
        let (worker, sum) = on_compute_pool(&Device::Cpu, || {
            use rayon::prelude::*;
            let sum: u64 = (0..1000u64).into_par_iter().sum();
            (rayon::current_thread_index(), sum)
        });
        assert!(worker.is_some());
        assert_eq!(sum, 499_500);
    }

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:2".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(2)
        );
        assert_eq!(
            "metal".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Metal
        );
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_it() {
        let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[test]
    fn auto_always_opens_something() {
        assert!(DeviceChoice::Auto.open().is_ok());
    }
}
