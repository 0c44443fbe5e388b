//! The CPU im2col / col2im of a 3×3, stride-1, zero-padding-1 convolution on plain f32
//! slices in the `[C, B, H, W]` layout, and the slice helpers the CPU ops share.

use candle::backend::BackendStorage;
use candle::{CpuStorage, Layout};
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

/// `x` `[C, B, H, W]` → `[9C, B·H·W]`: the 3×3 neighbourhoods (zero padding 1) of every
/// pixel, rows ordered `(c, ky, kx)` like a `[O, C, 3, 3]` kernel.
pub(crate) fn im2col(x: &[f32], (c, b, h, w): (usize, usize, usize, usize)) -> Vec<f32> {
    let (hw, n) = (h * w, b * h * w);
    let mut col = vec![0f32; 9 * c * n];
    if n == 0 {
        return col;
    }
    col.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
        let (ch, k) = (row / 9, row % 9);
        let (dy, dx) = (k / 3, k % 3);
        for bi in 0..b {
            let src = &x[(ch * b + bi) * hw..][..hw];
            let dst = &mut dst[bi * hw..][..hw];
            for y in 0..h {
                let sy = y + dy;
                if sy < 1 || sy > h {
                    continue; // zero padding row
                }
                let s_row = &src[(sy - 1) * w..][..w];
                let d_row = &mut dst[y * w..][..w];
                match dx {
                    0 => d_row[1..].copy_from_slice(&s_row[..w - 1]),
                    1 => d_row.copy_from_slice(s_row),
                    _ => d_row[..w - 1].copy_from_slice(&s_row[1..]),
                }
            }
        }
    });
    col
}

/// The adjoint of [`im2col`]: sums each `[9C, B·H·W]` column entry back onto the pixel
/// it was copied from, giving `[C, B, H, W]`.
pub(crate) fn col2im(col: &[f32], (c, b, h, w): (usize, usize, usize, usize)) -> Vec<f32> {
    let (hw, n) = (h * w, b * h * w);
    let mut x = vec![0f32; c * n];
    if n == 0 {
        return x;
    }
    x.par_chunks_mut(n).enumerate().for_each(|(ch, dst)| {
        for k in 0..9 {
            let (dy, dx) = (k / 3, k % 3);
            let src = &col[(ch * 9 + k) * n..][..n];
            for bi in 0..b {
                let s_img = &src[bi * hw..][..hw];
                let d_img = &mut dst[bi * hw..][..hw];
                for y in 0..h {
                    let sy = y + dy;
                    if sy < 1 || sy > h {
                        continue;
                    }
                    let s_row = &s_img[y * w..][..w];
                    let d_row = &mut d_img[(sy - 1) * w..][..w];
                    let (d, s) = match dx {
                        0 => (&mut d_row[..w - 1], &s_row[1..]),
                        1 => (&mut d_row[..], s_row),
                        _ => (&mut d_row[1..], &s_row[..w - 1]),
                    };
                    d.iter_mut().zip(s).for_each(|(a, v)| *a += v);
                }
            }
        }
    });
    x
}
