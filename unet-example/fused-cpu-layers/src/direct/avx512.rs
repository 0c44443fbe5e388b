//! The AVX-512 kernels: the AVX2 ones at twice the width, register tiles of [`OT`] output
//! channels × 3 vectors of 16 pixels, and masked tails from AVX-512's lane masks (whose
//! masked-off lanes are neither read nor written).

use std::arch::x86_64::*;

use super::{Geometry, OT};

/// A mask of the first `lanes` of 16.
#[inline]
fn lane_mask(lanes: usize) -> __mmask16 {
    if lanes >= 16 {
        0xffff
    } else {
        ((1u32 << lanes) - 1) as __mmask16
    }
}

/// 16 values from `p`, or with `MASKED` the lanes of `mask` (the rest 0).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load<const MASKED: bool>(p: *const f32, mask: __mmask16) -> __m512 {
    if MASKED {
        _mm512_maskz_loadu_ps(mask, p)
    } else {
        _mm512_loadu_ps(p)
    }
}

/// One output row of OT channels, as `avx2::row` (same arguments).
///
/// # Safety
/// AVX-512F is available; `out` is valid for `OT` rows of `width` values `out_stride`
/// apart, and `x_row` holds `channels` padded planes.
#[target_feature(enable = "avx512f")]
pub unsafe fn row(out: *mut f32, x_row: &[f32], weights: &[f32], g: Geometry, width: usize) {
    let need = (g.channels - 1) * g.channel_stride + 2 * g.row_stride + width + 2;
    assert!(x_row.len() >= need && weights.len() >= g.channels * 9 * OT);
    let (x, w) = (x_row.as_ptr(), weights.as_ptr());
    let mut x0 = 0;
    while x0 + 48 <= width {
        tile::<3, false>(out.add(x0), x.add(x0), w, g, 0xffff);
        x0 += 48;
    }
    while x0 + 16 <= width {
        tile::<1, false>(out.add(x0), x.add(x0), w, g, 0xffff);
        x0 += 16;
    }
    if x0 < width {
        tile::<1, true>(out.add(x0), x.add(x0), w, g, lane_mask(width - x0));
    }
}

/// OT channels × XV vectors of 16 pixels (with `MASKED`, one vector of the lanes of
/// `mask`), summed over channels and the 9 taps in registers.
#[target_feature(enable = "avx512f")]
unsafe fn tile<const XV: usize, const MASKED: bool>(
    out: *mut f32,
    x: *const f32,
    w: *const f32,
    g: Geometry,
    mask: __mmask16,
) {
    let mut acc = [[_mm512_setzero_ps(); XV]; OT];
    for ci in 0..g.channels {
        let xc = x.add(ci * g.channel_stride);
        let wc = w.add(ci * 9 * OT);
        for ky in 0..3 {
            let xr = xc.add(ky * g.row_stride);
            for kx in 0..3 {
                let mut xv = [_mm512_setzero_ps(); XV];
                for (v, xv) in xv.iter_mut().enumerate() {
                    *xv = load::<MASKED>(xr.add(kx + 16 * v), mask);
                }
                let wk = wc.add((ky * 3 + kx) * OT);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let wt = _mm512_set1_ps(*wk.add(t));
                    for v in 0..XV {
                        acc[v] = _mm512_fmadd_ps(xv[v], wt, acc[v]);
                    }
                }
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        for (v, a) in acc.iter().enumerate() {
            let p = out.add(t * g.out_stride + 16 * v);
            if MASKED {
                _mm512_mask_storeu_ps(p, mask, *a);
            } else {
                _mm512_storeu_ps(p, *a);
            }
        }
    }
}

/// The kernel gradient's tap sums, as `avx2::tap_sums` (same arguments and result).
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
pub unsafe fn tap_sums(g: &[f32], xp: &[f32], (b, h, w): (usize, usize, usize)) -> [f32; 9 * OT] {
    let (n, wp) = (b * h * w, w + 2);
    let plane = (h + 2) * wp;
    assert!(g.len() >= OT * n && xp.len() >= b * plane);
    let (gp, xpp) = (g.as_ptr(), xp.as_ptr());
    let full = w / 16 * 16;
    let mask = lane_mask(w - full);
    let mut out = [0f32; 9 * OT];
    for ky in 0..3 {
        let mut acc = [[_mm512_setzero_ps(); 3]; OT];
        for bi in 0..b {
            for y in 0..h {
                let g_row = gp.add((bi * h + y) * w);
                let x_row = xpp.add(bi * plane + (y + ky) * wp);
                let mut x0 = 0;
                while x0 < full {
                    step::<false>(&mut acc, g_row.add(x0), n, x_row.add(x0), mask);
                    x0 += 16;
                }
                if x0 < w {
                    step::<true>(&mut acc, g_row.add(x0), n, x_row.add(x0), mask);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (kx, a) in acc.iter().enumerate() {
                out[t * 9 + ky * 3 + kx] = _mm512_reduce_add_ps(*a);
            }
        }
    }
    out
}

/// One vector of 16 pixels (the lanes of `mask` with `MASKED`): `acc[t][kx] += g[t] ·
/// x[kx]`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn step<const MASKED: bool>(
    acc: &mut [[__m512; 3]; OT],
    g: *const f32,
    g_stride: usize,
    x: *const f32,
    mask: __mmask16,
) {
    let xv = [
        load::<MASKED>(x, mask),
        load::<MASKED>(x.add(1), mask),
        load::<MASKED>(x.add(2), mask),
    ];
    for (t, acc) in acc.iter_mut().enumerate() {
        let gv = load::<MASKED>(g.add(t * g_stride), mask);
        for kx in 0..3 {
            acc[kx] = _mm512_fmadd_ps(gv, xv[kx], acc[kx]);
        }
    }
}
