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
    /// (descending error key, pixel index, foreground bit) packed so that ascending
    /// integer order is descending error order, ties by ascending index.
    type Packed: Ord + Copy + Send + Sync;
    fn pack(err: Self, index: u32, fg: bool) -> Self::Packed;
    /// The pixel index (`< 2^31`) and the foreground bit.
    fn unpack(p: Self::Packed) -> (usize, bool);
    fn sort(keys: &mut Vec<Self::Packed>, parallel: bool);
}

impl Real for f32 {
    type Packed = u64;
    #[inline]
    fn pack(err: f32, index: u32, fg: bool) -> u64 {
        let bits = err.to_bits();
        // Total order of IEEE floats as unsigned integers, then reversed.
        let ascending = if bits >> 31 == 1 {
            !bits
        } else {
            bits | 1 << 31
        };
        (u64::from(!ascending) << 32) | u64::from(index) << 1 | u64::from(fg)
    }
    #[inline]
    fn unpack(p: u64) -> (usize, bool) {
        (((p as u32) >> 1) as usize, p & 1 == 1)
    }
    fn sort(keys: &mut Vec<u64>, parallel: bool) {
        if parallel {
            keys.par_sort_unstable();
        } else {
            crate::radix::sort_by_high_word(keys);
        }
    }
}

impl Real for f64 {
    type Packed = u128;
    #[inline]
    fn pack(err: f64, index: u32, fg: bool) -> u128 {
        let bits = err.to_bits();
        let ascending = if bits >> 63 == 1 {
            !bits
        } else {
            bits | 1 << 63
        };
        (u128::from(!ascending) << 64) | u128::from(index) << 1 | u128::from(fg)
    }
    #[inline]
    fn unpack(p: u128) -> (usize, bool) {
        (((p as u32) >> 1) as usize, p & 1 == 1)
    }
    fn sort(keys: &mut Vec<u128>, parallel: bool) {
        if parallel {
            keys.par_sort_unstable();
        } else {
            keys.sort_unstable();
        }
    }
}

impl ErrorKind {
    #[inline]
    fn error<T: Real>(self, x: T, fg: bool) -> T {
        let one = T::from_f64(1.0);
        match self {
            ErrorKind::Abs => {
                let d = if fg { one - x } else { x };
                if d < T::zero() {
                    T::zero() - d
                } else {
                    d
                }
            }
            ErrorKind::Hinge => {
                if fg {
                    one - x
                } else {
                    one + x
                }
            }
        }
    }

    /// `(a, k)` with `error = k + a x` near `x` (zero where the hinge is clamped).
    #[inline]
    fn linear<T: Real>(self, x: T, err: T, fg: bool) -> (f64, f64) {
        match self {
            ErrorKind::Abs => {
                let target = if fg { 1.0 } else { 0.0 };
                let s = if target - x.to_f64() >= 0.0 {
                    1.0
                } else {
                    -1.0
                };
                (-s, s * target)
            }
            ErrorKind::Hinge => {
                if err > T::zero() {
                    (if fg { -1.0 } else { 1.0 }, 1.0)
                } else {
                    (0.0, 0.0)
                }
            }
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
        if g.len() * s_n > (u32::MAX >> 1) as usize {
            bail!(
                "lovasz kernel: a group of {} pixels exceeds the 2^31 pixels one sort can index; use per_image or smaller batches",
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

    let mut values = vec![T::zero(); b_n * c_n * s_n];
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
    let parallel_sort = jobs.len() < rayon::current_num_threads();
    let parts: Vec<(usize, JobSums)> = work
        .into_par_iter()
        .map(|(job, mut outs)| {
            let sums = run_job(p, groups[job.group].clone(), job, &mut outs, parallel_sort);
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

/// One (group, class) job: rank the errors, walk the Jaccard gradient, write the outputs.
fn run_job<T: Real>(
    p: &Problem<T>,
    images: Range<usize>,
    job: &Job,
    outs: &mut [&mut [T]],
    parallel_sort: bool,
) -> JobSums {
    let s_n = p.spatial;
    let input = |b: usize| &p.data[(b * p.channels + job.channel) * s_n..][..s_n];
    let labels = |b: usize| &p.labels[b * s_n..][..s_n];
    let mut keys: Vec<T::Packed> = Vec::with_capacity(images.len() * s_n);
    for (li, b) in images.clone().enumerate() {
        let base = li * s_n;
        for (i, (&x, &l)) in input(b).iter().zip(labels(b)).enumerate() {
            if l != VOID {
                let fg = l == job.class;
                keys.push(T::pack(p.kind.error(x, fg), (base + i) as u32, fg));
            }
        }
    }
    if keys.is_empty() {
        return JobSums::default();
    }
    T::sort(&mut keys, parallel_sort);
    // The walk scatters weights in pixel order; a second, sequential pass turns them into
    // outputs, so that the random accesses touch one compact buffer only.
    let mut weights = vec![T::zero(); images.len() * s_n];
    let mut walk = JaccardWalk::new(job.gts);
    for key in keys {
        let (idx, fg) = T::unpack(key);
        weights[idx] = T::from_f64(walk.step(fg) * job.scale);
    }
    let mut sums = JobSums::default();
    for ((li, b), out) in images.enumerate().zip(outs.iter_mut()) {
        let w = &weights[li * s_n..][..s_n];
        match p.output {
            Output::Weights => out.copy_from_slice(w),
            Output::Linear => {
                let rows = input(b).iter().zip(labels(b)).zip(w).zip(out.iter_mut());
                for (((&x, &l), &wi), o) in rows {
                    if wi == T::zero() {
                        continue;
                    }
                    let fg = l == job.class;
                    let err = p.kind.error(x, fg);
                    let (a, k) = p.kind.linear(x, err, fg);
                    let w = wi.to_f64();
                    *o = T::from_f64(w * a);
                    sums.offset += w * k;
                    sums.loss += w * (k + a * x.to_f64());
                }
            }
        }
    }
    sums
}
