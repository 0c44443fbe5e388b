//! How many pixels of a group hold each label: the foreground counts `G` of the jobs,
//! and which classes are present.

use rayon::prelude::*;

/// How many of `labels` hold each value below `n_values` (void and larger values are not
/// counted), on all threads.
pub(crate) fn count_labels(labels: &[u32], n_values: usize) -> Vec<u64> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::VOID;

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
}
