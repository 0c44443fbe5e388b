//! Background pixels whose error is below every foreground error of their group sort
//! after the last foreground pixel, where the Jaccard loss stops changing: their weight is
//! exactly 0 (Berman et al., Alg. 1). When a sample of the input says enough of them
//! are there ([`worth_pruning`]), they are left out of the sort and the walk.

use std::ops::Range;

use rayon::prelude::*;

use super::build_keys::keep_in_order;
use super::Slices;
use crate::input::VOID;
use crate::kernel::plan::Job;
use crate::kernel::real::Real;
/// Leaves out, in place and in order, the background keys whose error is below
/// `min_fg` (every foreground error of the group): they sort after the last foreground
/// pixel, where the Jaccard loss no longer changes, so their weight is exactly 0 (Berman
/// et al., Alg. 1); their outputs stay 0 and they add nothing to the sums. Returns how
/// many keys are kept.
pub(crate) fn prune_zero_weight<T: Real>(keys: &mut [T::Packed], min_fg: T) -> usize {
    keep_in_order::<T>(keys, |_, key| {
        let below = T::error(key) < min_fg;
        T::unpack(key).2 | !below
    })
}

/// The smallest foreground error of a job whose keys are `parts`, if every foreground
/// pixel of its group (`gts` of them) has a key there: a hinge error `<= 0` left out
/// leaves no key, and then no positive background error is below every foreground one.
pub(crate) fn foreground_floor<T: Real>(parts: &[&[T::Packed]], gts: u64) -> Option<T> {
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
pub(crate) fn worth_pruning<T: Real>(p: &Slices<T>, images: Range<usize>, job: &Job) -> bool {
    let s_n = p.call.dims.2;
    let n = images.len() * s_n;
    let drop_nonpositive = p.call.drops_nonpositive();
    let mut sample: Vec<(T, bool)> = Vec::with_capacity(PRUNE_SAMPLE + 1);
    for i in (0..n).step_by((n / PRUNE_SAMPLE).max(1)) {
        let (image, pixel) = (images.start + i / s_n, i % s_n);
        let l = p.labels[image * s_n + pixel];
        if l != VOID {
            let fg = l == job.class;
            let x = p.data[p.call.index(image, job.channel, pixel)];
            sample.push((p.call.kind.error(x, fg).0, fg));
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

#[cfg(test)]
mod tests {
    use super::super::build_keys::build_keys;
    use super::super::solve;
    use super::*;
    use crate::kernel::call::{Call, ChannelOrder, ClassEntry, ErrorKind, Output, Selection};
    use crate::kernel::jaccard_walk::JaccardWalk;
    use crate::kernel::plan::Plan;

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
        let call = Call {
            dims: (1, 3, s_n),
            order: ChannelOrder::First,
            per_image: true,
            kind: ErrorKind::Abs,
            output: Output::Linear,
            group_scale: 1.0,
            from_logits: false,
        };
        let p = Slices {
            call: &call,
            data: &data,
            labels: &labels,
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
        let plan = Plan::new(call, &sel, &labels).unwrap();
        let solved = solve(&plan, &data, &labels).unwrap();
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
}
