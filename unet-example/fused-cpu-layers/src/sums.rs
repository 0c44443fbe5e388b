//! Sums over f32 slices that vectorise: a plain running sum is one dependency chain the
//! compiler may not reorder, so it adds one value at a time. Here each of 8 lanes sums
//! in f32 over blocks of at most 2048 values, and the blocks' lane totals add up in f64.
//!
//! [`lane_dots4`] gives four such dot products that share one operand, each bit for bit
//! what [`lane_dot`] gives, with AVX2 where the CPU has it (the same f32 products and
//! sums in the same order, four dots side by side; no fused multiply-add).

/// Values per f32 block (256 per lane).
const BLOCK: usize = 2048;

/// `Σ_i f(x[i], y[i])` for each of the `K` outputs of `f`, `x` and `y` of one length.
/// Inlined, so that a caller compiled for AVX2 ([`super::simd::vectorised`]) widens it.
#[inline(always)]
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
            // From −0.0, as `Iterator::sum` of f64 does: the exact value of lane 0 first.
            total[k] += acc[k].iter().fold(-0.0, |s, &a| s + a as f64);
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
#[inline(always)]
pub(crate) fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    lane_sums(x, x, |v, _| [f(v)])[0]
}

/// `Σ a[i]·b[i]`.
#[inline(always)]
pub(crate) fn lane_dot(a: &[f32], b: &[f32]) -> f64 {
    lane_sums(a, b, |x, y| [x * y])[0]
}

/// `[lane_dot(shared, rows[t]) for t in 0..4]`, bit for bit, for slices of one length:
/// a function chosen once for this CPU (AVX2, else the portable loop; see
/// [`super::simd`]), to call per row.
pub(crate) fn lane_dots4() -> fn(&[f32], [&[f32]; 4]) -> [f64; 4] {
    #[cfg(target_arch = "x86_64")]
    if super::simd::use_avx2() {
        // SAFETY: AVX2 is available.
        return |shared, rows| unsafe { avx2::lane_dots4(shared, rows) };
    }
    lane_dots4_portable
}

/// `v` where `open`, else `+0.0` (`if open { v } else { 0.0 }`, as a bit mask).
#[inline(always)]
pub(crate) fn pass_if(open: bool, v: f32) -> f32 {
    f32::from_bits(v.to_bits() & (open as u32).wrapping_neg())
}

/// The sums of batch norm + ReLU's backward pass over one channel: with `gy = g` where
/// `x·s + t > 0` (the ReLU was open), else 0, `[Σ gy, Σ gy·(x − mean)]`, bit for bit as
/// [`lane_sums`] gives them, with AVX2 where it is in use (the compiler leaves the
/// closure's select scalar and branchy).
pub(crate) fn relu_grad_sums(x: &[f32], g: &[f32], (s, t, mean): (f32, f32, f32)) -> [f64; 2] {
    #[cfg(target_arch = "x86_64")]
    if super::simd::use_avx2() {
        // SAFETY: AVX2 is available.
        return unsafe { avx2::relu_grad_sums(x, g, (s, t, mean)) };
    }
    relu_grad_sums_portable(x, g, (s, t, mean))
}

fn relu_grad_sums_portable(x: &[f32], g: &[f32], (s, t, mean): (f32, f32, f32)) -> [f64; 2] {
    lane_sums(x, g, |v, dy| {
        let gy = pass_if(v * s + t > 0.0, dy);
        [gy, gy * (v - mean)]
    })
}

/// [`lane_dots4`] without vector intrinsics.
fn lane_dots4_portable(shared: &[f32], rows: [&[f32]; 4]) -> [f64; 4] {
    rows.map(|r| lane_dot(r, shared))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::BLOCK;

    /// A block's 8 lane sums added in f64 as [`super::lane_sums`] does: from −0.0,
    /// lane 0 first.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn block_total(acc: __m256) -> f64 {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes.iter().fold(-0.0, |s, &a| s + a as f64)
    }

    /// [`super::relu_grad_sums`] with AVX2.
    ///
    /// # Safety
    /// AVX2 is available.
    #[target_feature(enable = "avx2")]
    pub unsafe fn relu_grad_sums(x: &[f32], g: &[f32], (s, t, mean): (f32, f32, f32)) -> [f64; 2] {
        let n = x.len();
        assert_eq!(g.len(), n, "relu_grad_sums: slices of one length");
        let (xp, gp) = (x.as_ptr(), g.as_ptr());
        let (sv, tv, mv, zero) = (
            _mm256_set1_ps(s),
            _mm256_set1_ps(t),
            _mm256_set1_ps(mean),
            _mm256_setzero_ps(),
        );
        let mut total = [0f64; 2];
        let mut start = 0;
        while start < n {
            let end = (start + BLOCK).min(n);
            let full = start + (end - start) / 8 * 8;
            let (mut a0, mut a1) = (zero, zero);
            let mut i = start;
            while i < full {
                let v = _mm256_loadu_ps(xp.add(i));
                let open =
                    _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_add_ps(_mm256_mul_ps(v, sv), tv), zero);
                let gy = _mm256_and_ps(open, _mm256_loadu_ps(gp.add(i)));
                a0 = _mm256_add_ps(a0, gy);
                a1 = _mm256_add_ps(a1, _mm256_mul_ps(gy, _mm256_sub_ps(v, mv)));
                i += 8;
            }
            total[0] += block_total(a0);
            total[1] += block_total(a1);
            for i in full..end {
                let (v, dy) = (*xp.add(i), *gp.add(i));
                let gy = super::pass_if(v * s + t > 0.0, dy);
                total[0] += gy as f64;
                total[1] += (gy * (v - mean)) as f64;
            }
            start = end;
        }
        total
    }

    /// [`super::lane_dots4`] with AVX2: the four dots' 8 lane sums in four registers,
    /// then each block's lanes transposed so that one f64 add per lane serves all four.
    ///
    /// # Safety
    /// AVX2 is available.
    #[target_feature(enable = "avx2")]
    pub unsafe fn lane_dots4(shared: &[f32], rows: [&[f32]; 4]) -> [f64; 4] {
        let n = shared.len();
        assert!(
            rows.iter().all(|r| r.len() == n),
            "lane_dots4: slices of one length"
        );
        let (x, g) = (shared.as_ptr(), rows.map(|r| r.as_ptr()));
        let mut total = _mm256_setzero_pd();
        let mut start = 0;
        while start < n {
            let end = (start + BLOCK).min(n);
            let full = start + (end - start) / 8 * 8;
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = start;
            while i < full {
                let xv = _mm256_loadu_ps(x.add(i));
                for (a, g) in acc.iter_mut().zip(g) {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(_mm256_loadu_ps(g.add(i)), xv));
                }
                i += 8;
            }
            // cols[j] = lane j of the four dots, as f64: the block's lane totals.
            let lo01 = _mm256_unpacklo_ps(acc[0], acc[1]);
            let hi01 = _mm256_unpackhi_ps(acc[0], acc[1]);
            let lo23 = _mm256_unpacklo_ps(acc[2], acc[3]);
            let hi23 = _mm256_unpackhi_ps(acc[2], acc[3]);
            // Lanes (0, 4), (1, 5), (2, 6), (3, 7) in the low and high halves.
            let pairs = [
                _mm256_shuffle_ps::<0x44>(lo01, lo23),
                _mm256_shuffle_ps::<0xee>(lo01, lo23),
                _mm256_shuffle_ps::<0x44>(hi01, hi23),
                _mm256_shuffle_ps::<0xee>(hi01, hi23),
            ];
            let mut cols = [_mm256_setzero_pd(); 8];
            for (j, p) in pairs.iter().enumerate() {
                cols[j] = _mm256_cvtps_pd(_mm256_castps256_ps128(*p));
                cols[j + 4] = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(*p));
            }
            let mut s = _mm256_set1_pd(-0.0);
            for c in cols {
                s = _mm256_add_pd(s, c);
            }
            total = _mm256_add_pd(total, s);
            for i in full..end {
                let gv = _mm_setr_ps(*g[0].add(i), *g[1].add(i), *g[2].add(i), *g[3].add(i));
                let p = _mm_mul_ps(gv, _mm_set1_ps(*x.add(i)));
                total = _mm256_add_pd(total, _mm256_cvtps_pd(p));
            }
            start = end;
        }
        let mut out = [0f64; 4];
        _mm256_storeu_pd(out.as_mut_ptr(), total);
        out
    }
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

    /// Signed values of `k` magnitudes, below 2^(k − 2) in size, so that rounding shows,
    /// from a 64-bit LCG started at `seed`.
    fn values(mut seed: u64, k: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * (1u64 << (seed % k)) as f32
        }
    }

    #[test]
    fn lane_dots4_are_lane_dots_bit_for_bit() {
        let mut next = values(7, 9);
        for n in [
            0, 1, 3, 7, 8, 9, 12, 24, 48, 61, 2047, 2048, 2049, 4100, 10752,
        ] {
            let shared: Vec<f32> = (0..n).map(|_| next()).collect();
            let rows: Vec<Vec<f32>> = (0..4).map(|_| (0..n).map(|_| next()).collect()).collect();
            let rows = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
            let want = rows.map(|r| lane_dot(r, &shared).to_bits());
            assert_eq!(
                lane_dots4_portable(&shared, rows).map(f64::to_bits),
                want,
                "n {n}"
            );
            assert_eq!(lane_dots4()(&shared, rows).map(f64::to_bits), want, "n {n}");
        }
        #[cfg(target_arch = "x86_64")]
        if !crate::simd::use_avx2() {
            eprintln!("lane_dots4: AVX2 is not in use here; only the portable path was checked");
        }
    }

    #[test]
    fn relu_grad_sums_are_lane_sums_bit_for_bit() {
        let mut next = values(11, 7);
        for n in [0, 1, 7, 8, 9, 61, 2047, 2048, 2049, 5000, 43008] {
            let x: Vec<f32> = (0..n).map(|_| next()).collect();
            let mut g: Vec<f32> = (0..n).map(|_| next()).collect();
            if n > 3 {
                // A NaN gradient where the ReLU is shut must not leak; −0.0 kept.
                g[1] = f32::NAN;
                g[2] = -0.0;
            }
            let params = (0.7, -0.1, 0.05);
            let want = relu_grad_sums_portable(&x, &g, params).map(f64::to_bits);
            let got = relu_grad_sums(&x, &g, params).map(f64::to_bits);
            assert_eq!(got, want, "n {n}");
        }
        #[cfg(target_arch = "x86_64")]
        if !crate::simd::use_avx2() {
            eprintln!("relu_grad_sums: AVX2 is not in use here; only the portable path ran");
        }
    }
}
