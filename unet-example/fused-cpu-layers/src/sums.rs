//! Sums over f32 slices that vectorise: a plain running sum is one dependency chain the
//! compiler may not reorder, so it adds one value at a time. Here each of 8 lanes sums
//! in f32 over blocks of at most 2048 values, and the blocks' lane totals add up in f64.

/// Values per f32 block (256 per lane).
const BLOCK: usize = 2048;

/// `Σ_i f(x[i], y[i])` for each of the `K` outputs of `f`, `x` and `y` of one length.
pub(crate) fn lane_sums<const K: usize>(
    x: &[f32],
    y: &[f32],
    f: impl Fn(f32, f32) -> [f32; K],
) -> [f64; K] {
    debug_assert_eq!(x.len(), y.len());
    let mut total = [0f64; K];
    for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
        let mut acc = [[0f32; 8]; K];
        let (xc, yc) = (xb.chunks_exact(8), yb.chunks_exact(8));
        let (xr, yr) = (xc.remainder(), yc.remainder());
        for (xs, ys) in xc.zip(yc) {
            for j in 0..8 {
                let v = f(xs[j], ys[j]);
                for k in 0..K {
                    acc[k][j] += v[k];
                }
            }
        }
        for k in 0..K {
            total[k] += acc[k].iter().map(|&a| a as f64).sum::<f64>();
        }
        for (&a, &b) in xr.iter().zip(yr) {
            let v = f(a, b);
            for k in 0..K {
                total[k] += v[k] as f64;
            }
        }
    }
    total
}

/// `Σ f(v)` over `x`.
pub(crate) fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    lane_sums(x, x, |v, _| [f(v)])[0]
}

/// `Σ a[i]·b[i]`.
pub(crate) fn lane_dot(a: &[f32], b: &[f32]) -> f64 {
    lane_sums(a, b, |x, y| [x * y])[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_sums_match_plain_sums() {
        // Longer than a block, not a multiple of 8.
        let a: Vec<f32> = (0..5001).map(|i| (i % 97) as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..5001).map(|i| (i % 5) as f32).collect();
        let plain: f64 = a.iter().map(|&v| v as f64).sum();
        assert!((lane_sum(&a, |v| v) - plain).abs() < 1e-6 * plain.abs().max(1.0));
        let dot: f64 = a.iter().zip(&b).map(|(&x, &y)| (x * y) as f64).sum();
        assert!((lane_dot(&a, &b) - dot).abs() < 1e-6 * dot.abs().max(1.0));
        let [s, q] = lane_sums(&a, &b, |x, y| [x, x * y]);
        assert!((s - plain).abs() < 1e-6 * plain.abs().max(1.0));
        assert!((q - dot).abs() < 1e-6 * dot.abs().max(1.0));
    }
}
