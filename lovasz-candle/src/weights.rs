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

/// The kernel's result: per-pixel values `[B, C, S]` (zero where no class job wrote), and
/// per group the offset `K` and the loss `Σ W ⊙ errors` in f64 (both zero in
/// [`Output::Weights`] mode).
pub(crate) struct Solved<T> {
    pub values: Vec<T>,
    pub offsets: Vec<f64>,
    pub losses: Vec<f64>,
}

/// A float dtype whose errors can be ranked as packed integers.
pub(crate) trait Real: candle::WithDType + PartialOrd {
    /// (descending error key, pixel index, slope bit, foreground bit) packed so that
    /// ascending integer order is descending error order, ties by ascending index.
    type Packed: Ord + Copy + Send + Sync;
    fn pack(err: Self, index: u32, slope: bool, fg: bool) -> Self::Packed;
    /// The pixel index (`< 2^30`), the slope bit and the foreground bit.
    fn unpack(p: Self::Packed) -> (usize, bool, bool);
    /// The error a key was made from.
    fn error(p: Self::Packed) -> Self;
    fn exp(self) -> Self;
    /// Sorts ascending; `scratch` is reusable working memory.
    fn sort(keys: &mut [Self::Packed], scratch: &mut Vec<Self::Packed>, parallel: bool);
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

impl Real for f32 {
    type Packed = u64;
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    #[inline]
    fn pack(err: f32, index: u32, slope: bool, fg: bool) -> u64 {
        let bits = err.to_bits();
        // Total order of IEEE floats as unsigned integers, then reversed.
        let ascending = if bits >> 31 == 1 {
            !bits
        } else {
            bits | 1 << 31
        };
        (u64::from(!ascending) << 32) | u64::from(low_word(index, slope, fg))
    }
    #[inline]
    fn unpack(p: u64) -> (usize, bool, bool) {
        split_low_word(p as u32)
    }
    #[inline]
    fn error(p: u64) -> f32 {
        let ascending = !((p >> 32) as u32);
        f32::from_bits(if ascending >> 31 == 1 {
            ascending & !(1 << 31)
        } else {
            !ascending
        })
    }
    fn sort(keys: &mut [u64], scratch: &mut Vec<u64>, parallel: bool) {
        if parallel {
            crate::radix::par_sort_by_high_word(keys);
        } else {
            crate::radix::sort_by_high_word(keys, scratch);
        }
    }
}

impl Real for f64 {
    type Packed = u128;
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    #[inline]
    fn pack(err: f64, index: u32, slope: bool, fg: bool) -> u128 {
        let bits = err.to_bits();
        let ascending = if bits >> 63 == 1 {
            !bits
        } else {
            bits | 1 << 63
        };
        (u128::from(!ascending) << 64) | u128::from(low_word(index, slope, fg))
    }
    #[inline]
    fn unpack(p: u128) -> (usize, bool, bool) {
        split_low_word(p as u32)
    }
    #[inline]
    fn error(p: u128) -> f64 {
        let ascending = !((p >> 64) as u64);
        f64::from_bits(if ascending >> 63 == 1 {
            ascending & !(1 << 63)
        } else {
            !ascending
        })
    }
    fn sort(keys: &mut [u128], _scratch: &mut Vec<u128>, parallel: bool) {
        if parallel {
            keys.par_sort_unstable();
        } else {
            keys.sort_unstable();
        }
    }
}

impl ErrorKind {
    /// The error of input `x` and the slope bit: for `Abs`, whether `target - x >= 0`
    /// (the error is `target - x`, else `x - target`); for `Hinge`, whether the error is
    /// positive (else relu clamps it to 0).
    #[inline]
    fn error<T: Real>(self, x: T, fg: bool) -> (T, bool) {
        let one = T::from_f64(1.0);
        match self {
            ErrorKind::Abs => {
                let d = if fg { one - x } else { T::zero() - x };
                if d >= T::zero() {
                    (d, true)
                } else {
                    (T::zero() - d, false)
                }
            }
            ErrorKind::Hinge => {
                let e = if fg { one - x } else { one + x };
                (e, e > T::zero())
            }
        }
    }

    /// For weight `w` of a pixel with error `err` (clamped by the caller's key), slope bit
    /// and ground truth: `(w a, w k, w e)` with `e = k + a x` the clamped error near `x`.
    #[inline]
    fn linear(self, w: f64, err: f64, slope: bool, fg: bool) -> (f64, f64, f64) {
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
        if g.len() * s_n > (u32::MAX >> 2) as usize {
            bail!(
                "lovasz kernel: a group of {} pixels exceeds the 2^30 pixels one sort can index; use per_image or smaller batches",
                g.len() * s_n
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

    let mut jobs = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        let mut counts = vec![0u64; max_class + 1];
        for &l in &p.labels[g.start * s_n..g.end * s_n] {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
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
    let threads = rayon::current_num_threads();
    let parallel_sort = jobs.len() < threads;
    // About two tasks per thread: each reuses one workspace for all its jobs.
    let per_task = jobs.len().div_ceil(2 * threads).max(1);
    let parts: Vec<(usize, JobSums)> = work
        .into_par_iter()
        .with_min_len(per_task)
        .map_init(Workspace::default, |ws, (job, mut outs)| {
            let images = groups[job.group].clone();
            let sums = run_job(p, images, job, &mut outs, parallel_sort, ws);
            (job.group, sums)
        })
        .collect();
    let mut offsets = vec![0.0; groups.len()];
    let mut losses = vec![0.0; groups.len()];
    for (g, sums) in parts {
        offsets[g] += sums.offset;
        losses[g] += sums.loss;
    }
    Ok(Solved {
        values,
        offsets,
        losses,
    })
}

/// A job's share of its group's offset `K` and loss.
#[derive(Default)]
struct JobSums {
    offset: f64,
    loss: f64,
}

/// Working memory reused by the jobs one rayon task runs, so that large buffers are
/// allocated (and page-faulted) once per task rather than once per job.
struct Workspace<T: Real> {
    keys: Vec<T::Packed>,
    scratch: Vec<T::Packed>,
    buffer: Vec<T>,
}

impl<T: Real> Default for Workspace<T> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            scratch: Vec::new(),
            buffer: Vec::new(),
        }
    }
}

/// One (group, class) job: rank the errors, walk the Jaccard gradient, write the outputs.
fn run_job<T: Real>(
    p: &Problem<T>,
    images: Range<usize>,
    job: &Job,
    outs: &mut [&mut [T]],
    parallel_sort: bool,
    ws: &mut Workspace<T>,
) -> JobSums {
    let s_n = p.spatial;
    let keys = &mut ws.keys;
    crate::buffer::reserve_empty(keys, images.len() * s_n);
    // A hinge error <= 0 has relu weight 0 and sorts after every positive one, so it
    // changes no other pixel's rank: in linear mode such pixels are left out (their
    // coefficient stays 0). The weights `W` need every pixel.
    let drop_nonpositive = p.kind == ErrorKind::Hinge && p.output == Output::Linear;
    for (li, b) in images.clone().enumerate() {
        let x = &p.data[(b * p.channels + job.channel) * s_n..][..s_n];
        let labels = &p.labels[b * s_n..][..s_n];
        let base = (li * s_n) as u32;
        match p.kind {
            ErrorKind::Abs => push_keys(keys, x, labels, job.class, base, false, |x, fg| {
                ErrorKind::Abs.error(x, fg)
            }),
            ErrorKind::Hinge => push_keys(
                keys,
                x,
                labels,
                job.class,
                base,
                drop_nonpositive,
                |x, fg| ErrorKind::Hinge.error(x, fg),
            ),
        }
    }
    if keys.is_empty() {
        return JobSums::default();
    }
    T::sort(keys, &mut ws.scratch, parallel_sort);
    // Everything the outputs need is in the keys, so one walk writes them. A single image
    // is written in place; several go through one compact buffer (random writes stay in
    // one allocation) and are then copied out.
    let several = outs.len() > 1;
    let buffer = &mut ws.buffer;
    let target: &mut [T] = match outs {
        [single] => single,
        _ => {
            crate::buffer::reserve_empty(buffer, images.len() * s_n);
            buffer.resize(images.len() * s_n, T::zero());
            buffer
        }
    };
    let walk = JaccardWalk::new(job.gts);
    let sums = match (p.output, p.kind) {
        (Output::Weights, _) => walk_keys(keys, target, walk, job.scale, |w, _| (w, 0.0, 0.0)),
        (Output::Linear, ErrorKind::Abs) => walk_keys(keys, target, walk, job.scale, |w, key| {
            let (_, slope, fg) = T::unpack(key);
            ErrorKind::Abs.linear(w, T::error(key).to_f64(), slope, fg)
        }),
        (Output::Linear, ErrorKind::Hinge) => walk_keys(keys, target, walk, job.scale, |w, key| {
            let (_, slope, fg) = T::unpack(key);
            ErrorKind::Hinge.linear(w, T::error(key).to_f64(), slope, fg)
        }),
    };
    if several {
        for (out, chunk) in outs.iter_mut().zip(ws.buffer.chunks(s_n)) {
            out.copy_from_slice(chunk);
        }
    }
    sums
}

/// Appends the packed keys of one image's row `x` (labels `labels`, pixel indices from
/// `base`), skipping void pixels and, if `drop_nonpositive`, errors `<= 0`. `error` is
/// [`ErrorKind::error`] for one fixed kind, so the loop has no dispatch in it.
#[inline(always)]
fn push_keys<T: Real>(
    keys: &mut Vec<T::Packed>,
    x: &[T],
    labels: &[u32],
    class: u32,
    base: u32,
    drop_nonpositive: bool,
    error: impl Fn(T, bool) -> (T, bool),
) {
    if drop_nonpositive || labels.contains(&VOID) {
        for (i, (&x, &l)) in x.iter().zip(labels).enumerate() {
            if l == VOID {
                continue;
            }
            let fg = l == class;
            let (err, slope) = error(x, fg);
            // `err <= 0` is false for NaN: a NaN error reaches the walk like any other.
            if !(drop_nonpositive && err <= T::zero()) {
                keys.push(T::pack(err, base + i as u32, slope, fg));
            }
        }
    } else {
        // No void pixel: a plain map the compiler can keep branch-free.
        keys.extend(x.iter().zip(labels).enumerate().map(|(i, (&x, &l))| {
            let fg = l == class;
            let (err, slope) = error(x, fg);
            T::pack(err, base + i as u32, slope, fg)
        }));
    }
}

/// Walks sorted keys once: the Jaccard weight of each (times `scale`) goes through `out`,
/// which returns `(value written, share of K, share of the loss)`.
#[inline(always)]
fn walk_keys<T: Real>(
    keys: &[T::Packed],
    target: &mut [T],
    mut walk: JaccardWalk,
    scale: f64,
    out: impl Fn(f64, T::Packed) -> (f64, f64, f64),
) -> JobSums {
    // Local accumulators stay in registers (fields of a struct were spilled each step).
    let (mut offset, mut loss) = (0.0, 0.0);
    for &key in keys {
        let (idx, _, fg) = T::unpack(key);
        let (value, k, l) = out(walk.step(fg) * scale, key);
        target[idx] = T::from_f64(value);
        offset += k;
        loss += l;
    }
    JobSums { offset, loss }
}
