//! The Jaccard gradient in closed form (Alg. 1 of Berman et al., CVPR 2018): the weight
//! of each pixel in decreasing order of error, from exact counts of the foreground and
//! background pixels before it. The kernel's walk and [`crate::lovasz_grad`] step it.

/// Running state of the Jaccard gradient over a sorted ground-truth vector.
///
/// With `G` foreground pixels in the group, after `k` sorted pixels of which `f` are
/// foreground and `b = k - f` background, the Jaccard loss of the prefix set is
/// `J_k = 1 - (G - f) / (G + b)` and the weight of pixel `k` is `J_k - J_(k-1)`. In closed
/// form that is `1 / (G + b)` for a foreground pixel and `(G - f) / ((G + b - 1)(G + b))`
/// for a background one (`1` for the first pixel when `G = 0`). Counts are exact integers,
/// the weights are taken in f64 without the cancellation of a difference, and `1 / (G + b)`
/// is kept between steps, so a step costs at most one division.
#[derive(Debug, Clone)]
pub(crate) struct JaccardWalk {
    gts: u64,
    fg_seen: u64,
    bg_seen: u64,
    /// `1 / (G + b)` for the current `b` (0 while `G + b = 0`: no weight reads it then,
    /// and the blend in [`Self::step_blended`] needs it finite).
    inv_union: f64,
}

impl JaccardWalk {
    /// Starts a walk over a group with `gts` foreground pixels.
    pub fn new(gts: u64) -> Self {
        Self {
            gts,
            fg_seen: 0,
            bg_seen: 0,
            inv_union: reciprocal(gts),
        }
    }

    /// Resumes a walk after `fg_seen` foreground and `bg_seen` background pixels: the same
    /// state, bit for bit, as stepping over them.
    pub fn resume(gts: u64, fg_seen: u64, bg_seen: u64) -> Self {
        Self {
            gts,
            fg_seen,
            bg_seen,
            inv_union: reciprocal(gts + bg_seen),
        }
    }

    /// Advances by one sorted pixel and returns its weight `J_k - J_(k-1)`.
    ///
    /// Branches on `fg`: the faster step when the ground truth is mostly one value (a
    /// class among many, where a foreground pixel also skips the division), the slower
    /// one when it is close to random in sorted order; see [`Self::step_blended`].
    #[inline]
    pub fn step(&mut self, fg: bool) -> f64 {
        if fg {
            // A foreground pixel exists, so G >= 1 and 1 / (G + b) is finite.
            self.fg_seen += 1;
            return self.inv_union;
        }
        self.bg_seen += 1;
        let union = self.gts + self.bg_seen;
        let inv_prev = self.inv_union;
        self.inv_union = 1.0 / count(union);
        if union == 1 {
            // G = 0: the first pixel takes J from 0 to 1.
            return 1.0;
        }
        count(self.gts - self.fg_seen) * inv_prev * self.inv_union
    }

    /// [`Self::step`] without a branch on `fg`, the same weight bit for bit: both cases
    /// are computed and blended by 0 / 1 factors (exact, both weights being finite). When
    /// the ground truth in sorted order is close to random (a binary loss), a branch
    /// mispredicts on about every other pixel, which costs more than the division both
    /// cases then take.
    #[inline]
    pub fn step_blended(&mut self, fg: bool) -> f64 {
        let is_fg = u64::from(fg);
        self.fg_seen += is_fg;
        self.bg_seen += 1 - is_fg;
        let union = self.gts + self.bg_seen;
        let inv_prev = self.inv_union;
        // For a foreground pixel `union` is unchanged and so is its reciprocal.
        self.inv_union = 1.0 / count(union);
        let bg_weight = if union == 1 {
            // G = 0: the first pixel takes J from 0 to 1 (taken at most once per walk).
            1.0
        } else {
            count(self.gts - self.fg_seen) * inv_prev * self.inv_union
        };
        let fg_factor = is_fg as i64 as f64;
        inv_prev * fg_factor + bg_weight * (1.0 - fg_factor)
    }
}

/// `1 / n` for a union count, 0 for `n = 0`; a step's own unions are at least 1.
fn reciprocal(n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        1.0 / count(n)
    }
}

/// A pixel count as f64. Counts stay below 2^62, so going through i64 is exact, and it is
/// one instruction on x86-64 where u64 to f64 takes several.
#[inline]
fn count(n: u64) -> f64 {
    n as i64 as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_final_jaccard() {
        // The weights telescope: their sum is J of the full set, 1 when G > 0 or n > 0.
        let fg = [true, false, false, true, true, false];
        let mut walk = JaccardWalk::new(3);
        let total: f64 = fg.iter().map(|&f| walk.step(f)).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }

    #[test]
    fn closed_form_matches_differences_of_the_jaccard_loss() {
        let fg = [
            false, true, true, false, false, true, false, true, false, false,
        ];
        let gts = fg.iter().filter(|&&f| f).count() as u64;
        let jaccard = |f: u64, b: u64| 1.0 - (gts - f) as f64 / (gts + b) as f64;
        let mut walk = JaccardWalk::new(gts);
        let (mut f, mut b, mut prev) = (0, 0, 0.0);
        for &is_fg in &fg {
            if is_fg {
                f += 1;
            } else {
                b += 1;
            }
            let j = jaccard(f, b);
            let w = walk.step(is_fg);
            assert!((w - (j - prev)).abs() < 1e-15, "{w} vs {}", j - prev);
            prev = j;
        }
    }

    #[test]
    fn a_resumed_walk_continues_bit_for_bit() {
        let fg: Vec<bool> = (0..50).map(|i| i % 7 == 2 || i % 11 == 0).collect();
        let gts = fg.iter().filter(|&&f| f).count() as u64;
        let mut whole = JaccardWalk::new(gts);
        let all: Vec<f64> = fg.iter().map(|&f| whole.step(f)).collect();
        for split in [0, 1, 13, 49, 50] {
            let f_before = fg[..split].iter().filter(|&&f| f).count() as u64;
            let mut resumed = JaccardWalk::resume(gts, f_before, split as u64 - f_before);
            for (i, &f) in fg.iter().enumerate().skip(split) {
                assert_eq!(resumed.step(f).to_bits(), all[i].to_bits(), "split {split}");
            }
        }
    }

    #[test]
    fn blended_steps_match_branched_steps() {
        let mut rng = crate::test_rng::Lcg(5);
        for (n, every) in [(200usize, 2u64), (200, 20), (50, 1), (50, 0)] {
            let fg: Vec<bool> = (0..n)
                .map(|_| {
                    let state = rng.next_u64();
                    every > 0 && (state >> 33) % every == 0
                })
                .collect();
            let gts = fg.iter().filter(|&&f| f).count() as u64;
            let (mut a, mut b) = (JaccardWalk::new(gts), JaccardWalk::new(gts));
            for &f in &fg {
                assert_eq!(a.step(f).to_bits(), b.step_blended(f).to_bits(), "n {n}");
            }
        }
    }

    #[test]
    fn no_foreground_puts_all_weight_first() {
        let mut walk = JaccardWalk::new(0);
        assert_eq!(walk.step(false), 1.0);
        assert_eq!(walk.step(false), 0.0);
        assert_eq!(JaccardWalk::resume(0, 0, 0).step(false), 1.0);
        assert_eq!(JaccardWalk::resume(0, 0, 3).step(false), 0.0);
        let mut blended = JaccardWalk::new(0);
        assert_eq!(blended.step_blended(false), 1.0);
        assert_eq!(blended.step_blended(false), 0.0);
        assert_eq!(JaccardWalk::resume(0, 0, 0).step_blended(false), 1.0);
    }
}
