//! The kernel as a GPU runs it: the jobs of a call laid out side by side in flat arrays,
//! ranked by one radix sort per chunk of jobs, counted by one prefix sum, and walked
//! pixel by pixel in closed form. The steps are [`Primitives`]; the CUDA backend
//! (`kernel/cuda/`) runs each as a kernel or a CUB call on candle's stream, and
//! [`host`] runs the same steps with plain loops, so that everything around the device
//! code (segment layout, key format, offsets, the closed form, the scatter, the sums) is
//! tested on any machine against the CPU kernel ([`crate::kernel::cpu`]).
//!
//! # Layout
//!
//! Every job (group, class) of a call covers the `L` pixels of its group (`L = S` per
//! image, `B·S` per batch), so a chunk of `K` consecutive jobs is an array of `K·L`
//! elements in which element `e` is pixel `i = e mod L` of job `e / L`
//! ([`element::locate`]). Each element gets a 64-bit key and a value
//! ([`element::key_of`]):
//!
//! - f32: key `job << 32 | error key` ([`Real::error_key`](crate::kernel::Real)), value
//!   `i << 2 | slope << 1 | fg`. One stable sort of the low `32 + bits(K - 1)` key bits
//!   leaves each job's pixels in its own `L` slots, in decreasing error order, ties by
//!   ascending pixel (the CPU kernel's order).
//! - f64: key the 64-bit error key, value `e << 2 | slope << 1 | fg`; a stable sort by
//!   key, then a stable sort by job (`(value >> 2) / L`), give the same order.
//!
//! Void pixels take the largest key of their job and sort last; a job's first
//! `valid` slots (its group's non-void pixels) are its ranking. An exclusive prefix sum
//! of the foreground bits over the chunk, less its value at the job's first slot, is the
//! foreground count before each slot, from which the Jaccard weight follows in closed
//! form ([`JaccardWalk::resume`](crate::kernel::JaccardWalk)), bit for bit the weight the
//! CPU kernel's walk gives. Per block of [`WALK_BLOCK`] slots the offsets and losses are
//! summed in f64, then per job in block order into the group's sums.
//!
//! # Memory
//!
//! Chunks are sized so that their working set (keys, values, both twice for the sort,
//! and the counts: [`element::bytes_per_element`]) stays within [`WORK_FACTOR`] times the
//! input's bytes, and always hold at least one job: a call with one job of `N` pixels
//! (a binary loss) needs 28 bytes per pixel in f32.

pub(crate) mod element;
pub(crate) mod host;

use std::ops::Range;

use candle::{bail, Result};

use crate::kernel::call::Call;
use crate::kernel::plan::Plan;

/// Slots per block of the walk: the unit of its partial sums.
pub(crate) const WALK_BLOCK: usize = 1024;

/// A chunk's working set may take up to this many times the input's bytes.
pub(crate) const WORK_FACTOR: usize = 2;

/// The most elements one chunk may hold (counts and indices are 32-bit on the device).
pub(crate) const MAX_CHUNK_ELEMS: usize = (1 << 31) - 1;

/// The most jobs one chunk may hold (the device sums a chunk's jobs in shared memory).
pub(crate) const MAX_CHUNK_JOBS: usize = 3072;

/// One (group, class) job as the device reads it (`#[repr(C)]`: the CUDA code declares
/// the same struct).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct JobRecord {
    /// The first image of the job's group.
    pub first_image: u32,
    pub class: u32,
    pub channel: u32,
    pub group: u32,
    /// Non-void pixels in the group: the job's first `valid` sorted slots are ranked.
    pub valid: u64,
    /// Foreground pixels in the group.
    pub gts: u64,
    /// The factor on the job's Jaccard weights.
    pub scale: f64,
}

/// Consecutive jobs sorted together.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Chunk {
    pub jobs: Range<usize>,
    /// `jobs.len() · L`.
    pub elems: usize,
    /// Bits of the job index within the chunk: `bits(K - 1)`.
    pub job_bits: u32,
}

impl Chunk {
    /// Blocks of the walk per job: `⌈L / WALK_BLOCK⌉`.
    pub fn blocks_per_job(&self) -> usize {
        (self.elems / self.jobs.len().max(1)).div_ceil(WALK_BLOCK)
    }
}

/// A call's [`Plan`] laid out as the device runs it: one record per job, and the jobs in
/// chunks sorted together.
#[derive(Debug, Clone)]
pub(crate) struct Segments {
    pub plan: Plan,
    /// The input is f64 (two sorts per chunk), else f32.
    pub wide: bool,
    /// `L`: the pixels of a group, the length of every job's segment.
    pub seg_len: usize,
    pub jobs: Vec<JobRecord>,
    pub chunks: Vec<Chunk>,
}

impl Segments {
    /// Lays out `plan` for inputs of f64 (`wide`) or f32.
    pub fn new(plan: Plan, wide: bool) -> Result<Self> {
        let (b_n, c_n, s_n) = plan.call.dims;
        let jobs: Vec<JobRecord> = (plan.jobs.iter())
            .map(|j| JobRecord {
                first_image: plan.groups[j.group].start as u32,
                class: j.class,
                channel: j.channel as u32,
                group: j.group as u32,
                valid: plan.valid[j.group],
                gts: j.gts,
                scale: j.scale,
            })
            .collect();
        let seg_len = plan.group_len();
        let value_bytes = if wide { 8 } else { 4 };
        let budget = WORK_FACTOR * b_n * c_n * s_n * value_bytes;
        let chunks = chunks(
            jobs.len(),
            seg_len,
            element::bytes_per_element(wide),
            budget,
        )?;
        Ok(Self {
            plan,
            wide,
            seg_len,
            jobs,
            chunks,
        })
    }

    /// What the call computes.
    pub fn call(&self) -> &Call {
        &self.plan.call
    }

    /// The number of groups.
    pub fn groups(&self) -> usize {
        self.plan.groups.len()
    }
}

/// Splits `n_jobs` jobs of `seg_len` pixels into chunks of working sets within
/// `budget` bytes at `per_elem` bytes per element, at least one job each.
fn chunks(n_jobs: usize, seg_len: usize, per_elem: usize, budget: usize) -> Result<Vec<Chunk>> {
    if seg_len == 0 {
        return Ok(Vec::new());
    }
    if seg_len > MAX_CHUNK_ELEMS {
        bail!("lovasz kernel: a group of {seg_len} pixels is too large for the device path")
    }
    let by_memory = budget / (seg_len * per_elem);
    // At least one job (a job alone may exceed the budget), at most MAX_CHUNK_JOBS.
    let per_chunk = by_memory
        .min(MAX_CHUNK_ELEMS / seg_len)
        .clamp(1, MAX_CHUNK_JOBS);
    Ok((0..n_jobs)
        .step_by(per_chunk)
        .map(|start| {
            let jobs = start..n_jobs.min(start + per_chunk);
            let k = jobs.len();
            Chunk {
                elems: k * seg_len,
                job_bits: usize::BITS - (k - 1).leading_zeros(),
                jobs,
            }
        })
        .collect())
}

/// The steps of a call on some device, each over the whole input or one chunk, in the
/// order [`run`] calls them. A backend holds the input, the labels and its working memory,
/// and writes the outputs: the per-pixel values (zero where no job writes) and the
/// per-group losses (NaN when an input value is NaN).
pub(crate) trait Primitives {
    /// `p = softmax(x)` over the class axis; every later step reads `p` for `x`.
    fn softmax(&mut self, segs: &Segments) -> Result<()>;
    /// Notes whether any input value is NaN.
    fn scan_nan(&mut self, segs: &Segments) -> Result<()>;
    /// The key and value of each element of `chunk` ([`element::key_of`]).
    fn build_keys(&mut self, segs: &Segments, chunk: &Chunk) -> Result<()>;
    /// Sorts the chunk's elements by key, stably (f32: the low `32 + job_bits` bits; f64:
    /// by error key, then by job).
    fn sort(&mut self, segs: &Segments, chunk: &Chunk) -> Result<()>;
    /// The exclusive prefix sum of the sorted values' foreground bits.
    fn count_foreground(&mut self, segs: &Segments, chunk: &Chunk) -> Result<()>;
    /// Each ranked slot's output written at its pixel ([`element::walk_slot`]), and the
    /// chunk's offsets and losses summed per block, then per job into its group.
    fn walk(&mut self, segs: &Segments, chunk: &Chunk) -> Result<()>;
    /// The softmax Jacobian applied to the coefficients (from logits), and the losses.
    fn finish(&mut self, segs: &Segments) -> Result<()>;
}

/// Runs the call laid out in `segs` on `backend`.
pub(crate) fn run<B: Primitives>(backend: &mut B, segs: &Segments) -> Result<()> {
    if segs.call().from_logits {
        backend.softmax(segs)?;
    }
    backend.scan_nan(segs)?;
    for chunk in &segs.chunks {
        backend.build_keys(segs, chunk)?;
        backend.sort(segs, chunk)?;
        backend.count_foreground(segs, chunk)?;
        backend.walk(segs, chunk)?;
    }
    backend.finish(segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_the_budget_and_hold_one_job_at_least() {
        let c = chunks(10, 100, 28, 28 * 100 * 3).unwrap();
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].jobs, 0..3);
        assert_eq!(c[3].jobs, 9..10);
        assert_eq!((c[0].elems, c[0].job_bits), (300, 2));
        assert_eq!(c[3].job_bits, 0);
        let one = chunks(2, 1000, 28, 10).unwrap();
        assert_eq!(one.iter().map(|c| c.jobs.len()).collect::<Vec<_>>(), [1, 1]);
        assert!(chunks(3, 0, 28, 10).unwrap().is_empty());
        assert_eq!(chunks(5, 7, 28, 1 << 30).unwrap()[0].blocks_per_job(), 1);
    }
}

#[cfg(test)]
mod emulation_tests;
