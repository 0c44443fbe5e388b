//! A direct 3×3 convolution (stride 1, zero padding 1) on `[C, B, H, W]` f32 slices
//! with AVX2 + FMA, without the 9× larger im2col buffer: each task computes 4 output
//! channels of one image, row by row, in register tiles of 4 channels × 24 pixels (3
//! vectors of 8; narrower tiles and a masked tail for the rest of a row), summing over
//! input channels and taps with the tile held in registers.
//!
//! The input is first copied into a zero-padded `[C, B, H + 2, W + 2]` buffer so that
//! every tap is a plain (unaligned) vector load; the kernel is repacked so that the 4
//! weights a tap multiplies are adjacent. [`conv3x3`] returns `None` where the kernel
//! does not apply (not x86-64, no AVX2 / FMA, output channels not a multiple of 4), and
//! the caller then takes the im2col + GEMM path.

use rayon::prelude::*;

use super::im2col::{copy, fill};

/// Output channels per task and per register tile.
const OT: usize = 4;

/// Whether the direct kernels apply to a convolution with `o` output channels here.
pub(crate) fn applies(o: usize) -> bool {
    o % OT == 0 && o > 0 && avx::available()
}

/// An input `[C, B, H, W]` zero-padded by one pixel on each side, `[C, B, H + 2, W + 2]`:
/// made once by the forward pass and kept for the kernel's gradient.
pub(crate) struct Padded {
    data: Vec<f32>,
    dims: (usize, usize, usize, usize),
}

impl Padded {
    /// Pads `x` `[C, B, H, W]` (`dims`), writing every value once.
    pub fn new(x: &[f32], (c, b, h, w): (usize, usize, usize, usize)) -> Self {
        let (hp, wp) = (h + 2, w + 2);
        let len = c * b * hp * wp;
        let mut data: Vec<f32> = Vec::with_capacity(len);
        if h * w > 0 {
            data.spare_capacity_mut()[..len]
                .par_chunks_mut(hp * wp)
                .zip(x.par_chunks(h * w))
                .for_each(|(dst, src)| {
                    fill(&mut dst[..wp], 0.0);
                    fill(&mut dst[(h + 1) * wp..], 0.0);
                    for y in 0..h {
                        let row = &mut dst[(y + 1) * wp..][..wp];
                        row[0].write(0.0);
                        row[wp - 1].write(0.0);
                        copy(&mut row[1..=w], &src[y * w..][..w]);
                    }
                });
        } else {
            fill(&mut data.spare_capacity_mut()[..len], 0.0);
        }
        // SAFETY: every plane's top and bottom rows, and each inner row's two edges and
        // `w` values, were written above: all `len` values.
        unsafe { data.set_len(len) };
        Padded {
            data,
            dims: (c, b, h, w),
        }
    }
}

/// `x` `[C, B, H, W]` (padded) ⊛ `kernel` `[O, C, 3, 3]` → `[O, B, H, W]`, or `None`
/// where the direct kernel does not apply.
pub(crate) fn conv3x3(x: &Padded, kernel: &[f32], o: usize) -> Option<Vec<f32>> {
    let (c, b, h, w) = x.dims;
    if !applies(o) || kernel.len() != o * c * 9 || b * h * w == 0 || c == 0 {
        return None;
    }
    let n = b * h * w;
    let (hp, wp) = (h + 2, w + 2);
    let xp = &x.data;
    // Weights as [O / OT][C][9][OT].
    let mut packed = vec![0f32; o * c * 9];
    for oc in 0..o {
        for ic in 0..c {
            for k in 0..9 {
                packed[((oc / OT * c + ic) * 9 + k) * OT + oc % OT] = kernel[(oc * c + ic) * 9 + k];
            }
        }
    }
    let mut out: Vec<f32> = Vec::with_capacity(o * n);
    let out_ptr = SharedOut(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let plane = hp * wp;
    (0..(o / OT) * b).into_par_iter().for_each(|task| {
        let (tile, bi) = (task / b, task % b);
        let weights = &packed[tile * c * 9 * OT..][..c * 9 * OT];
        let geometry = Geometry {
            channel_stride: b * plane,
            row_stride: wp,
            out_stride: n,
            channels: c,
        };
        for y in 0..h {
            let x_row = &xp[bi * plane + y * wp..];
            // SAFETY: each task writes the rows `(bi, y)` of its own OT output channels
            // `tile·OT ..`, disjoint from every other task's; `avx::available()` holds.
            unsafe {
                let out_row = out_ptr.get().add((tile * OT * b + bi) * h * w + y * w);
                avx::row(out_row, x_row, weights, geometry, w);
            }
        }
    });
    // SAFETY: the tasks wrote every row of every output channel (each row in full: 24-
    // and 8-pixel tiles, then a masked tail).
    unsafe { out.set_len(o * n) };
    Some(out)
}

/// The kernel's gradient of the convolution of `x` `[C, B, H, W]` whose output's
/// gradient is `grad` `[O, B, H, W]`: `∂L/∂w[o, c, ky, kx] = Σ_{b,y,x} grad[o, b, y, x] ·
/// x[c, b, y + ky − 1, x + kx − 1]` `[O, C, 3, 3]`, or `None` where the direct kernel does
/// not apply. One task per (4 output channels, input channel) pair; each sums over all
/// pixels in 4 × 3 vector accumulators (channels × horizontal taps) per kernel row.
pub(crate) fn kernel_grad(x: &Padded, grad: &[f32], o: usize) -> Option<Vec<f32>> {
    let (c, b, h, w) = x.dims;
    let n = b * h * w;
    if !applies(o) || grad.len() != o * n || n == 0 {
        return None;
    }
    let xp = &x.data;
    let plane = (h + 2) * (w + 2);
    let sums: Vec<[f32; 9 * OT]> = (0..(o / OT) * c)
        .into_par_iter()
        .map(|task| {
            let (tile, ci) = (task / c, task % c);
            let g = &grad[tile * OT * n..][..OT * n];
            let x_planes = &xp[ci * b * plane..][..b * plane];
            // SAFETY: `avx::available()` holds; the slices hold the OT gradient channels
            // and the b padded planes that `tap_sums` reads.
            unsafe { avx::tap_sums(g, x_planes, (b, h, w)) }
        })
        .collect();
    let mut dw = vec![0f32; o * c * 9];
    for (task, s) in sums.iter().enumerate() {
        let (tile, ci) = (task / c, task % c);
        for t in 0..OT {
            dw[((tile * OT + t) * c + ci) * 9..][..9].copy_from_slice(&s[t * 9..][..9]);
        }
    }
    Some(dw)
}

/// Strides of the padded input and the output, and the input channel count (read by
/// the x86-64 kernels only).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Geometry {
    /// Between input channels in the padded buffer.
    pub channel_stride: usize,
    /// Between rows of the padded buffer (`W + 2`).
    pub row_stride: usize,
    /// Between output channels (`B·H·W`).
    pub out_stride: usize,
    /// Input channels summed over.
    pub channels: usize,
}

/// The output buffer, written by tasks at disjoint positions.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: the tasks that share it write disjoint elements only (see `conv3x3`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{Geometry, OT};

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

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
    pub unsafe fn tap_sums(
        g: &[f32],
        xp: &[f32],
        (b, h, w): (usize, usize, usize),
    ) -> [f32; 9 * OT] {
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
}

#[cfg(not(target_arch = "x86_64"))]
mod avx {
    pub fn available() -> bool {
        false
    }

    use super::Geometry;

    pub unsafe fn row(_: *mut f32, _: &[f32], _: &[f32], _: Geometry, _: usize) {
        unreachable!("the direct convolution is only dispatched where available() holds")
    }

    pub unsafe fn tap_sums(_: &[f32], _: &[f32], _: (usize, usize, usize)) -> [f32; 9 * super::OT] {
        unreachable!("the direct convolution is only dispatched where available() holds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        x: &[f32],
        (c, b, h, w): (usize, usize, usize, usize),
        k: &[f32],
        o: usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; o * b * h * w];
        for oc in 0..o {
            for bi in 0..b {
                for y in 0..h {
                    for xx in 0..w {
                        let mut s = 0f64;
                        for ic in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (sy, sx) = (y + ky, xx + kx);
                                    if sy < 1 || sy > h || sx < 1 || sx > w {
                                        continue;
                                    }
                                    let v = x[((ic * b + bi) * h + sy - 1) * w + sx - 1];
                                    s += (v * k[((oc * c + ic) * 3 + ky) * 3 + kx]) as f64;
                                }
                            }
                        }
                        out[((oc * b + bi) * h + y) * w + xx] = s as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn direct_convolution_matches_a_naive_loop() {
        // Widths with full 24-pixel tiles, 8-pixel tiles and masked tails; one channel.
        for (c, b, h, w, o) in [
            (3, 2, 5, 37, 8),
            (1, 1, 3, 5, 4),
            (5, 3, 4, 24, 12),
            (2, 1, 1, 1, 4),
        ] {
            let x: Vec<f32> = (0..c * b * h * w)
                .map(|i| (i as f32 * 0.61).sin())
                .collect();
            let k: Vec<f32> = (0..o * c * 9).map(|i| (i as f32 * 0.37).cos()).collect();
            let want = naive(&x, (c, b, h, w), &k, o);
            let Some(got) = conv3x3(&Padded::new(&x, (c, b, h, w)), &k, o) else {
                assert!(!avx::available(), "the kernel should apply here");
                return;
            };
            for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - e).abs() < 1e-4,
                    "{c}x{b}x{h}x{w}→{o}: value {i}: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn kernel_gradient_matches_a_naive_loop() {
        for (c, b, h, w, o) in [(3, 2, 5, 37, 8), (1, 1, 3, 5, 4), (2, 3, 4, 16, 4)] {
            let x: Vec<f32> = (0..c * b * h * w)
                .map(|i| (i as f32 * 0.61).sin())
                .collect();
            let g: Vec<f32> = (0..o * b * h * w)
                .map(|i| (i as f32 * 0.29).cos())
                .collect();
            let Some(got) = kernel_grad(&Padded::new(&x, (c, b, h, w)), &g, o) else {
                assert!(!avx::available(), "the kernel should apply here");
                return;
            };
            for oc in 0..o {
                for ic in 0..c {
                    for k in 0..9 {
                        let (ky, kx) = (k / 3, k % 3);
                        let mut want = 0f64;
                        for bi in 0..b {
                            for y in 0..h {
                                for xx in 0..w {
                                    let (sy, sx) = (y + ky, xx + kx);
                                    if sy < 1 || sy > h || sx < 1 || sx > w {
                                        continue;
                                    }
                                    let xv = x[((ic * b + bi) * h + sy - 1) * w + sx - 1];
                                    want += (g[((oc * b + bi) * h + y) * w + xx] * xv) as f64;
                                }
                            }
                        }
                        let v = got[(oc * c + ic) * 9 + k];
                        assert!(
                            (v as f64 - want).abs() < 1e-3,
                            "{oc},{ic},{k}: {v} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn output_channels_not_a_multiple_of_four_fall_back() {
        assert!(!applies(3));
        assert!(conv3x3(&Padded::new(&[0.0; 9], (1, 1, 3, 3)), &[0.0; 27], 3).is_none());
    }
}
