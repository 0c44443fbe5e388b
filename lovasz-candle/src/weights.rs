//! The kernel that builds the Lovász weights on the host.
//!
//! For one group of pixels (an image, or the whole batch) and one class, the Lovász
//! extension of the Jaccard loss is `Σ_k e_π(k) g_k` with `π` sorting the errors in
//! decreasing order and `g` the Jaccard gradient of the sorted ground truth (Berman et al.,
//! CVPR 2018, Eq. 9 and Alg. 1). The reference holds `g` constant, so the loss is linear
//! in the errors with one weight per pixel and class; every class mean, class weight and
//! image mean folds into that weight.
//!
//! Each error is itself affine in the input where it is differentiable
//! (`|fg - p| = s (fg - p)` with `s = ±1`; a positive hinge error is `1 - x t`), so the
//! kernel can also return, instead of the weights `W`, coefficients `A` and one offset `K`
//! per group with `Σ W ⊙ errors = K + Σ A ⊙ input`: the loss is then a single multiply and
//! sum on the device, and its gradient is `A`.
//!
//! Work is split into one job per (group, class), run in parallel with rayon; each job
//! sorts packed (error key, pixel index) integers and walks them once with exact counts.
//! With fewer jobs than threads, each job is itself split: its keys are built in pieces,
//! sorted by a parallel partition ([`crate::radix::par_sort_pieces`]) and walked in
//! pieces that resume from the counts before them, with the same results bit for bit.
//! The sort counts each piece's foreground keys while its buckets are in cache, and
//! leaves each bucket in whichever of its two buffers its passes ended in: the walk reads
//! both, so no pass over the whole job is spent on either.
//!
//! Background pixels whose error is below every foreground error of the group come after
//! the last foreground pixel in sorted order, where the weight is exactly 0: when there
//! are enough of them ([`worth_pruning`]), they are left out of the sort and the walk.

use std::ops::Range;

use candle::{bail, Result};
use rayon::prelude::*;

use crate::input::VOID;
use crate::jaccard::JaccardWalk;

/// How a pixel's error is formed from its input value `x` and whether it is foreground.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// `|fg - x|` with `x` a probability (Lovász-Softmax and Lovász-Sigmoid).
    Abs,
    /// `relu(1 - x t)` with `x` a logit and `t = ±1` (Lovász hinge); sorted unclamped.
    Hinge,
}

/// What the kernel writes per pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// Coefficients `A` with `loss = K + Σ A ⊙ x` (see the module docs).
    Linear,
    /// The weights `W` themselves: `loss = Σ W ⊙ errors`.
    Weights,
}

/// One class of the loss: its label value, the input channel holding its scores, and its
/// weight in the class mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ClassEntry {
    pub class: u32,
    pub channel: usize,
    pub weight: f64,
}

/// The classes averaged over in each group.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Selection {
    pub entries: Vec<ClassEntry>,
    /// Skip, per group, the classes without a non-void ground-truth pixel.
    pub only_present: bool,
}

/// A loss to weigh: inputs `[B, C, S]` and labels `[B, S]` as host slices.
pub(crate) struct Problem<'a, T> {
    pub data: &'a [T],
    /// Labels with void pixels set to [`VOID`].
    pub labels: &'a [u32],
    pub batch: usize,
    pub channels: usize,
    pub spatial: usize,
    pub per_image: bool,
    pub kind: ErrorKind,
    pub output: Output,
    /// A factor applied to every group (e.g. `1 / B` for a mean over images).
    pub group_scale: f64,
}

impl<T> Problem<'_, T> {
    /// Whether keys with errors `<= 0` are left out: a hinge error `<= 0` has relu weight
    /// 0 and sorts after every positive one, so it changes no other pixel's rank; in
    /// linear mode such pixels are left out (their coefficient stays 0). The weights `W`
    /// need every pixel.
    fn drops_nonpositive(&self) -> bool {
        self.kind == ErrorKind::Hinge && self.output == Output::Linear
    }
}

/// The kernel's result: per-pixel values `[B, C, S]` (zero where no class job wrote), and
/// per group the offset `K` and the loss `Σ W ⊙ errors` in f64 (both zero in
/// [`Output::Weights`] mode).
pub(crate) struct Solved<T> {
    pub values: Vec<T>,
    pub offsets: Vec<f64>,
    pub losses: Vec<f64>,
    /// Whether an input value the jobs read was NaN.
    pub nan: bool,
    /// The rows `b * C + c` of the input that no job read (channels of classes not
    /// counted in a group): a NaN there is not seen by `nan`.
    pub unread_rows: Vec<usize>,
}

/// A float dtype whose errors can be ranked as packed integers.
pub(crate) trait Real: candle::WithDType + PartialOrd + crate::buffer::ZeroBits {
    /// (descending error key, pixel index, slope bit, foreground bit) packed so that
    /// ascending integer order is descending error order, ties by ascending index.
    type Packed: Ord + crate::buffer::Cached + Sync;
    fn pack(err: Self, index: u32, slope: bool, fg: bool) -> Self::Packed;
    /// The pixel index (`< 2^30`), the slope bit and the foreground bit.
    fn unpack(p: Self::Packed) -> (usize, bool, bool);
    /// The error a key was made from.
    fn error(p: Self::Packed) -> Self;
    /// [`Real::error`] for a key whose error has its sign bit clear (an absolute value,
    /// NaN included): the same bits, with no select on the sign.
    fn unsigned_error(p: Self::Packed) -> Self;
    /// How many of `keys` are foreground keys, and the largest of those (the smallest
    /// foreground error; meaningless when there are none).
    fn foreground_floor(keys: &[Self::Packed]) -> (u64, Self::Packed);
    fn exp(self) -> Self;
    /// `1` if `b`, else `0`, without a branch.
    fn indicator(b: bool) -> Self;
    /// `-self` if `b`, else `self`, without a branch (the sign bit flipped).
    fn neg_if(self, b: bool) -> Self;
    /// `|self|` (the sign bit cleared).
    fn abs(self) -> Self;
    fn is_nan(self) -> bool;
    /// Sorts ascending; `scratch` is working memory (the vectors may be swapped).
    fn sort(keys: &mut Vec<Self::Packed>, scratch: &mut Vec<Self::Packed>);
    /// What [`Real::par_sort`] needs to know of one piece of keys, taken while the piece
    /// is hot in cache: its histogram over [`crate::radix::bin_of`] for f32.
    fn piece_summary(piece: &[Self::Packed]) -> Vec<u32>;
    /// Sorts, on all rayon threads, the keys of the pieces of `pieces`: piece `i` is the
    /// first `lens[i]` keys of its stretch `i * stride ..` of the buffer, summed up in
    /// `summaries[i]` by [`Real::piece_summary`]. The sorted keys are left in `out` and
    /// `pieces` as the returned runs say, with the foreground keys per [`PIECE`] sorted
    /// positions.
    fn par_sort(
        pieces: &mut Vec<Self::Packed>,
        stride: usize,
        lens: &[usize],
        summaries: &[Vec<u32>],
        out: &mut Vec<Self::Packed>,
    ) -> crate::radix::Sorted;
}

/// The low word of a packed key: index, slope bit, foreground bit.
#[inline]
fn low_word(index: u32, slope: bool, fg: bool) -> u32 {
    index << 2 | u32::from(slope) << 1 | u32::from(fg)
}

#[inline]
fn split_low_word(w: u32) -> (usize, bool, bool) {
    ((w >> 2) as usize, w & 2 != 0, w & 1 != 0)
}

/// The methods of [`Real`] that are the same for f32 and f64 up to the width of their
/// bits: `(float, bits of the same width, bits of 1.0)`.
macro_rules! float_bit_ops {
    ($t:ty, $bits:ty, $one:expr) => {
        fn exp(self) -> $t {
            <$t>::exp(self)
        }
        #[inline]
        fn indicator(b: bool) -> $t {
            <$t>::from_bits(<$bits>::from(b) * $one)
        }
        #[inline]
        fn neg_if(self, b: bool) -> $t {
            <$t>::from_bits(self.to_bits() ^ <$bits>::from(b) << (<$bits>::BITS - 1))
        }
        #[inline]
        fn abs(self) -> $t {
            <$t>::abs(self)
        }
        #[inline]
        fn is_nan(self) -> bool {
            <$t>::is_nan(self)
        }
    };
}

/// The key methods of [`Real`] for a float whose bits are `$bits`, packed with the low word
/// into `$packed` (twice as wide): the error's bits in the high half, the low word of
/// [`low_word`] in the bottom 32 bits.
macro_rules! packed_key_ops {
    ($t:ty, $bits:ty, $packed:ty) => {
        #[inline]
        fn pack(err: $t, index: u32, slope: bool, fg: bool) -> $packed {
            const TOP: u32 = <$bits>::BITS - 1;
            let bits = err.to_bits();
            // Total order of IEEE floats as unsigned integers, then reversed.
            let ascending = if bits >> TOP == 1 {
                !bits
            } else {
                bits | 1 << TOP
            };
            (<$packed>::from(!ascending) << <$bits>::BITS)
                | <$packed>::from(low_word(index, slope, fg))
        }
        #[inline]
        fn unpack(p: $packed) -> (usize, bool, bool) {
            split_low_word(p as u32)
        }
        #[inline]
        fn error(p: $packed) -> $t {
            const TOP: u32 = <$bits>::BITS - 1;
            let ascending = !((p >> <$bits>::BITS) as $bits);
            <$t>::from_bits(if ascending >> TOP == 1 {
                ascending & !(1 << TOP)
            } else {
                !ascending
            })
        }
        fn foreground_floor(keys: &[$packed]) -> (u64, $packed) {
            // Branch-free over the high words (a background key counts as 0), which the
            // compiler can vectorise.
            let (mut count, mut top) = (0u64, 0 as $bits);
            for &k in keys {
                let fg = (k as $bits) & 1;
                count += fg as u64;
                let high = ((k >> <$bits>::BITS) as $bits) & fg.wrapping_neg();
                top = if high > top { high } else { top };
            }
            (count, <$packed>::from(top) << <$bits>::BITS)
        }
        #[inline]
        fn unsigned_error(p: $packed) -> $t {
            <$t>::from_bits(!((p >> <$bits>::BITS) as $bits) & !(1 << (<$bits>::BITS - 1)))
        }
    };
}

impl Real for f32 {
    type Packed = u64;
    float_bit_ops!(f32, u32, 0x3f80_0000);
    packed_key_ops!(f32, u32, u64);
    fn sort(keys: &mut Vec<u64>, scratch: &mut Vec<u64>) {
        crate::radix::sort_by_high_word(keys, scratch);
    }
    fn piece_summary(piece: &[u64]) -> Vec<u32> {
        crate::radix::bin_histogram(piece)
    }
    fn par_sort(
        pieces: &mut Vec<u64>,
        stride: usize,
        lens: &[usize],
        summaries: &[Vec<u32>],
        out: &mut Vec<u64>,
    ) -> crate::radix::Sorted {
        crate::radix::par_sort_pieces(pieces, stride, lens, summaries, out, PIECE)
    }
}

impl Real for f64 {
    type Packed = u128;
    float_bit_ops!(f64, u64, 0x3ff0_0000_0000_0000);
    packed_key_ops!(f64, u64, u128);
    fn sort(keys: &mut Vec<u128>, _scratch: &mut Vec<u128>) {
        keys.sort_unstable();
    }
    fn piece_summary(_piece: &[u128]) -> Vec<u32> {
        Vec::new()
    }
    fn par_sort(
        pieces: &mut Vec<u128>,
        stride: usize,
        lens: &[usize],
        _summaries: &[Vec<u32>],
        out: &mut Vec<u128>,
    ) -> crate::radix::Sorted {
        out.clear();
        out.reserve(lens.iter().sum());
        for (piece, &len) in pieces.chunks(stride).zip(lens) {
            out.extend_from_slice(&piece[..len]);
        }
        out.par_sort_unstable();
        crate::radix::Sorted {
            runs: vec![(out.len(), false)],
            flagged: (out.par_chunks(PIECE))
                .map(|c| c.iter().filter(|&&k| f64::unpack(k).2).count() as u64)
                .collect(),
        }
    }
}

impl ErrorKind {
    /// The error of input `x` and the slope bit: for `Abs`, whether `target - x >= 0`
    /// (the error is `target - x`, else `x - target`); for `Hinge`, whether the error is
    /// positive (else relu clamps it to 0).
    #[inline]
    fn error<T: Real>(self, x: T, fg: bool) -> (T, bool) {
        // Sign flips and bit tricks rather than branches on a label that is close to
        // random in pixel order; the results are the same bits as `1 - x`, `x`, `1 + x`.
        match self {
            ErrorKind::Abs => {
                let d = T::indicator(fg) - x;
                (d.abs(), d >= T::zero())
            }
            ErrorKind::Hinge => {
                let e = T::from_f64(1.0) + x.neg_if(fg);
                (e, e > T::zero())
            }
        }
    }

    /// For weight `w` of a pixel with error `err` (clamped by the caller's key), slope bit
    /// and ground truth: `(w a, w k, w e)` with `e = k + a x` the clamped error near `x`.
    ///
    /// With `MIXED` (the walk's ground truth close to random, as in a binary loss), by
    /// sign flips and products with 0 / 1 rather than branches on the slope and
    /// ground-truth bits; the results are the same.
    #[inline(always)]
    fn linear<const MIXED: bool>(self, w: f64, err: f64, slope: bool, fg: bool) -> (f64, f64, f64) {
        if MIXED {
            let target = f64::indicator(fg);
            return match self {
                // slope: e = t - x, else e = x - t.
                ErrorKind::Abs => {
                    let a = w.neg_if(slope);
                    (a, -a * target, w * err)
                }
                // slope: e = 1 - x t = 1 + x (-t), else the clamped error is 0 (+0.0 in all
                // three, whatever `err` is, as the branched form gives).
                ErrorKind::Hinge => {
                    let mask = 0u64.wrapping_sub(u64::from(slope));
                    let on = |v: f64| f64::from_bits(v.to_bits() & mask);
                    (on(w.neg_if(fg)), on(w), on(w * err))
                }
            };
        }
        let target = if fg { 1.0 } else { 0.0 };
        match (self, slope) {
            (ErrorKind::Abs, true) => (-w, w * target, w * err),
            (ErrorKind::Abs, false) => (w, -w * target, w * err),
            (ErrorKind::Hinge, true) => (if fg { -w } else { w }, w, w * err),
            (ErrorKind::Hinge, false) => (0.0, 0.0, 0.0),
        }
    }
}

struct Job {
    group: usize,
    class: u32,
    channel: usize,
    gts: u64,
    scale: f64,
}

/// Builds the weights (or linear coefficients) of the loss described by `p` and `sel`.
pub(crate) fn solve<T: Real>(p: &Problem<T>, sel: &Selection) -> Result<Solved<T>> {
    let (b_n, c_n, s_n) = (p.batch, p.channels, p.spatial);
    if p.data.len() != b_n * c_n * s_n || p.labels.len() != b_n * s_n {
        bail!("lovasz kernel: inconsistent sizes (internal error)")
    }
    let groups: Vec<Range<usize>> = if p.per_image {
        (0..b_n).map(|b| b..b + 1).collect()
    } else {
        std::iter::once(0..b_n).collect()
    };
    if let Some(g) = groups.first() {
        // Keys hold (image in group, pixel) as `image << shift | pixel` in 30 bits.
        let last = (g.len().saturating_sub(1) << index_shift(s_n)) | s_n.saturating_sub(1);
        if last >= 1 << 30 {
            bail!(
                "lovasz kernel: a group of {} images of {s_n} pixels exceeds the 2^30 pixel indices one sort can hold; use per_image or smaller batches",
                g.len()
            )
        }
    }

    // Merge repeated classes (a listed class counted twice weighs twice).
    let mut entries: Vec<ClassEntry> = Vec::new();
    for e in &sel.entries {
        if e.channel >= c_n {
            bail!(
                "lovasz kernel: channel {} out of range (internal error)",
                e.channel
            )
        }
        match entries.iter_mut().find(|m| m.class == e.class) {
            Some(m) => m.weight += e.weight,
            None => entries.push(*e),
        }
    }
    let max_class = entries.iter().map(|e| e.class as usize).max().unwrap_or(0);

    let all_counts: Vec<Vec<u64>> = groups
        .par_iter()
        .map(|g| count_labels(&p.labels[g.start * s_n..g.end * s_n], max_class + 1))
        .collect();
    let mut jobs = Vec::new();
    for (gi, counts) in all_counts.iter().enumerate() {
        let counted: Vec<&ClassEntry> = entries
            .iter()
            .filter(|e| !sel.only_present || counts[e.class as usize] > 0)
            .collect();
        let denom: f64 = counted.iter().map(|e| e.weight).sum();
        if denom <= 0.0 {
            continue;
        }
        for e in counted {
            if e.weight == 0.0 {
                continue;
            }
            jobs.push(Job {
                group: gi,
                class: e.class,
                channel: e.channel,
                gts: counts[e.class as usize],
                scale: e.weight / denom * p.group_scale,
            });
        }
    }

    let mut values = crate::buffer::zeroed::<T>(b_n * c_n * s_n);
    let mut chunks: Vec<Option<&mut [T]>> = values.chunks_mut(s_n).map(Some).collect();
    let mut work = Vec::with_capacity(jobs.len());
    for job in &jobs {
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
    Ok(Solved {
        values,
        offsets,
        losses,
        nan,
        unread_rows,
    })
}

/// How many of `labels` hold each value below `n_values` (void and larger values are not
/// counted), on all threads.
fn count_labels(labels: &[u32], n_values: usize) -> Vec<u64> {
    let count = |chunk: &[u32]| {
        // Four tallies taken in turn: a run of equal labels (most of a segmentation map)
        // would otherwise wait on each increment of one counter before the next.
        let mut tallies = vec![vec![0u64; n_values]; 4];
        let quads = chunk.chunks_exact(4);
        let rest = quads.remainder();
        for quad in quads {
            for (tally, &l) in tallies.iter_mut().zip(quad) {
                if let Some(c) = tally.get_mut(l as usize) {
                    *c += 1;
                }
            }
        }
        for &l in rest {
            if let Some(c) = tallies[0].get_mut(l as usize) {
                *c += 1;
            }
        }
        let mut counts = vec![0u64; n_values];
        for tally in &tallies {
            for (c, t) in counts.iter_mut().zip(tally) {
                *c += t;
            }
        }
        counts
    };
    labels.par_chunks(1 << 16).map(count).reduce(
        || vec![0u64; n_values],
        |mut a, b| {
            for (x, y) in a.iter_mut().zip(&b) {
                *x += y;
            }
            a
        },
    )
}

/// A job's share of its group's offset `K` and loss.
#[derive(Default)]
struct JobSums {
    offset: f64,
    loss: f64,
}

/// Working memory reused by the jobs one rayon task runs, so that large buffers are
/// allocated (and page-faulted) once per task rather than once per job.
///
/// It comes from the buffers kept between calls ([`crate::buffer::take_cached`]) when
/// there are any, and goes back to them when `keep`: the kernel keeps it when one job is
/// split over all threads, where these two buffers are the whole working set and their
/// page faults are on the critical path. With many jobs, each task's buffers serve several
/// jobs already.
struct Workspace<T: Real> {
    keys: Vec<T::Packed>,
    scratch: Vec<T::Packed>,
    keep: bool,
}

impl<T: Real> Workspace<T> {
    fn new(keep: bool) -> Self {
        Self {
            keys: crate::buffer::take_cached(),
            scratch: crate::buffer::take_cached(),
            keep,
        }
    }
}

impl<T: Real> Drop for Workspace<T> {
    fn drop(&mut self) {
        if self.keep {
            crate::buffer::give_cached(std::mem::take(&mut self.keys));
            crate::buffer::give_cached(std::mem::take(&mut self.scratch));
        }
    }
}

/// Keys per piece when one job is split over threads (key building and the walk). The
/// walk sums its loss per piece in both modes, so results do not depend on the mode.
const PIECE: usize = 1 << 16;

/// One (group, class) job: rank the errors, walk the Jaccard gradient, write the outputs.
/// With `parallel`, the job itself is split over the rayon threads. Also returns whether
/// an input value the job read was NaN.
fn run_job<T: Real>(
    p: &Problem<T>,
    images: Range<usize>,
    job: &Job,
    outs: &mut [&mut [T]],
    parallel: bool,
    ws: &mut Workspace<T>,
) -> (JobSums, bool) {
    let s_n = p.spatial;
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
        crate::buffer::working(pieces, n);
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
        crate::buffer::working(keys, n);
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

/// A job's sorted keys: consecutive runs `(length, in spare)` of the sorted sequence,
/// each in `main` or at the same positions in `spare` (where a parallel sort left it).
struct SortedKeys<'a, P> {
    main: &'a [P],
    spare: &'a [P],
    runs: &'a [(usize, bool)],
}

impl<'a, P> SortedKeys<'a, P> {
    fn len(&self) -> usize {
        self.runs.iter().map(|r| r.0).sum()
    }

    /// How many [`PIECE`]s of sorted positions the keys fill.
    fn pieces(&self) -> usize {
        self.len().div_ceil(PIECE)
    }

    /// The keys of piece `i` (sorted positions `i * PIECE ..`), in order, as slices of the
    /// two buffers.
    fn piece(&self, i: usize) -> Vec<&'a [P]> {
        self.slices(i * PIECE..self.len().min((i + 1) * PIECE))
    }

    /// The keys at sorted positions `range`, in order, as slices of the two buffers.
    fn slices(&self, range: Range<usize>) -> Vec<&'a [P]> {
        let mut slices = Vec::new();
        let mut start = 0;
        for &(len, in_spare) in self.runs {
            let (lo, hi) = (start.max(range.start), (start + len).min(range.end));
            if lo < hi {
                slices.push(&(if in_spare { self.spare } else { self.main })[lo..hi]);
            }
            start += len;
        }
        slices
    }
}

/// The walk of one job's sorted keys, with the outputs of its problem (`MIXED` and
/// `fg_per_piece`: see [`walk`]).
fn walk_job<T: Real, const MIXED: bool>(
    p: &Problem<T>,
    keys: &SortedKeys<T::Packed>,
    outs: &mut [&mut [T]],
    shift: u32,
    job: &Job,
    fg_per_piece: Option<&[u64]>,
) -> JobSums {
    let (gts, scale) = (job.gts, job.scale);
    match (p.output, p.kind) {
        (Output::Weights, _) => {
            walk::<T, _, MIXED>(keys, outs, shift, gts, scale, fg_per_piece, |w, _| {
                (w, 0.0, 0.0)
            })
        }
        (Output::Linear, ErrorKind::Abs) => {
            walk::<T, _, MIXED>(keys, outs, shift, gts, scale, fg_per_piece, |w, key| {
                let (_, slope, fg) = T::unpack(key);
                // An absolute difference: its sign bit is clear.
                ErrorKind::Abs.linear::<MIXED>(w, T::unsigned_error(key).to_f64(), slope, fg)
            })
        }
        (Output::Linear, ErrorKind::Hinge) => {
            walk::<T, _, MIXED>(keys, outs, shift, gts, scale, fg_per_piece, |w, key| {
                let (_, slope, fg) = T::unpack(key);
                ErrorKind::Hinge.linear::<MIXED>(w, T::error(key).to_f64(), slope, fg)
            })
        }
    }
}

/// Bits of a key's pixel index that hold the pixel within its image: enough for
/// `spatial - 1`. The image within the group is in the bits above.
fn index_shift(spatial: usize) -> u32 {
    usize::BITS - spatial.saturating_sub(1).leading_zeros()
}

/// Writes the keys of the group-local pixels `pixels` (pixel `i` of the group is pixel
/// `i % S` of image `first_image + i / S`) for one class, in pixel order, at the start
/// of `out` (at least as long as `pixels`); returns how many were kept, and whether an
/// input value read was NaN (void pixels included).
fn build_keys<T: Real>(
    p: &Problem<T>,
    first_image: usize,
    pixels: Range<usize>,
    class: u32,
    channel: usize,
    out: &mut [T::Packed],
) -> (usize, bool) {
    let s_n = p.spatial;
    let drop_nonpositive = p.drops_nonpositive();
    let mut at = pixels.start;
    let (mut kept, mut nan) = (0, false);
    while at < pixels.end {
        let (li, i0) = (at / s_n, at % s_n);
        let i1 = s_n.min(i0 + pixels.end - at);
        let b = first_image + li;
        let x = &p.data[(b * p.channels + channel) * s_n..][i0..i1];
        let labels = &p.labels[b * s_n..][i0..i1];
        let base = (li << index_shift(s_n) | i0) as u32;
        let out = &mut out[kept..];
        let (k, n) = match p.kind {
            ErrorKind::Abs => push_keys(out, x, labels, class, base, false, |x, fg| {
                ErrorKind::Abs.error(x, fg)
            }),
            ErrorKind::Hinge => {
                push_keys(out, x, labels, class, base, drop_nonpositive, |x, fg| {
                    ErrorKind::Hinge.error(x, fg)
                })
            }
        };
        kept += k;
        nan |= n;
        at += i1 - i0;
    }
    (kept, nan)
}

/// Appends the packed keys of one image's row `x` (labels `labels`, pixel indices from
/// `base`), skipping void pixels and, if `drop_nonpositive`, errors `<= 0`. `error` is
/// [`ErrorKind::error`] for one fixed kind, so the loop has no dispatch in it.
#[inline(always)]
fn push_keys<T: Real>(
    out: &mut [T::Packed],
    x: &[T],
    labels: &[u32],
    class: u32,
    base: u32,
    drop_nonpositive: bool,
    error: impl Fn(T, bool) -> (T, bool),
) -> (usize, bool) {
    let out = &mut out[..x.len()];
    // An error is NaN exactly when its input is: the NaN scan of the input rides along.
    // A plain map the compiler can keep branch-free, counting the keys to drop.
    let (mut nan, mut dropped) = (false, 0usize);
    for (o, (i, (&x, &l))) in out.iter_mut().zip(x.iter().zip(labels).enumerate()) {
        let fg = l == class;
        let (err, slope) = error(x, fg);
        *o = T::pack(err, base + i as u32, slope, fg);
        nan |= err.is_nan();
        dropped += usize::from(is_dropped(drop_nonpositive, l, err));
    }
    if dropped == 0 {
        return (x.len(), nan);
    }
    // Then the kept keys move to the front, in order (their errors read back from the
    // keys, which hold their bits exactly).
    let end = keep_in_order::<T>(out, |i, key| {
        !is_dropped(drop_nonpositive, labels[i], T::error(key))
    });
    (end, nan)
}

/// Whether a pixel with label `label` and error `err` gets no key: void, or (with
/// `drop_nonpositive`, see [`Problem::drops_nonpositive`]) an error `<= 0`. That is false
/// for a NaN error, which reaches the walk like any other. Without a branch.
#[inline(always)]
fn is_dropped<T: Real>(drop_nonpositive: bool, label: u32, err: T) -> bool {
    (label == VOID) | (drop_nonpositive & (err <= T::zero()))
}

/// Moves the keys for which `keep(position, key)` holds to the front of `keys`, in order,
/// and returns how many there are. Every key is copied and the end moves past it only if
/// it is kept: no branch on `keep`.
#[inline(always)]
fn keep_in_order<T: Real>(
    keys: &mut [T::Packed],
    keep: impl Fn(usize, T::Packed) -> bool,
) -> usize {
    let mut end = 0;
    for i in 0..keys.len() {
        let key = keys[i];
        keys[end] = key;
        end += usize::from(keep(i, key));
    }
    end
}

/// Leaves out, in place and in order, the background keys whose error is below
/// `min_fg` (every foreground error of the group): they sort after the last foreground
/// pixel, where the Jaccard loss no longer changes, so their weight is exactly 0 (Berman
/// et al., Alg. 1); their outputs stay 0 and they add nothing to the sums. Returns how
/// many keys are kept.
fn prune_zero_weight<T: Real>(keys: &mut [T::Packed], min_fg: T) -> usize {
    keep_in_order::<T>(keys, |_, key| {
        let below = T::error(key) < min_fg;
        T::unpack(key).2 | !below
    })
}

/// The smallest foreground error of a job whose keys are `parts`, if every foreground
/// pixel of its group (`gts` of them) has a key there: a hinge error `<= 0` left out
/// leaves no key, and then no positive background error is below every foreground one.
fn foreground_floor<T: Real>(parts: &[&[T::Packed]], gts: u64) -> Option<T> {
    let floors: Vec<(u64, T::Packed)> = parts.par_iter().map(|k| T::foreground_floor(k)).collect();
    let count: u64 = floors.iter().map(|f| f.0).sum();
    let top = floors.iter().map(|f| f.1).max()?;
    (count == gts && gts > 0).then(|| T::error(top))
}

/// Pixels in the sample that decides [`worth_pruning`].
const PRUNE_SAMPLE: usize = 1024;

/// Whether a job's zero-weight background keys (see [`prune_zero_weight`]) are worth two
/// passes over its keys (one for the smallest foreground error, one to leave them out):
/// when, in an evenly spaced sample of the group's pixels, at least an eighth of the keys
/// are background keys with errors below every foreground error of the sample. The
/// sample is of the input, so the choice is the same however the keys are built, and a
/// wrong guess only costs time: the keys left out are decided by the exact floor.
fn worth_pruning<T: Real>(p: &Problem<T>, images: Range<usize>, job: &Job) -> bool {
    let s_n = p.spatial;
    let n = images.len() * s_n;
    let drop_nonpositive = p.drops_nonpositive();
    let mut sample: Vec<(T, bool)> = Vec::with_capacity(PRUNE_SAMPLE + 1);
    for i in (0..n).step_by((n / PRUNE_SAMPLE).max(1)) {
        let (image, pixel) = (images.start + i / s_n, i % s_n);
        let l = p.labels[image * s_n + pixel];
        if l != VOID {
            let fg = l == job.class;
            let x = p.data[(image * p.channels + job.channel) * s_n + pixel];
            sample.push((p.kind.error(x, fg).0, fg));
        }
    }
    let floor = sample.iter().filter(|s| s.1).map(|s| s.0.to_f64());
    let Some(floor) = floor.reduce(f64::min) else {
        return false;
    };
    // Void pixels are not in the sample; a dropped foreground pixel counts as a key (it
    // puts the floor at or below 0, where no kept error is below it).
    let kept = |&&(err, fg): &&(T, bool)| !(drop_nonpositive && err <= T::zero()) || fg;
    let keys = sample.iter().filter(kept).count();
    let below = (sample.iter().filter(kept))
        .filter(|&&(err, fg)| !fg && err.to_f64() < floor)
        .count();
    below * 8 >= keys.max(1)
}

/// Walks the sorted keys once, writing each pixel's value into its image's row of `rows`
/// (pixel index `image << shift | pixel`): `out` maps (Jaccard weight times `scale`, key)
/// to (value, share of K, share of the loss). With `fg_per_piece` (the foreground keys in
/// each [`PIECE`] of sorted positions), the pieces are walked on all threads, each
/// starting from the foreground and background counts before it. With `MIXED`
/// (foreground and background both common), the steps are [`JaccardWalk::step_blended`],
/// else [`JaccardWalk::step`].
fn walk<T: Real, F, const MIXED: bool>(
    keys: &SortedKeys<T::Packed>,
    rows: &mut [&mut [T]],
    shift: u32,
    gts: u64,
    scale: f64,
    fg_per_piece: Option<&[u64]>,
    out: F,
) -> JobSums
where
    F: Fn(f64, T::Packed) -> (f64, f64, f64) + Sync,
{
    let sums: Vec<JobSums> = if let Some(fg) = fg_per_piece {
        let mut starts = Vec::with_capacity(fg.len());
        let mut fg_before = 0;
        for (i, f) in fg.iter().enumerate() {
            starts.push(JaccardWalk::resume(
                gts,
                fg_before,
                (i * PIECE) as u64 - fg_before,
            ));
            fg_before += f;
        }
        let rows = RowWrites::new(rows, shift);
        starts
            .into_par_iter()
            .enumerate()
            .map(|(i, mut jw)| {
                // SAFETY: keys are built one per pixel, so every index is written once, by
                // the one thread that walks its key.
                let write = |i, v| unsafe { rows.write(i, v) };
                walk_piece::<T, MIXED>(&keys.piece(i), &mut jw, scale, &out, write)
            })
            .collect()
    } else if let [row] = rows {
        // One image: its pixel index is the key's whole index.
        let row = &mut **row;
        walk_serial::<T, MIXED>(keys, gts, scale, &out, |i, v| row[i] = v)
    } else {
        let mask = (1usize << shift) - 1;
        walk_serial::<T, MIXED>(keys, gts, scale, &out, |i, v| {
            rows[i >> shift][i & mask] = v
        })
    };
    sums.into_iter().fold(JobSums::default(), |a, b| JobSums {
        offset: a.offset + b.offset,
        loss: a.loss + b.loss,
    })
}

/// [`walk`] on the calling thread: its pieces in order, one walk state throughout.
fn walk_serial<T: Real, const MIXED: bool>(
    keys: &SortedKeys<T::Packed>,
    gts: u64,
    scale: f64,
    out: &impl Fn(f64, T::Packed) -> (f64, f64, f64),
    mut write: impl FnMut(usize, T),
) -> Vec<JobSums> {
    let mut jw = JaccardWalk::new(gts);
    (0..keys.pieces())
        .map(|i| walk_piece::<T, MIXED>(&keys.piece(i), &mut jw, scale, out, &mut write))
        .collect()
}

/// One piece of [`walk`]: advances `jw` over the keys of `slices`, in order (by
/// [`JaccardWalk::step_blended`] if `MIXED`, else [`JaccardWalk::step`]), hands each
/// value to `write`.
#[inline(always)]
fn walk_piece<T: Real, const MIXED: bool>(
    slices: &[&[T::Packed]],
    jw: &mut JaccardWalk,
    scale: f64,
    out: &impl Fn(f64, T::Packed) -> (f64, f64, f64),
    mut write: impl FnMut(usize, T),
) -> JobSums {
    // Local copies stay in registers: through `&mut`, the walk's state and the sums were
    // stored to memory and reloaded at every step.
    let (mut offset, mut loss) = (0.0, 0.0);
    let mut walk = jw.clone();
    for &slice in slices {
        for &key in slice {
            let (idx, _, fg) = T::unpack(key);
            let weight = if MIXED {
                walk.step_blended(fg)
            } else {
                walk.step(fg)
            };
            let (value, k, l) = out(weight * scale, key);
            write(idx, T::from_f64(value));
            offset += k;
            loss += l;
        }
    }
    *jw = walk;
    JobSums { offset, loss }
}

/// The rows of one job's output (one per image of its group), written by pixel index
/// `image << shift | pixel` from several threads, each index at most once.
struct RowWrites<'a, T> {
    starts: Vec<*mut T>,
    len: usize,
    shift: u32,
    _rows: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: shared use only writes through `write`, whose contract rules out two writes to
// one index; `T: Send` values may be moved into the rows from any thread.
unsafe impl<T: Send> Sync for RowWrites<'_, T> {}

impl<'a, T> RowWrites<'a, T> {
    /// `rows` all have the same length, below `1 << shift`.
    fn new(rows: &'a mut [&mut [T]], shift: u32) -> Self {
        let len = rows.first().map_or(0, |r| r.len());
        assert!(
            rows.iter().all(|r| r.len() == len) && len <= 1 << shift,
            "lovasz kernel: rows of unequal lengths (internal error)"
        );
        Self {
            starts: rows.iter_mut().map(|r| r.as_mut_ptr()).collect(),
            len,
            shift,
            _rows: std::marker::PhantomData,
        }
    }

    /// Writes `value` at pixel index `index` (`image << shift | pixel`, checked against
    /// the rows).
    ///
    /// # Safety
    /// No other call, on any thread, may write the same index while the rows are shared.
    #[inline(always)]
    unsafe fn write(&self, index: usize, value: T) {
        let (image, pixel) = (index >> self.shift, index & ((1 << self.shift) - 1));
        let start = self.starts[image];
        assert!(pixel < self.len, "pixel {pixel} out of {}", self.len);
        // SAFETY: in bounds (checked above), and no other thread touches this element.
        unsafe { start.add(pixel).write(value) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-image problem whose class 0 has all its foreground errors in (0.4, 1], so
    /// about 40 % of its background pixels have smaller errors and weight 0; with void
    /// pixels and two other classes.
    fn separable(s_n: usize) -> (Vec<f32>, Vec<u32>) {
        let mut rng = crate::test_rng::Lcg(11);
        let mut next = move || rng.next_f32();
        let labels: Vec<u32> = (0..s_n)
            .map(|i| match (i % 13, i % 7) {
                (5, _) => VOID,
                (_, 0) => 0,
                _ => 1 + (i % 2) as u32,
            })
            .collect();
        let mut data = vec![0f32; 3 * s_n];
        for (i, &l) in labels.iter().enumerate() {
            data[i] = if l == 0 { 0.6 * next() } else { next() };
            data[s_n + i] = next();
            data[2 * s_n + i] = next();
        }
        (data, labels)
    }

    #[test]
    fn pruned_background_keys_change_nothing() {
        let s_n = 5000;
        let (data, labels) = separable(s_n);
        let p = Problem {
            data: &data,
            labels: &labels,
            batch: 1,
            channels: 3,
            spatial: s_n,
            per_image: true,
            kind: ErrorKind::Abs,
            output: Output::Linear,
            group_scale: 1.0,
        };
        let gts = labels.iter().filter(|&&l| l == 0).count() as u64;
        let job = Job {
            group: 0,
            class: 0,
            channel: 0,
            gts,
            scale: 1.0,
        };
        // The kernel does leave keys out here.
        let mut keys = vec![0u64; s_n];
        let (len, _) = build_keys(&p, 0, 0..s_n, 0, 0, &mut keys);
        assert!(worth_pruning(&p, 0..1, &job));
        let min_fg = foreground_floor::<f32>(&[&keys[..len]], gts).unwrap();
        let want = (0..s_n).filter(|&i| labels[i] == 0).map(|i| 1.0 - data[i]);
        assert_eq!(min_fg, want.fold(f32::INFINITY, f32::min));
        let kept = prune_zero_weight::<f32>(&mut keys[..len], min_fg);
        assert!(kept < len * 3 / 4, "{kept} of {len} kept");

        let sel = Selection {
            entries: vec![ClassEntry {
                class: 0,
                channel: 0,
                weight: 1.0,
            }],
            only_present: false,
        };
        let solved = solve(&p, &sel).unwrap();
        // Independently: every valid pixel, sorted by decreasing error (ties by index),
        // walked in full.
        let mut pixels: Vec<(f32, usize, bool, bool)> = (0..s_n)
            .filter(|&i| labels[i] != VOID)
            .map(|i| {
                let fg = labels[i] == 0;
                let (err, slope) = ErrorKind::Abs.error(data[i], fg);
                (err, i, slope, fg)
            })
            .collect();
        pixels.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut walk = JaccardWalk::new(gts);
        let (mut want, mut loss) = (vec![0f32; s_n], 0.0);
        for &(err, i, slope, fg) in &pixels {
            let w = walk.step(fg);
            let (a, _, l) = ErrorKind::Abs.linear::<false>(w, f64::from(err), slope, fg);
            want[i] = a as f32;
            loss += l;
        }
        for (i, (got, want)) in solved.values[..s_n].iter().zip(&want).enumerate() {
            // A weight-0 pixel may keep +0.0 where the full walk writes -0.0.
            assert!(got == want, "pixel {i}: {got} vs {want}");
        }
        let got = solved.losses[0];
        assert!((got - loss).abs() <= 1e-12 * loss, "{got} vs {loss}");
    }

    #[test]
    fn label_counts_match_a_plain_count() {
        let mut rng = crate::test_rng::Lcg(7);
        for n in [0, 1, 3, 4, 5, 70_001] {
            let labels: Vec<u32> = (0..n)
                .map(|i| {
                    // Runs of equal labels, values past the counted ones, and void.
                    match ((rng.next_u64() >> 60) as u32, i % 9 < 5) {
                        (0, _) => VOID,
                        (1, _) => 6,
                        (_, true) => 2,
                        (v, false) => v % 4,
                    }
                })
                .collect();
            let plain: Vec<u64> = (0..4)
                .map(|c| labels.iter().filter(|&&l| l == c).count() as u64)
                .collect();
            assert_eq!(count_labels(&labels, 4), plain, "{n} labels");
        }
    }

    #[test]
    fn blended_coefficients_match_branched_ones() {
        for kind in [ErrorKind::Abs, ErrorKind::Hinge] {
            for (w, err) in [
                (0.25, 0.75),
                (1e-9, 1.5),
                (3.0, 0.0),
                (0.5, -0.0),
                (2.0, f64::NAN),
            ] {
                for slope in [false, true] {
                    for fg in [false, true] {
                        let bits = |c: (f64, f64, f64)| [c.0, c.1, c.2].map(f64::to_bits);
                        let branched = bits(kind.linear::<false>(w, err, slope, fg));
                        let blended = bits(kind.linear::<true>(w, err, slope, fg));
                        assert_eq!(branched, blended, "{kind:?} {w} {err} {slope} {fg}");
                    }
                }
            }
        }
    }
}
