//! The CPU im2col of a 3×3, stride-1, zero-padding-1 convolution on plain f32
//! slices in the `[C, B, H, W]` layout, and the slice helpers the CPU ops share.

use std::mem::MaybeUninit;

use candle::backend::BackendStorage;
use candle::{CpuStorage, Layout, Tensor};
use rayon::prelude::*;

/// The contiguous f32 values behind a CPU storage, or an error naming `op`.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle::bail!("{op}: only f32 is supported, got {:?}", s.dtype()),
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle::bail!("{op}: input must be contiguous"),
    }
}

/// Cuts a flat tensor (a backward op's gradients laid end to end) into consecutive
/// pieces of the given shapes.
pub(crate) fn split_flat(all: &Tensor, shapes: &[&[usize]]) -> candle::Result<Vec<Tensor>> {
    let mut start = 0;
    let mut parts = Vec::with_capacity(shapes.len());
    for &dims in shapes {
        let len: usize = dims.iter().product();
        parts.push(all.narrow(0, start, len)?.reshape(dims)?);
        start += len;
    }
    Ok(parts)
}

/// `x` `[C, B, H, W]` → `[9C, B·H·W]`: the 3×3 neighbourhoods (zero padding 1) of every
/// pixel, rows ordered `(c, ky, kx)` like a `[O, C, 3, 3]` kernel.
pub(crate) fn im2col(x: &[f32], (c, b, h, w): (usize, usize, usize, usize)) -> Vec<f32> {
    let (hw, n) = (h * w, b * h * w);
    let len = 9 * c * n;
    let mut col: Vec<f32> = Vec::with_capacity(len);
    if n == 0 {
        return col;
    }
    // Every value is written once, padding zeros included, by the rows' threads.
    col.spare_capacity_mut()[..len]
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(row, dst)| {
            let (ch, k) = (row / 9, row % 9);
            let (dy, dx) = (k / 3, k % 3);
            for bi in 0..b {
                let src = &x[(ch * b + bi) * hw..][..hw];
                let dst = &mut dst[bi * hw..][..hw];
                for y in 0..h {
                    let d_row = &mut dst[y * w..][..w];
                    let sy = y + dy;
                    if sy < 1 || sy > h {
                        fill(d_row, 0.0); // zero padding row
                        continue;
                    }
                    let s_row = &src[(sy - 1) * w..][..w];
                    match dx {
                        0 => {
                            d_row[0].write(0.0);
                            copy(&mut d_row[1..], &s_row[..w - 1]);
                        }
                        1 => copy(d_row, s_row),
                        _ => {
                            copy(&mut d_row[..w - 1], &s_row[1..]);
                            d_row[w - 1].write(0.0);
                        }
                    }
                }
            }
        });
    // SAFETY: the loop above wrote all `len` values (each row's images, each image's
    // rows, each row's `w` values: a copy plus its zero edge, or a zero row).
    unsafe { col.set_len(len) };
    col
}

/// Writes `src` into the (uninitialised) start of `dst`.
pub(crate) fn copy(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| {
        d.write(s);
    });
}

/// Writes `v` into every value of the (uninitialised) `dst`.
pub(crate) fn fill(dst: &mut [MaybeUninit<f32>], v: f32) {
    dst.iter_mut().for_each(|d| {
        d.write(v);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn im2col_matches_a_naive_definition() {
        let (c, b, h, w) = (2, 3, 4, 5);
        let x: Vec<f32> = (0..c * b * h * w)
            .map(|i| (i as f32 * 0.61).sin())
            .collect();
        let col = im2col(&x, (c, b, h, w));
        let n = b * h * w;
        for ch in 0..c {
            for k in 0..9 {
                let (dy, dx) = (k / 3, k % 3);
                for p in 0..n {
                    let (bi, y, xx) = (p / (h * w), (p / w) % h, p % w);
                    let (sy, sx) = (y as isize + dy as isize - 1, xx as isize + dx as isize - 1);
                    let inside = (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx);
                    let want = if inside {
                        x[((ch * b + bi) * h + sy as usize) * w + sx as usize]
                    } else {
                        0.0
                    };
                    assert_eq!(col[(ch * 9 + k) * n + p], want, "row {ch},{k} pixel {p}");
                }
            }
        }
    }
}
