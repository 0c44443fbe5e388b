//! The jobs of one call, whatever the device: the groups of images the Jaccard index is
//! taken over (each image, or the whole batch), the classes each group counts (repeated
//! classes merged; with `only_present`, those without a foreground pixel in the group
//! skipped), and for each (group, class) job its foreground count and the factor on its
//! weights (its class weight over the group's total, times the group scale).

use std::ops::Range;

use candle::{bail, Result};

use crate::kernel::keys::index_shift;
use crate::kernel::problem::{ClassEntry, Problem, Selection};

/// One (group, class) job: rank the group's errors for the class, walk the Jaccard
/// gradient, write the class channel's outputs for the group's images.
pub(crate) struct Job {
    pub group: usize,
    pub class: u32,
    pub channel: usize,
    /// Foreground (non-void, label `class`) pixels in the group.
    pub gts: u64,
    /// The factor on the job's Jaccard weights.
    pub scale: f64,
}

/// The images of each group: one group per image when `per_image`, else one group of
/// the whole batch. Fails on slices of the wrong sizes, and when a group's pixels need
/// more than the 30 bits of pixel index a key holds.
pub(crate) fn groups<T>(p: &Problem<T>) -> Result<Vec<Range<usize>>> {
    let (b_n, c_n, s_n) = (p.batch, p.channels, p.spatial);
    if p.data.len() != b_n * c_n * s_n || p.labels.len() != b_n * s_n {
        bail!("lovasz kernel: inconsistent sizes (internal error)")
    }
    group_ranges(b_n, s_n, p.per_image)
}

/// [`groups`] of a batch of `batch` images of `spatial` pixels, without the slices.
pub(crate) fn group_ranges(
    batch: usize,
    spatial: usize,
    per_image: bool,
) -> Result<Vec<Range<usize>>> {
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
pub(crate) fn merge_classes(sel: &Selection, channels: usize) -> Result<Vec<ClassEntry>> {
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
pub(crate) fn jobs(
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
