//! One (group, class) job from its pixels to its outputs: build the keys, leave out the
//! zero-weight ones when that pays, sort, and walk; split over all threads when the call
//! has fewer jobs than threads. And the working memory a rayon task reuses over its jobs.

use std::ops::Range;

use rayon::prelude::*;

use super::buffer::{give_cached, take_cached, working};
use super::build_keys::build_keys;
use super::prune::{foreground_floor, prune_zero_weight, worth_pruning};
use super::sort::HostSort;
use super::sorted::{SortedKeys, PIECE};
use super::walk::{walk_job, JobSums};
use super::Slices;
use crate::kernel::keys::index_shift;
use crate::kernel::plan::Job;

/// Working memory reused by the jobs one rayon task runs, so that large buffers are
/// allocated (and page-faulted) once per task rather than once per job.
///
/// It comes from the buffers kept between calls ([`take_cached`]) when
/// there are any, and goes back to them when `keep`: the kernel keeps it when one job is
/// split over all threads, where these two buffers are the whole working set and their
/// page faults are on the critical path. With many jobs, each task's buffers serve several
/// jobs already.
pub(crate) struct Workspace<T: HostSort> {
    keys: Vec<T::Packed>,
    scratch: Vec<T::Packed>,
    keep: bool,
}

impl<T: HostSort> Workspace<T> {
    pub fn new(keep: bool) -> Self {
        Self {
            keys: take_cached(),
            scratch: take_cached(),
            keep,
        }
    }
}

impl<T: HostSort> Drop for Workspace<T> {
    fn drop(&mut self) {
        if self.keep {
            give_cached(std::mem::take(&mut self.keys));
            give_cached(std::mem::take(&mut self.scratch));
        }
    }
}

/// One (group, class) job: rank the errors, walk the Jaccard gradient, write the outputs.
/// With `parallel`, the job itself is split over the rayon threads. Also returns whether
/// an input value the job read was NaN.
pub(crate) fn run_job<T: HostSort>(
    p: &Slices<T>,
    images: Range<usize>,
    job: &Job,
    outs: &mut [&mut [T]],
    parallel: bool,
    ws: &mut Workspace<T>,
) -> (JobSums, bool) {
    let s_n = p.call.dims.2;
    let n = images.len() * s_n;
    let keys = &mut ws.keys;
    // The sorted keys' runs in `keys` or `ws.scratch`, and, when the walk is split over
    // threads, the foreground keys per piece.
    let (runs, fg_per_piece);
    let build = |pixels: Range<usize>, out: &mut [T::Packed]| {
        build_keys(p, images.start, pixels, job.class, job.channel, out)
    };
    let nan = if parallel && n >= 2 * PIECE {
        // Pieces are built on all threads into their own stretches of one buffer, which
        // the sort then uses as its working memory.
        let pieces = &mut ws.scratch;
        working(pieces, n);
        let built: Vec<(usize, bool, Vec<u32>)> = pieces
            .par_chunks_mut(PIECE)
            .enumerate()
            .map(|(i, out)| {
                let (len, nan) = build(i * PIECE..n.min((i + 1) * PIECE), out);
                (len, nan, T::piece_summary(&out[..len]))
            })
            .collect();
        let nan = built.iter().any(|b| b.1);
        let floor = (!nan && worth_pruning(p, images.clone(), job))
            .then(|| {
                let parts: Vec<&[T::Packed]> = (pieces.chunks(PIECE).zip(&built))
                    .map(|(piece, b)| &piece[..b.0])
                    .collect();
                foreground_floor::<T>(&parts, job.gts)
            })
            .flatten();
        let (lens, summaries): (Vec<usize>, Vec<Vec<u32>>) = match floor {
            // Pruned pieces are summed up again (a pass that only pruning pays for).
            Some(min_fg) => pieces
                .par_chunks_mut(PIECE)
                .zip(&built)
                .map(|(out, b)| {
                    let len = prune_zero_weight(&mut out[..b.0], min_fg);
                    (len, T::piece_summary(&out[..len]))
                })
                .unzip(),
            None => built.into_iter().map(|(len, _, s)| (len, s)).unzip(),
        };
        let sorted = T::par_sort(pieces, PIECE, &lens, &summaries, keys);
        runs = sorted.runs;
        fg_per_piece = Some(sorted.flagged);
        nan
    } else {
        working(keys, n);
        let (mut len, nan) = build(0..n, keys);
        if !nan && worth_pruning(p, images.clone(), job) {
            if let Some(min_fg) = foreground_floor::<T>(&[&keys[..len]], job.gts) {
                len = prune_zero_weight(&mut keys[..len], min_fg);
            }
        }
        keys.truncate(len);
        T::sort(keys, &mut ws.scratch);
        runs = vec![(keys.len(), false)];
        fg_per_piece = None;
        nan
    };
    if keys.is_empty() {
        return (JobSums::default(), nan);
    }
    let keys = SortedKeys {
        main: &ws.keys,
        spare: &ws.scratch,
        runs: &runs,
    };
    // Everything the outputs need is in the keys, so one walk writes them, in place.
    let shift = index_shift(s_n);
    // A class among many (or a background among many foregrounds) gives predictable
    // branches; a binary loss gives a ground truth close to random in sorted order.
    let (n, gts) = (keys.len() as u64, job.gts);
    let mixed = gts.min(n.saturating_sub(gts)) * 8 > n;
    let fg = fg_per_piece.as_deref().filter(|_| keys.len() >= 2 * PIECE);
    let sums = if mixed {
        walk_job::<T, true>(p, &keys, outs, shift, job, fg)
    } else {
        walk_job::<T, false>(p, &keys, outs, shift, job, fg)
    };
    (sums, nan)
}
