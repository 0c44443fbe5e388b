//! A small reader for single-file NIfTI-1 volumes (`.nii`, `.nii.gz`), enough for the
//! brain atlas preparation.
//!
//! A NIfTI-1 file is a 348-byte header followed, at byte `vox_offset`, by the voxels
//! (x fastest, then y, then z). The fields read here (byte offsets in the header):
//!
//! | offset | field         | type      | use                                        |
//! |--------|---------------|-----------|--------------------------------------------|
//! | 0      | `sizeof_hdr`  | i32       | must be 348; also tells the byte order     |
//! | 40     | `dim[8]`      | i16 × 8   | `dim[0]` = rank, `dim[1..=3]` = nx, ny, nz |
//! | 70     | `datatype`    | i16       | 2 u8, 4 i16, 8 i32, 16 f32, 64 f64, 256 i8, 512 u16 |
//! | 76     | `pixdim[8]`   | f32 × 8   | `pixdim[1..=3]` = voxel size in mm         |
//! | 108    | `vox_offset`  | f32       | where the voxels start                     |
//! | 112    | `scl_slope`   | f32       | value = stored × slope + inter, if slope ≠ 0 |
//! | 116    | `scl_inter`   | f32       |                                            |
//! | 344    | `magic`       | 4 bytes   | `"n+1\0"` (header and data in one file)    |
//!
//! Orientation (qform/sform) is not interpreted: callers get the voxel grid as stored.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// A 3-D scalar volume.
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiVolume {
    /// `[nx, ny, nz]` voxels.
    pub dims: [usize; 3],
    /// Voxel size in mm, `[dx, dy, dz]`.
    pub pixdim: [f32; 3],
    /// `nx * ny * nz` values after scaling, voxel `(x, y, z)` at `x + nx * (y + ny * z)`.
    pub data: Vec<f32>,
}

impl NiftiVolume {
    /// The value at voxel `(x, y, z)`, or `None` outside the grid.
    pub fn at(&self, x: usize, y: usize, z: usize) -> Option<f32> {
        let [nx, ny, nz] = self.dims;
        if x >= nx || y >= ny || z >= nz {
            return None;
        }
        self.data.get(x + nx * (y + ny * z)).copied()
    }
}

/// Reads a `.nii` or gzip-compressed `.nii.gz` file (detected by the gzip magic bytes).
pub fn read_nifti(path: &Path) -> Result<NiftiVolume> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::io(path, e))?;
        out
    } else {
        raw
    };
    parse_nifti(&bytes).map_err(|message| Error::format(path, message))
}

/// Parses an uncompressed single-file NIfTI-1 image held in memory. The error is a
/// description of what is wrong with the header or data.
pub fn parse_nifti(bytes: &[u8]) -> std::result::Result<NiftiVolume, String> {
    if bytes.len() < 348 {
        return Err(format!(
            "{} bytes is shorter than a NIfTI-1 header",
            bytes.len()
        ));
    }
    let little = match (le_i32(bytes, 0), be_i32(bytes, 0)) {
        (348, _) => true,
        (_, 348) => false,
        (other, _) => return Err(format!("sizeof_hdr is {other}, not 348: not NIfTI-1")),
    };
    let i16_at = |o: usize| {
        let b = [bytes[o], bytes[o + 1]];
        if little {
            i16::from_le_bytes(b)
        } else {
            i16::from_be_bytes(b)
        }
    };
    let f32_at = |o: usize| {
        let b = [bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]];
        if little {
            f32::from_le_bytes(b)
        } else {
            f32::from_be_bytes(b)
        }
    };
    if &bytes[344..348] != b"n+1\0" {
        return Err(format!(
            "magic is {:?}, not \"n+1\\0\" (only single-file NIfTI-1 is supported)",
            &bytes[344..348]
        ));
    }
    let rank = i16_at(40);
    let dim: Vec<i16> = (1..=7).map(|k| i16_at(40 + 2 * k)).collect();
    if !(1..=7).contains(&rank) {
        return Err(format!("dim[0] = {rank} is not a rank in 1..=7"));
    }
    let mut dims = [1usize; 3];
    for (k, &d) in dim.iter().enumerate().take(rank as usize) {
        if d < 1 {
            return Err(format!("dim[{}] = {d} is not positive", k + 1));
        }
        if k < 3 {
            dims[k] = d as usize;
        } else if d != 1 {
            return Err(format!(
                "dim[{}] = {d}: only 3-D volumes (a single time point) are supported",
                k + 1
            ));
        }
    }
    let pixdim = [f32_at(80), f32_at(84), f32_at(88)];
    let datatype = i16_at(70);
    let vox_offset = f32_at(108);
    let valid_offset = vox_offset.is_finite() && vox_offset >= 348.0 && vox_offset.fract() == 0.0;
    if !valid_offset {
        return Err(format!(
            "vox_offset = {vox_offset} is not a byte offset >= 348"
        ));
    }
    let (slope, inter) = (f32_at(112), f32_at(116));
    let n = dims[0] * dims[1] * dims[2];
    let size = match datatype {
        2 | 256 => 1,
        4 | 512 => 2,
        8 | 16 => 4,
        64 => 8,
        other => return Err(format!("datatype {other} is not supported")),
    };
    let start = vox_offset as usize;
    let end = start + n * size;
    let Some(raw) = bytes.get(start..end) else {
        return Err(format!(
            "the header announces {n} voxels of {size} bytes from byte {start}, but the data holds {} bytes",
            bytes.len()
        ));
    };
    let value = |b: &[u8]| -> f32 {
        // Bring every voxel to little-endian order, then decode by type.
        let mut le = [0u8; 8];
        le[..size].copy_from_slice(b);
        if !little {
            le[..size].reverse();
        }
        let [b0, b1, b2, b3, ..] = le;
        match datatype {
            2 => b0 as f32,
            256 => b0 as i8 as f32,
            4 => i16::from_le_bytes([b0, b1]) as f32,
            512 => u16::from_le_bytes([b0, b1]) as f32,
            8 => i32::from_le_bytes([b0, b1, b2, b3]) as f32,
            16 => f32::from_le_bytes([b0, b1, b2, b3]),
            _ => f64::from_le_bytes(le) as f32,
        }
    };
    let mut data: Vec<f32> = raw.chunks_exact(size).map(value).collect();
    if slope != 0.0 && slope.is_finite() && (slope != 1.0 || inter != 0.0) {
        for v in &mut data {
            *v = *v * slope + inter;
        }
    }
    Ok(NiftiVolume { dims, pixdim, data })
}

fn le_i32(b: &[u8], o: usize) -> i32 {
    i32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be_i32(b: &[u8], o: usize) -> i32 {
    i32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian NIfTI-1 header for a `[nx, ny, nz]` volume of `datatype`.
    fn header(dims: [i16; 3], datatype: i16, slope: f32, inter: f32) -> Vec<u8> {
        let mut h = vec![0u8; 352];
        h[0..4].copy_from_slice(&348i32.to_le_bytes());
        h[40..42].copy_from_slice(&3i16.to_le_bytes());
        for (k, d) in dims.iter().enumerate() {
            h[42 + 2 * k..44 + 2 * k].copy_from_slice(&d.to_le_bytes());
        }
        h[70..72].copy_from_slice(&datatype.to_le_bytes());
        for k in 0..3 {
            h[80 + 4 * k..84 + 4 * k].copy_from_slice(&1f32.to_le_bytes());
        }
        h[108..112].copy_from_slice(&352f32.to_le_bytes());
        h[112..116].copy_from_slice(&slope.to_le_bytes());
        h[116..120].copy_from_slice(&inter.to_le_bytes());
        h[344..348].copy_from_slice(b"n+1\0");
        h
    }

    #[test]
    fn reads_u8_in_x_fastest_order() {
        let mut bytes = header([2, 3, 1], 2, 0.0, 0.0);
        bytes.extend(0u8..6);
        let v = parse_nifti(&bytes).unwrap();
        assert_eq!(v.dims, [2, 3, 1]);
        assert_eq!(v.at(1, 2, 0), Some(5.0));
        assert_eq!(v.at(2, 0, 0), None);
    }

    #[test]
    fn applies_scl_slope_to_i16() {
        let mut bytes = header([2, 1, 1], 4, 0.5, 10.0);
        bytes.extend((-4i16).to_le_bytes());
        bytes.extend(8i16.to_le_bytes());
        let v = parse_nifti(&bytes).unwrap();
        assert_eq!(v.data, vec![8.0, 14.0]);
    }

    #[test]
    fn rejects_truncated_data_and_bad_magic() {
        let bytes = header([4, 4, 4], 2, 0.0, 0.0);
        assert!(parse_nifti(&bytes).unwrap_err().contains("voxels"));
        let mut bad = header([1, 1, 1], 2, 0.0, 0.0);
        bad[344] = b'x';
        bad.push(0);
        assert!(parse_nifti(&bad).unwrap_err().contains("magic"));
        assert!(parse_nifti(&[0u8; 10]).is_err());
    }
}
