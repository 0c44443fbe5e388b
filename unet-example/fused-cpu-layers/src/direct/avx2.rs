//! The AVX2 + FMA kernels: register tiles of [`OT`] output channels × 3 vectors of 8
//! pixels, masked tails.

use std::arch::x86_64::*;

use super::{Geometry, OT};

/// A lane mask selecting the first `lanes` of 8.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn lane_mask(lanes: usize) -> __m256i {
    let lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), lane_ids)
}

/// 8 values from `p`, or with `MASKED` the lanes `mask` selects (the rest 0, their
/// memory not read).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load<const MASKED: bool>(p: *const f32, mask: __m256i) -> __m256 {
    if MASKED {
        _mm256_maskload_ps(p, mask)
    } else {
        _mm256_loadu_ps(p)
    }
}

/// One output row of OT channels: `out` at `(channel 0 of the tile, b, y, 0)`,
/// `x_row` the padded input from `(channel 0, b, y, 0)` in padded coordinates (the
/// top-left tap of pixel 0), `weights` the tile's `[C][9][OT]`.
///
/// # Safety
/// AVX2 and FMA are available; `out` is valid for `OT` rows of `width` values
/// `out_stride` apart, and `x_row` holds `channels` padded planes.
pub unsafe fn row(out: *mut f32, x_row: &[f32], weights: &[f32], g: Geometry, width: usize) {
    let need = (g.channels - 1) * g.channel_stride + 2 * g.row_stride + width + 2;
    assert!(x_row.len() >= need && weights.len() >= g.channels * 9 * OT);
    let (x, w) = (x_row.as_ptr(), weights.as_ptr());
    let mut x0 = 0;
    while x0 + 24 <= width {
        tile::<3, false>(out.add(x0), x.add(x0), w, g, 8);
        x0 += 24;
    }
    while x0 + 8 <= width {
        tile::<1, false>(out.add(x0), x.add(x0), w, g, 8);
        x0 += 8;
    }
    if x0 < width {
        tile::<1, true>(out.add(x0), x.add(x0), w, g, width - x0);
    }
}

/// OT channels × XV vectors of 8 pixels (with `MASKED`, one vector of its first
/// `lanes` pixels), summed over channels and the 9 taps in registers.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const XV: usize, const MASKED: bool>(
    out: *mut f32,
    x: *const f32,
    w: *const f32,
    g: Geometry,
    lanes: usize,
) {
    let mask = lane_mask(lanes);
    let mut acc = [[_mm256_setzero_ps(); XV]; OT];
    for ci in 0..g.channels {
        let xc = x.add(ci * g.channel_stride);
        let wc = w.add(ci * 9 * OT);
        for ky in 0..3 {
            let xr = xc.add(ky * g.row_stride);
            for kx in 0..3 {
                let mut xv = [_mm256_setzero_ps(); XV];
                for (v, xv) in xv.iter_mut().enumerate() {
                    *xv = load::<MASKED>(xr.add(kx + 8 * v), mask);
                }
                let wk = wc.add((ky * 3 + kx) * OT);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let wt = _mm256_broadcast_ss(&*wk.add(t));
                    for v in 0..XV {
                        acc[v] = _mm256_fmadd_ps(xv[v], wt, acc[v]);
                    }
                }
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        for (v, a) in acc.iter().enumerate() {
            let p = out.add(t * g.out_stride + 8 * v);
            if MASKED {
                _mm256_maskstore_ps(p, mask, *a);
            } else {
                _mm256_storeu_ps(p, *a);
            }
        }
    }
}

/// `Σ_{b,y,x} g[t, b, y, x] · xp[b, y + ky, x + kx]` for the OT channels `t` of `g`
/// (`[OT, B, H, W]`) and one input channel's padded planes `xp` (`[B, H + 2, W + 2]`),
/// laid out `[t][ky][kx]`.
///
/// # Safety
/// AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tap_sums(g: &[f32], xp: &[f32], (b, h, w): (usize, usize, usize)) -> [f32; 9 * OT] {
    let (n, wp) = (b * h * w, w + 2);
    let plane = (h + 2) * wp;
    assert!(g.len() >= OT * n && xp.len() >= b * plane);
    let (gp, xpp) = (g.as_ptr(), xp.as_ptr());
    let full = w / 8 * 8;
    let mask = lane_mask(w - full);
    let mut out = [0f32; 9 * OT];
    for ky in 0..3 {
        let mut acc = [[_mm256_setzero_ps(); 3]; OT];
        for bi in 0..b {
            for y in 0..h {
                let g_row = gp.add((bi * h + y) * w);
                let x_row = xpp.add(bi * plane + (y + ky) * wp);
                let mut x0 = 0;
                while x0 < full {
                    step::<false>(&mut acc, g_row.add(x0), n, x_row.add(x0), mask);
                    x0 += 8;
                }
                if x0 < w {
                    step::<true>(&mut acc, g_row.add(x0), n, x_row.add(x0), mask);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (kx, a) in acc.iter().enumerate() {
                out[t * 9 + ky * 3 + kx] = hsum(*a);
            }
        }
    }
    out
}

/// One vector of 8 pixels (the first `mask` lanes with `MASKED`): `acc[t][kx] +=
/// g[t] · x[kx]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn step<const MASKED: bool>(
    acc: &mut [[__m256; 3]; OT],
    g: *const f32,
    g_stride: usize,
    x: *const f32,
    mask: __m256i,
) {
    let xv = [
        load::<MASKED>(x, mask),
        load::<MASKED>(x.add(1), mask),
        load::<MASKED>(x.add(2), mask),
    ];
    for (t, acc) in acc.iter_mut().enumerate() {
        let gv = load::<MASKED>(g.add(t * g_stride), mask);
        for kx in 0..3 {
            acc[kx] = _mm256_fmadd_ps(gv, xv[kx], acc[kx]);
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}
