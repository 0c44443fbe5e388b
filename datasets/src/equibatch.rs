//! Equibatch sampling (named in the experiments of Berman et al., CVPR 2018): an epoch's
//! order arranged so that every class appears in each batch, as far as the data allows.
//! The Lovász-Softmax per batch averages over the classes present in the batch, so a
//! batch that lacks a rare class gives it no gradient at all; spreading the images of
//! each class over the batches keeps every class in the loss at (nearly) every step.
//!
//! Every sample still appears once per epoch. A class held by `m` images of an epoch of
//! `n` batches is placed in every batch when `m >= n`, else in `m` batches spread evenly
//! over the epoch; rarer classes are placed first, and the rest of each batch is filled
//! with the images whose classes are the most common, so that images of rare classes stay
//! for the batches that need them.

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// The classes present in each sample: the non-void labels of its mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassPresence {
    /// Sorted class ids of each sample.
    samples: Vec<Vec<u32>>,
    n_classes: usize,
}

impl ClassPresence {
    /// From the classes of each sample (ids below `n_classes`; others are ignored).
    pub fn new(samples: Vec<Vec<u32>>, n_classes: usize) -> Self {
        let samples = samples
            .into_iter()
            .map(|mut s| {
                s.retain(|&c| (c as usize) < n_classes);
                s.sort_unstable();
                s.dedup();
                s
            })
            .collect();
        Self { samples, n_classes }
    }

    /// The classes in `mask` (labels `>= n_classes`, void among them, left out).
    pub fn of_mask(mask: &[u32], n_classes: usize) -> Vec<u32> {
        let mut seen = vec![false; n_classes];
        for &l in mask {
            if let Some(s) = seen.get_mut(l as usize) {
                *s = true;
            }
        }
        (0..n_classes as u32)
            .filter(|&c| seen[c as usize])
            .collect()
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The classes of sample `i`.
    pub fn classes(&self, i: usize) -> &[u32] {
        &self.samples[i]
    }

    /// One epoch's order: every sample once, in batches of `batch_size` (the last one
    /// shorter when the size does not divide the count), arranged as the module docs say.
    /// Ties are broken by a shuffle drawn from `rng`.
    pub fn order(&self, batch_size: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let n = self.samples.len();
        let b = batch_size.max(1);
        let mut shuffled: Vec<usize> = (0..n).collect();
        shuffled.shuffle(rng);
        let mut plan = Plan::new(self, &shuffled, n.div_ceil(b));
        for t in 0..plan.batches {
            let size = b.min(n - t * b);
            let start = plan.order.len();
            let mut covered = vec![false; self.n_classes];
            for c in plan.rarest_first() {
                if plan.order.len() - start == size {
                    break;
                }
                if covered[c] || !plan.due(c, t) {
                    continue;
                }
                let holders = plan.holders[c].clone();
                if let Some(i) = plan.least_needed(holders.into_iter(), t, &covered) {
                    plan.take(i, &mut covered);
                }
            }
            // The rest of the batch, from every unused sample.
            while plan.order.len() - start < size {
                let Some(i) = plan.least_needed(shuffled.iter().copied(), t, &covered) else {
                    break;
                };
                plan.take(i, &mut covered);
            }
        }
        plan.order
    }
}

/// The state of [`ClassPresence::order`] while it fills an epoch's batches.
struct Plan<'a> {
    presence: &'a ClassPresence,
    batches: usize,
    /// Samples holding each class, in shuffled order.
    holders: Vec<Vec<usize>>,
    /// Samples of each class in the epoch, and those not placed yet.
    count: Vec<usize>,
    left: Vec<usize>,
    used: Vec<bool>,
    order: Vec<usize>,
}

impl<'a> Plan<'a> {
    fn new(presence: &'a ClassPresence, shuffled: &[usize], batches: usize) -> Self {
        let mut holders: Vec<Vec<usize>> = vec![Vec::new(); presence.n_classes];
        for &i in shuffled {
            for &c in &presence.samples[i] {
                holders[c as usize].push(i);
            }
        }
        let count: Vec<usize> = holders.iter().map(Vec::len).collect();
        Self {
            presence,
            batches,
            left: count.clone(),
            count,
            holders,
            used: vec![false; shuffled.len()],
            order: Vec::with_capacity(shuffled.len()),
        }
    }

    /// The classes some sample holds, rarest first (ties by class id).
    fn rarest_first(&self) -> Vec<usize> {
        let mut classes: Vec<usize> = (0..self.count.len())
            .filter(|&c| self.count[c] > 0)
            .collect();
        classes.sort_by_key(|&c| (self.count[c], c));
        classes
    }

    /// Whether class `c` belongs in batch `t`: in every batch when it has an image for
    /// each, else in `count` batches spread evenly.
    fn due(&self, c: usize, t: usize) -> bool {
        let (m, n) = (self.count[c], self.batches);
        m >= n || (t + 1) * m / n > t * m / n
    }

    /// The batches after `t` in which class `c` is due.
    fn due_after(&self, c: usize, t: usize) -> usize {
        let (m, n) = (self.count[c], self.batches);
        if m >= n {
            n - t - 1
        } else {
            m - (t + 1) * m / n
        }
    }

    /// Of the unused samples among `candidates` (in shuffled order), the first that holds
    /// the fewest classes whose remaining images the batches after `t` all need (a class
    /// this batch still lacks and is due does not count: placing it here is what is
    /// wanted).
    fn least_needed(
        &self,
        candidates: impl Iterator<Item = usize>,
        t: usize,
        covered: &[bool],
    ) -> Option<usize> {
        let spare: Vec<bool> = (0..self.count.len())
            .map(|c| {
                let wanted_here = !covered[c] && self.count[c] > 0 && self.due(c, t);
                wanted_here || self.left[c] > self.due_after(c, t)
            })
            .collect();
        let needed = |i: usize| {
            (self.presence.samples[i].iter())
                .filter(|&&k| !spare[k as usize])
                .count()
        };
        candidates
            .filter(|&i| !self.used[i])
            .min_by_key(|&i| needed(i))
    }

    /// Places sample `i` next, in the batch whose classes are `covered`.
    fn take(&mut self, i: usize, covered: &mut [bool]) {
        self.used[i] = true;
        self.order.push(i);
        for &k in &self.presence.samples[i] {
            self.left[k as usize] -= 1;
            covered[k as usize] = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// For each batch of `order`, whether it holds each class.
    fn coverage(p: &ClassPresence, order: &[usize], b: usize) -> Vec<Vec<bool>> {
        order
            .chunks(b)
            .map(|batch| {
                let mut has = vec![false; p.n_classes];
                for &i in batch {
                    for &c in p.classes(i) {
                        has[c as usize] = true;
                    }
                }
                has
            })
            .collect()
    }

    #[test]
    fn every_sample_once_and_every_class_in_every_batch_when_possible() {
        // 24 samples, 6 batches of 4: class 0 everywhere, classes 1-3 in 6 samples each
        // (enough for every batch), class 4 in 3 samples (every other batch at best).
        let samples: Vec<Vec<u32>> = (0..24u32)
            .map(|i| {
                let mut s = vec![0, 1 + i % 3];
                if i % 8 == 5 {
                    s.push(4);
                }
                s
            })
            .collect();
        let p = ClassPresence::new(samples, 5);
        for seed in 0..40 {
            let order = p.order(4, &mut rng(seed));
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..24).collect::<Vec<_>>(), "a permutation");
            let cov = coverage(&p, &order, 4);
            for (t, has) in cov.iter().enumerate() {
                assert!(
                    has[..4].iter().all(|&h| h),
                    "seed {seed}, batch {t}: {has:?}"
                );
            }
            // Class 4's three images are in three different batches.
            assert_eq!(cov.iter().filter(|h| h[4]).count(), 3, "seed {seed}");
        }
    }

    #[test]
    fn rare_classes_are_spread_where_a_shuffle_clumps_them() {
        // 40 samples of 10 batches; class 1 in 10 samples, class 2 in 5.
        let samples: Vec<Vec<u32>> = (0..40u32)
            .map(|i| match i {
                0..=9 => vec![0, 1],
                10..=14 => vec![0, 2],
                _ => vec![0],
            })
            .collect();
        let p = ClassPresence::new(samples, 3);
        let order = p.order(4, &mut rng(3));
        let cov = coverage(&p, &order, 4);
        assert!(cov.iter().all(|h| h[0] && h[1]), "{cov:?}");
        assert_eq!(cov.iter().filter(|h| h[2]).count(), 5);
        // Spread evenly: no two consecutive batches both hold class 2.
        assert!(cov.windows(2).all(|w| !(w[0][2] && w[1][2])), "{cov:?}");
    }

    #[test]
    fn the_order_depends_on_the_seed_only() {
        let samples: Vec<Vec<u32>> = (0..30u32).map(|i| vec![i % 4, 4 + i % 3]).collect();
        let p = ClassPresence::new(samples, 7);
        assert_eq!(p.order(5, &mut rng(9)), p.order(5, &mut rng(9)));
        assert_ne!(p.order(5, &mut rng(9)), p.order(5, &mut rng(10)));
    }

    #[test]
    fn odd_sizes_and_empty_masks() {
        let p = ClassPresence::new(vec![vec![], vec![2, 2, 9], vec![1], vec![], vec![0]], 3);
        assert_eq!(p.classes(1), &[2]);
        for b in [1, 2, 3, 5, 8] {
            let mut order = p.order(b, &mut rng(1));
            order.sort_unstable();
            assert_eq!(order, vec![0, 1, 2, 3, 4], "batch size {b}");
        }
        assert!(ClassPresence::new(Vec::new(), 3)
            .order(4, &mut rng(0))
            .is_empty());
        assert_eq!(ClassPresence::of_mask(&[2, 255, 0, 2], 3), vec![0, 2]);
    }
}
