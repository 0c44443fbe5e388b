//! The kernel on the CPU: the jobs of the call's [`Plan`], one output row per (image, class channel) handed to the job
//! that writes it (channels first whatever the input's layout; transposed at the end for
//! a channels-last input), and the jobs run with rayon, each on a [`job::Workspace`] its
//! task reuses. A job is split over the threads itself when there are fewer jobs than
//! threads.
//!
//! | file | what it holds |
//! |---|---|
//! | [`job`] | one job from its keys to its outputs; the workspaces |
//! | [`build_keys`] | the keys of a job's pixels, void (and hinge errors `<= 0`) left out |
//! | [`prune`] | leaving out the background keys of weight exactly 0 |
//! | [`sort`] | the sort of each float width ([`HostSort`]) |
//! | [`radix`] | the LSD radix sort of `u64` keys on one thread |
//! | [`partition`] | the sort of one large job on all threads, by buckets of key ranges |
//! | [`sorted`] | sorted keys across two buffers, read in pieces |
//! | [`walk`] | the walk over the sorted keys that writes the outputs |
//! | [`global`] | the per-batch loss over the union of a process group's batches |
//! | [`layout`] | the outputs transposed to channels last, for such an input |
//! | [`buffer`] | huge-page buffers, and the working memory kept between calls |

mod buffer;
mod build_keys;
mod global;
mod job;
mod layout;
mod partition;
mod prune;
mod radix;
mod sort;
mod sorted;
mod walk;

use candle::{bail, Result};
use rayon::prelude::*;

pub use buffer::{cached_buffer_bytes, release_cached_buffers, CACHE_MAX_BYTES};
pub(crate) use global::{plan_global, solve_global};
pub(crate) use sort::HostSort;

use crate::kernel::call::{Call, ChannelOrder, Solved};
use crate::kernel::plan::Plan;
use buffer::zeroed;
use job::{run_job, Workspace};
use walk::JobSums;

/// The host slices of a call: its input `[B, C, S]` (or `[B, S, C]`) and labels `[B, S]`.
pub(crate) struct Slices<'a, T> {
    pub call: &'a Call,
    pub data: &'a [T],
    /// Labels with void pixels set to [`VOID`](crate::input::VOID).
    pub labels: &'a [u32],
}

/// Runs the jobs of `plan` over `data` and `labels`: the weights (or linear coefficients)
/// of every pixel, and the per-group offsets and losses.
pub(crate) fn solve<T: HostSort>(plan: &Plan, data: &[T], labels: &[u32]) -> Result<Solved<T>> {
    let (b_n, c_n, s_n) = plan.call.dims;
    if data.len() != b_n * c_n * s_n || labels.len() != b_n * s_n {
        bail!("lovasz kernel: inconsistent sizes (internal error)")
    }
    let p = &Slices {
        call: &plan.call,
        data,
        labels,
    };
    let (groups, jobs) = (&plan.groups, &plan.jobs);
    let mut values = zeroed::<T>(b_n * c_n * s_n);
    let mut chunks: Vec<Option<&mut [T]>> = values.chunks_mut(s_n).map(Some).collect();
    let mut work = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut outs = Vec::with_capacity(groups[job.group].len());
        for b in groups[job.group].clone() {
            match chunks[b * c_n + job.channel].take() {
                Some(chunk) => outs.push(chunk),
                None => bail!("lovasz kernel: two jobs share a channel (internal error)"),
            }
        }
        work.push((job, outs));
    }
    let unread_rows: Vec<usize> = (chunks.iter().enumerate())
        .filter(|(_, c)| c.is_some())
        .map(|(r, _)| r)
        .collect();
    drop(chunks);
    let threads = rayon::current_num_threads();
    let parallel = jobs.len() < threads;
    // About two tasks per thread: each reuses one workspace for all its jobs.
    let per_task = jobs.len().div_ceil(2 * threads).max(1);
    let parts: Vec<(usize, JobSums, bool)> = work
        .into_par_iter()
        .with_min_len(per_task)
        .map_init(
            || Workspace::new(parallel),
            |ws, (job, mut outs)| {
                let images = groups[job.group].clone();
                let (sums, nan) = run_job(p, images, job, &mut outs, parallel, ws);
                (job.group, sums, nan)
            },
        )
        .collect();
    let mut offsets = vec![0.0; groups.len()];
    let mut losses = vec![0.0; groups.len()];
    let mut nan = false;
    for (g, sums, job_nan) in parts {
        offsets[g] += sums.offset;
        losses[g] += sums.loss;
        nan |= job_nan;
    }
    let values = match plan.call.order {
        ChannelOrder::First => values,
        ChannelOrder::Last => layout::to_channels_last(&values, (b_n, c_n, s_n)),
    };
    Ok(Solved {
        values,
        offsets,
        losses,
        nan,
        unread_rows,
    })
}
