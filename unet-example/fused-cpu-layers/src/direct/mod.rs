//! A direct 3×3 convolution (stride 1, zero padding 1) on `[C, B, H, W]` f32 slices
//! with AVX-512 or AVX2 + FMA, without the 9× larger im2col buffer: each task computes a
//! band of rows of one image for every output channel, in register tiles of 4 channels ×
//! 3 vectors (48 pixels with AVX-512, 24 with AVX2; narrower tiles and a masked tail for
//! the rest of a row), summing over input channels and taps with the tile held in
//! registers. Each output value's sum runs in the same order whatever the split.
//!
//! The input is first copied into a zero-padded `[C, B, H + 2, W + 2]` buffer so that
//! every tap is a plain (unaligned) vector load; the kernel is repacked so that the 4
//! weights a tap multiplies are adjacent. [`conv3x3`] returns `None` where the kernel
//! does not apply (not x86-64, neither AVX-512F nor AVX2 + FMA, output channels not a
//! multiple of 4), and the caller then takes the im2col + GEMM path.
//!
//! The instruction set is chosen at run time, the widest the CPU has ([`Isa::best`]);
//! `FUSED_CPU_LAYERS_ISA=avx2` (or `none`) caps it, e.g. to compare the paths on one
//! machine.

use rayon::prelude::*;

use super::im2col::{copy, fill};

/// Output channels per register tile.
const OT: usize = 4;

/// About how many bytes of weights one pass over a band of rows uses (a part of L2).
const GROUP_BYTES: usize = 256 << 10;

/// The vector instruction sets the direct kernels have a path for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F: 16 lanes.
    Avx512,
    /// AVX2 + FMA: 8 lanes.
    Avx2,
}

impl Isa {
    /// Every path, widest first.
    #[cfg(test)]
    pub(crate) const ALL: [Isa; 2] = [Isa::Avx512, Isa::Avx2];

    /// Whether this CPU runs the path.
    pub(crate) fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        match self {
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The widest path this CPU runs, capped by `FUSED_CPU_LAYERS_ISA` (`avx512`, `avx2`
    /// or `none`) when set; read once.
    pub(crate) fn best() -> Option<Isa> {
        static BEST: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = std::env::var("FUSED_CPU_LAYERS_ISA").unwrap_or_default();
            let allowed: &[Isa] = match cap.to_ascii_lowercase().as_str() {
                "none" => &[],
                "avx2" => &[Isa::Avx2],
                _ => &[Isa::Avx512, Isa::Avx2],
            };
            allowed.iter().copied().find(|isa| isa.available())
        })
    }
}

/// Whether the direct kernels apply to a convolution with `o` output channels here.
pub(crate) fn applies(o: usize) -> bool {
    o.is_multiple_of(OT) && o > 0 && Isa::best().is_some()
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
    conv3x3_on(Isa::best()?, x, kernel, o)
}

/// [`conv3x3`] on the path `isa` (`None` also where the CPU lacks it).
fn conv3x3_on(isa: Isa, x: &Padded, kernel: &[f32], o: usize) -> Option<Vec<f32>> {
    let (c, b, h, w) = x.dims;
    if !isa.available()
        || !o.is_multiple_of(OT)
        || kernel.len() != o * c * 9
        || b * h * w == 0
        || c == 0
    {
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
    let geometry = Geometry {
        channel_stride: b * plane,
        row_stride: wp,
        out_stride: n,
        channels: c,
    };
    // One task per band of rows of one image, for every output channel: the band's
    // input rows stay in cache while the output tiles pass over them, in groups whose
    // weights fit in about 256 KiB. Enough bands for 4 tasks per thread.
    let tiles = o / OT;
    let group = (GROUP_BYTES / (c * 9 * OT * 4)).clamp(1, tiles);
    let bands = (4 * rayon::current_num_threads()).div_ceil(b).clamp(1, h);
    let band_rows = h.div_ceil(bands);
    (0..b * bands).into_par_iter().for_each(|task| {
        let (bi, band) = (task / bands, task % bands);
        let rows = band * band_rows..((band + 1) * band_rows).min(h);
        for first in (0..tiles).step_by(group) {
            for y in rows.clone() {
                let x_row = &xp[bi * plane + y * wp..];
                for tile in first..(first + group).min(tiles) {
                    let weights = &packed[tile * c * 9 * OT..][..c * 9 * OT];
                    // SAFETY: each task writes the rows `y` of its band of image `bi`, of
                    // every output channel, disjoint from every other task's;
                    // `isa.available()` holds.
                    unsafe {
                        let out_row = out_ptr.get().add((tile * OT * b + bi) * h * w + y * w);
                        row(isa, out_row, x_row, weights, geometry, w);
                    }
                }
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
    kernel_grad_on(Isa::best()?, x, grad, o)
}

/// [`kernel_grad`] on the path `isa` (`None` also where the CPU lacks it).
fn kernel_grad_on(isa: Isa, x: &Padded, grad: &[f32], o: usize) -> Option<Vec<f32>> {
    let (c, b, h, w) = x.dims;
    let n = b * h * w;
    if !isa.available() || !o.is_multiple_of(OT) || o == 0 || grad.len() != o * n || n == 0 {
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
            // SAFETY: `isa.available()` holds; the slices hold the OT gradient channels
            // and the b padded planes that `tap_sums` reads.
            unsafe { tap_sums(isa, g, x_planes, (b, h, w)) }
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
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// One output row of OT channels on the path `isa` (see `avx2::row`).
///
/// # Safety
/// `isa.available()`, and the pointers as `avx2::row` requires.
#[allow(unused_variables)]
unsafe fn row(isa: Isa, out: *mut f32, x_row: &[f32], weights: &[f32], g: Geometry, w: usize) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => avx512::row(out, x_row, weights, g, w),
        Isa::Avx2 => avx2::row(out, x_row, weights, g, w),
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the direct convolution is only dispatched where a path is available")
}

/// The kernel gradient's tap sums on the path `isa` (see `avx2::tap_sums`).
///
/// # Safety
/// `isa.available()`.
#[allow(unused_variables)]
unsafe fn tap_sums(isa: Isa, g: &[f32], xp: &[f32], dims: (usize, usize, usize)) -> [f32; 9 * OT] {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => avx512::tap_sums(g, xp, dims),
        Isa::Avx2 => avx2::tap_sums(g, xp, dims),
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the direct convolution is only dispatched where a path is available")
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

    /// The paths this CPU runs; a message for each it lacks.
    fn paths() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|isa| {
                let ok = isa.available();
                if !ok {
                    eprintln!("skipping the {isa:?} path of the direct kernels: this CPU lacks it");
                }
                ok
            })
            .collect()
    }

    #[test]
    fn direct_convolution_matches_a_naive_loop() {
        // Widths with full 48- and 24-pixel tiles, 16- and 8-pixel tiles, masked tails;
        // one channel.
        for isa in paths() {
            for (c, b, h, w, o) in [
                (3, 2, 5, 37, 8),
                (1, 1, 3, 5, 4),
                (5, 3, 4, 24, 12),
                (2, 1, 1, 1, 4),
                (2, 2, 3, 96, 4),
                (3, 1, 2, 61, 8),
            ] {
                direct_convolution_case(isa, (c, b, h, w), o);
            }
        }
    }

    fn direct_convolution_case(isa: Isa, (c, b, h, w): (usize, usize, usize, usize), o: usize) {
        let x: Vec<f32> = (0..c * b * h * w)
            .map(|i| (i as f32 * 0.61).sin())
            .collect();
        let k: Vec<f32> = (0..o * c * 9).map(|i| (i as f32 * 0.37).cos()).collect();
        let want = naive(&x, (c, b, h, w), &k, o);
        let got = conv3x3_on(isa, &Padded::new(&x, (c, b, h, w)), &k, o).unwrap();
        for (i, (a, e)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - e).abs() < 1e-4,
                "{isa:?} {c}x{b}x{h}x{w}→{o}: value {i}: {a} vs {e}"
            );
        }
    }

    #[test]
    fn kernel_gradient_matches_a_naive_loop() {
        for isa in paths() {
            for (c, b, h, w, o) in [
                (3, 2, 5, 37, 8),
                (1, 1, 3, 5, 4),
                (2, 3, 4, 16, 4),
                (1, 2, 3, 48, 4),
            ] {
                kernel_gradient_case(isa, (c, b, h, w), o);
            }
        }
    }

    fn kernel_gradient_case(isa: Isa, (c, b, h, w): (usize, usize, usize, usize), o: usize) {
        let x: Vec<f32> = (0..c * b * h * w)
            .map(|i| (i as f32 * 0.61).sin())
            .collect();
        let g: Vec<f32> = (0..o * b * h * w)
            .map(|i| (i as f32 * 0.29).cos())
            .collect();
        let got = kernel_grad_on(isa, &Padded::new(&x, (c, b, h, w)), &g, o).unwrap();
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
                        "{isa:?} {oc},{ic},{k}: {v} vs {want}"
                    );
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
