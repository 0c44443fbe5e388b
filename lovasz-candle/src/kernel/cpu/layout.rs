//! The kernel's output in the input's layout: the jobs write channels-first rows (each
//! a contiguous slice, where the walk's writes in sorted order stay within one row), and
//! a channels-last call gets them transposed once at the end, in blocks of pixels that
//! stay in cache.

use rayon::prelude::*;

use super::buffer::{zeroed, ZeroBits};

/// Pixels per block of the transpose: `PIXELS × C` values read and written in cache.
const PIXELS: usize = 256;

/// `values` (`[B, C, S]`, `dims = (B, C, S)`) as `[B, S, C]`, one image per rayon task.
pub(crate) fn to_channels_last<T: ZeroBits + Send + Sync>(
    values: &[T],
    (_, c_n, s_n): (usize, usize, usize),
) -> Vec<T> {
    let mut out = zeroed::<T>(values.len());
    if values.is_empty() {
        return out;
    }
    out.par_chunks_mut(c_n * s_n)
        .zip(values.par_chunks(c_n * s_n))
        .for_each(|(out, image)| {
            for (block, out) in out.chunks_mut(PIXELS * c_n).enumerate() {
                let first = block * PIXELS;
                for c in 0..c_n {
                    let row = &image[c * s_n + first..][..out.len() / c_n];
                    for (o, &v) in out[c..].iter_mut().step_by(c_n).zip(row) {
                        *o = v;
                    }
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_every_value() {
        for (b, c, s) in [(1, 1, 1), (2, 3, 5), (3, 7, PIXELS * 2 + 13), (2, 20, 600)] {
            let first: Vec<f32> = (0..b * c * s).map(|i| i as f32).collect();
            let last = to_channels_last(&first, (b, c, s));
            for (bi, ci, si) in
                (0..b).flat_map(|bi| (0..c).flat_map(move |ci| (0..s).map(move |si| (bi, ci, si))))
            {
                assert_eq!(last[(bi * s + si) * c + ci], first[(bi * c + ci) * s + si]);
            }
        }
        assert!(to_channels_last::<f64>(&[], (0, 3, 4)).is_empty());
    }
}
