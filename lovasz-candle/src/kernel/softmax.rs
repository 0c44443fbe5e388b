//! The softmax over the class axis of logits on host slices, and its Jacobian applied to
//! a gradient: the one softmax of the crate, taken by the Lovász-Softmax from logits and
//! by the cross-entropy (so both see the same probabilities, bit for bit), with
//! [`Real::exp`]. Both layouts give the same bits: each pixel's classes are reduced in
//! class order in either.

use rayon::prelude::*;

use crate::kernel::{ChannelOrder, Real};

/// `softmax(z)` over the class axis of `z` (`[B, C, S]` or `[B, S, C]` as `order` says,
/// `dims = (B, C, S)`), in the same layout, one image per rayon task. NaN in a pixel's
/// logits makes its probabilities NaN.
pub(crate) fn softmax<T: Real>(
    z: &[T],
    (_, c_n, s_n): (usize, usize, usize),
    order: ChannelOrder,
) -> Vec<T> {
    let mut p = vec![T::zero(); z.len()];
    p.par_chunks_mut(c_n * s_n)
        .zip(z.par_chunks(c_n * s_n))
        .for_each(|(p, z)| {
            softmax_image(p, z, (c_n, s_n), order);
        });
    p
}

/// One image of `(C, S) = dims` in `order`: `p = softmax(z)` over the class axis, and
/// each pixel's max and `Σ e^{z − max}` (the cross-entropy's `log Σ e^z` needs them).
pub(crate) fn softmax_image<T: Real>(
    p: &mut [T],
    z: &[T],
    (c_n, s_n): (usize, usize),
    order: ChannelOrder,
) -> (Vec<T>, Vec<T>) {
    match order {
        ChannelOrder::First => exp_rows(p, z, s_n),
        ChannelOrder::Last => exp_pixels(p, z, c_n),
    }
}

/// Turns `a = ∂loss/∂p` into `∂loss/∂z` for `p = softmax(z)` over the class axis, in
/// place: `p_c (a_c - Σ_k p_k a_k)` at each pixel (layout and `dims` as in [`softmax`]).
pub(crate) fn softmax_backward<T: Real>(
    p: &[T],
    a: &mut [T],
    dims: (usize, usize, usize),
    order: ChannelOrder,
) {
    match order {
        ChannelOrder::First => softmax_backward_first(p, a, dims),
        ChannelOrder::Last => softmax_backward_last(p, a, dims),
    }
}

/// One image `[C, S]`: `p = softmax(z)` over the rows, and each pixel's max and
/// `Σ e^{z − max}`, row by row so that every loop runs along contiguous pixels.
fn exp_rows<T: Real>(p: &mut [T], z: &[T], s_n: usize) -> (Vec<T>, Vec<T>) {
    let mut max = z[..s_n].to_vec();
    for row in z.chunks(s_n).skip(1) {
        for (m, &v) in max.iter_mut().zip(row) {
            // NaN propagates: it never compares greater, so keep it once seen.
            if v > *m || v.is_nan() {
                *m = v;
            }
        }
    }
    let mut sum = vec![T::zero(); s_n];
    for (prow, zrow) in p.chunks_mut(s_n).zip(z.chunks(s_n)) {
        for (((pv, &zv), &m), s) in prow.iter_mut().zip(zrow).zip(&max).zip(sum.iter_mut()) {
            *pv = (zv - m).exp();
            *s += *pv;
        }
    }
    let inv: Vec<T> = sum.iter().map(|&s| T::one() / s).collect();
    for prow in p.chunks_mut(s_n) {
        for (pv, &r) in prow.iter_mut().zip(&inv) {
            *pv *= r;
        }
    }
    (max, sum)
}

/// One image `[S, C]`: as [`exp_rows`], pixel by pixel.
fn exp_pixels<T: Real>(p: &mut [T], z: &[T], c_n: usize) -> (Vec<T>, Vec<T>) {
    let pixels = z.len() / c_n;
    let (mut max, mut sum) = (Vec::with_capacity(pixels), Vec::with_capacity(pixels));
    for (p, z) in p.chunks_mut(c_n).zip(z.chunks(c_n)) {
        let mut m = z[0];
        for &v in &z[1..] {
            if v > m || v.is_nan() {
                m = v;
            }
        }
        let mut s = T::zero();
        for (pv, &zv) in p.iter_mut().zip(z) {
            *pv = (zv - m).exp();
            s += *pv;
        }
        let r = T::one() / s;
        p.iter_mut().for_each(|pv| *pv *= r);
        max.push(m);
        sum.push(s);
    }
    (max, sum)
}

/// [`softmax_backward`] for `[B, C, S]`, one image per rayon task.
fn softmax_backward_first<T: Real>(p: &[T], a: &mut [T], (_, c_n, s_n): (usize, usize, usize)) {
    a.par_chunks_mut(c_n * s_n)
        .zip(p.par_chunks(c_n * s_n))
        .for_each(|(a, p)| {
            let mut dot = vec![T::zero(); s_n];
            for (arow, prow) in a.chunks(s_n).zip(p.chunks(s_n)) {
                for ((d, &av), &pv) in dot.iter_mut().zip(arow).zip(prow) {
                    *d += av * pv;
                }
            }
            for (arow, prow) in a.chunks_mut(s_n).zip(p.chunks(s_n)) {
                for ((av, &pv), &d) in arow.iter_mut().zip(prow).zip(&dot) {
                    *av = pv * (*av - d);
                }
            }
        });
}

/// [`softmax_backward`] for `[B, S, C]`.
fn softmax_backward_last<T: Real>(p: &[T], a: &mut [T], (_, c_n, s_n): (usize, usize, usize)) {
    a.par_chunks_mut(c_n * s_n)
        .zip(p.par_chunks(c_n * s_n))
        .for_each(|(a, p)| {
            for (a, p) in a.chunks_mut(c_n).zip(p.chunks(c_n)) {
                let mut d = T::zero();
                for (&av, &pv) in a.iter().zip(p) {
                    d += av * pv;
                }
                for (av, &pv) in a.iter_mut().zip(p) {
                    *av = pv * (*av - d);
                }
            }
        });
}
