//! The plan of one call, whatever the device ([`Plan`]): the groups of images the Jaccard
//! index is taken over (each image, or the whole batch), the classes each group counts
//! (repeated classes merged; with `only_present`, those without a foreground pixel in the
//! group skipped), and for each (group, class) job its foreground count and the factor on
//! its weights (its class weight over the group's total, times the group scale). The CPU
//! kernel runs the jobs as they are; the device path lays them out in segments
//! ([`crate::kernel::segmented::Segments`]).

use std::ops::Range;

use candle::{bail, Result};
use rayon::prelude::*;

use crate::input::VOID;
use crate::kernel::call::{Call, ClassEntry, Selection};
use crate::kernel::keys::index_shift;
use crate::kernel::label_counts::count_labels;

/// One call planned from its labels: its groups and its jobs, built once and shared by
/// the CPU and device backends.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub call: Call,
    /// The images of each group.
    pub groups: Vec<Range<usize>>,
    /// Non-void pixels of each group.
    pub valid: Vec<u64>,
    /// The (group, class) jobs, in group order.
    pub jobs: Vec<Job>,
}

/// The label counts a plan is made from, per group: the pixels of each class (of the
/// classes below `classes[g].len()`) and the non-void pixels.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LabelCounts {
    pub classes: Vec<Vec<u64>>,
    pub valid: Vec<u64>,
}

impl Plan {
    /// Plans `call` for `labels` (`[B, S]`, void as [`VOID`]) and the classes of `sel`:
    /// groups, merged classes, label counts per group, jobs.
    pub fn new(call: Call, sel: &Selection, labels: &[u32]) -> Result<Self> {
        let counts = Self::count(&call, sel, labels)?;
        Self::from_counts(call, sel, counts)
    }

    /// The label counts of each group of `call` over `labels`, for the classes of `sel`.
    pub fn count(call: &Call, sel: &Selection, labels: &[u32]) -> Result<LabelCounts> {
        let (b_n, c_n, s_n) = call.dims;
        if labels.len() != b_n * s_n {
            bail!(
                "lovasz kernel: {} labels for dims {:?} (internal error)",
                labels.len(),
                call.dims
            )
        }
        let groups = group_ranges(b_n, s_n, call.per_image)?;
        let entries = merge_classes(sel, c_n)?;
        let max_class = entries.iter().map(|e| e.class as usize).max().unwrap_or(0);
        let (classes, valid) = groups
            .par_iter()
            .map(|g| {
                let labels = &labels[g.start * s_n..g.end * s_n];
                let valid = labels.par_iter().filter(|&&l| l != VOID).count() as u64;
                (count_labels(labels, max_class + 1), valid)
            })
            .unzip();
        Ok(LabelCounts { classes, valid })
    }

    /// Plans `call` from the label `counts` of its groups ([`Plan::count`], or their sums
    /// over the ranks of a process group).
    pub fn from_counts(call: Call, sel: &Selection, counts: LabelCounts) -> Result<Self> {
        let (b_n, c_n, s_n) = call.dims;
        let groups = group_ranges(b_n, s_n, call.per_image)?;
        if counts.classes.len() != groups.len() || counts.valid.len() != groups.len() {
            bail!("lovasz kernel: label counts of another call (internal error)")
        }
        let entries = merge_classes(sel, c_n)?;
        let jobs = jobs(
            &entries,
            sel.only_present,
            &counts.classes,
            call.group_scale,
        );
        Ok(Self {
            call,
            groups,
            valid: counts.valid,
            jobs,
        })
    }

    /// `L`: the pixels of one group (`S` per image, `B·S` per batch).
    pub fn group_len(&self) -> usize {
        self.groups
            .first()
            .map_or(0, |g| g.len() * self.call.dims.2)
    }
}

/// One (group, class) job: rank the group's errors for the class, walk the Jaccard
/// gradient, write the class channel's outputs for the group's images.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Job {
    pub group: usize,
    pub class: u32,
    pub channel: usize,
    /// Foreground (non-void, label `class`) pixels in the group.
    pub gts: u64,
    /// The factor on the job's Jaccard weights.
    pub scale: f64,
}

/// The images of each group of a batch of `batch` images of `spatial` pixels: one group
/// per image when `per_image`, else one group of the whole batch. Fails when a group's
/// pixels need more than the 30 bits of pixel index a key holds.
fn group_ranges(batch: usize, spatial: usize, per_image: bool) -> Result<Vec<Range<usize>>> {
    let (b_n, s_n) = (batch, spatial);
    let groups: Vec<Range<usize>> = if per_image {
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
    Ok(groups)
}

/// The selected classes with repeated classes merged (a listed class counted twice weighs
/// twice), checked against the `channels` of the input.
fn merge_classes(sel: &Selection, channels: usize) -> Result<Vec<ClassEntry>> {
    let mut entries: Vec<ClassEntry> = Vec::new();
    for e in &sel.entries {
        if e.channel >= channels {
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
    Ok(entries)
}

/// The jobs of every group, in group order, from the merged `entries` and each group's
/// label counts (`counts[g][class]`, for every class of `entries`). A group whose counted
/// classes weigh nothing gets no job, nor does a class of weight 0.
fn jobs(
    entries: &[ClassEntry],
    only_present: bool,
    counts: &[Vec<u64>],
    group_scale: f64,
) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (gi, counts) in counts.iter().enumerate() {
        let counted: Vec<&ClassEntry> = entries
            .iter()
            .filter(|e| !only_present || counts[e.class as usize] > 0)
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
                scale: e.weight / denom * group_scale,
            });
        }
    }
    jobs
}
