//! The working memory the Lovász kernel keeps between calls, and how to see and free it.
//!
//! The kernel frees its working memory when a call returns, except when one (group,
//! class) job is split over all threads: the binary losses per batch, or any loss with
//! fewer jobs than rayon threads. Such a job's two sort-key buffers (16 bytes per pixel of
//! the group for f32 inputs) are kept for the next call, up to [`CACHE_MAX_BYTES`] in all:
//! a training loop calls the loss with the same shapes at every step, and fresh memory
//! costs its page faults and the kernel's zeroing every time (about 1 ms of 10 for the
//! hinge at 10×300×300). This module is public so that a process can account for that
//! memory ([`cached_buffer_bytes`], as the repository's bench does when it measures the
//! loss's peak) and give it back when it stops calling the losses
//! ([`release_cached_buffers`]).
//!
//! The coefficients the op keeps are as large as its input, and candle's backward pass
//! writes a gradient sum of that size too. On Linux, glibc maps every block above 32 MiB
//! freshly and unmaps it when freed, so a training loop pays for faulting in and zeroing
//! those pages at every step (10–15 % of a 10×20×300×300 call's time on a 2-core VM).
//! A training binary can tell glibc to keep freed memory for the next step, with
//! `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647` or the
//! matching `mallopt` calls at start-up; this crate leaves its host's allocator alone.

pub use crate::kernel::{cached_buffer_bytes, release_cached_buffers, CACHE_MAX_BYTES};
