//! Process-wide settings that make the demos fast on a small CPU: candle's thread count
//! and, with glibc, an allocator that keeps freed memory.

use anyhow::{ensure, Result};

use super::cli::CommonArgs;

/// Applies `--candle-threads` (as `CANDLE_NUM_THREADS`) and [`keep_freed_memory`]. Call
/// it first thing in `main`, before any other thread exists and before candle's first
/// operation (candle reads the variable once).
pub fn configure(args: &CommonArgs) -> Result<()> {
    ensure!(
        args.candle_threads >= 1,
        "--candle-threads must be at least 1"
    );
    std::env::set_var("CANDLE_NUM_THREADS", args.candle_threads.to_string());
    keep_freed_memory();
    Ok(())
}

/// Every iteration allocates and frees tensors of megabytes. By default glibc hands such
/// blocks back to the kernel on free, so each iteration pays for page faults on fresh
/// memory again (half the CPU time of `demo_multiclass`, more with a thread per run, whose
/// own arena is unmapped as it empties); raising the thresholds and sharing the main
/// arena keeps the memory in the process for reuse.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // glibc's largest mmap threshold on 64-bit targets.
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    const TRIM_THRESHOLD: libc::c_int = 1 << 30;
    // SAFETY: mallopt only changes malloc's tuning parameters; it is called before the
    // demo starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Other allocators are left as they are.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
