//! The file layout of the prepared brain slices (`data/brain/slices.bin.gz`).
//!
//! The whole file is one gzip stream of:
//!
//! | bytes        | content                                                    |
//! |--------------|------------------------------------------------------------|
//! | 8            | magic `b"LCBRAIN1"`                                        |
//! | 4 × u32 LE   | `slices` S, `height` H, `width` W, `classes` K             |
//! | S × u16 LE   | each slice's axial index `z` in the 1 mm source volume     |
//! | S × H × W u8 | T1 intensities, slice-major then row-major                 |
//! | S × H × W u8 | class labels `< K`, same order                             |

use std::io::{Read, Write};

/// The magic bytes that open a prepared brain file.
pub const MAGIC: &[u8; 8] = b"LCBRAIN1";

/// Axial brain slices with labels, as stored on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedSlices {
    /// Slice height H (rows, anterior at the top).
    pub height: usize,
    /// Slice width W (columns, the subject's left at the left).
    pub width: usize,
    /// The number of classes K.
    pub num_classes: usize,
    /// Per slice, its axial index in the 1 mm source volume (inferior to superior).
    pub z: Vec<u16>,
    /// u8 `[S, H, W]` T1 intensities.
    pub images: Vec<u8>,
    /// u8 `[S, H, W]` class labels `< K`.
    pub labels: Vec<u8>,
}

impl PreparedSlices {
    /// The number of slices S.
    pub fn len(&self) -> usize {
        self.z.len()
    }

    /// `true` when there is no slice.
    pub fn is_empty(&self) -> bool {
        self.z.is_empty()
    }

    /// Serialises to the gzip-compressed layout above.
    pub fn encode(&self) -> std::io::Result<Vec<u8>> {
        let mut raw = Vec::with_capacity(24 + 2 * self.len() + 2 * self.images.len());
        raw.extend_from_slice(MAGIC);
        for v in [self.len(), self.height, self.width, self.num_classes] {
            let v = u32::try_from(v).map_err(std::io::Error::other)?;
            raw.extend_from_slice(&v.to_le_bytes());
        }
        for z in &self.z {
            raw.extend_from_slice(&z.to_le_bytes());
        }
        raw.extend_from_slice(&self.images);
        raw.extend_from_slice(&self.labels);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&raw)?;
        gz.finish()
    }

    /// Parses the gzip-compressed layout above; the error says what is wrong.
    pub fn decode(gz: &[u8]) -> std::result::Result<Self, String> {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .map_err(|e| format!("gzip: {e}"))?;
        if raw.len() < 24 || &raw[..8] != MAGIC {
            return Err("missing the LCBRAIN1 header".to_string());
        }
        let u32_at = |o: usize| u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let (s, h, w, k) = (
            u32_at(8) as usize,
            u32_at(12) as usize,
            u32_at(16) as usize,
            u32_at(20) as usize,
        );
        let n = s * h * w;
        let expected = 24 + 2 * s + 2 * n;
        if raw.len() != expected {
            return Err(format!(
                "{} bytes after decompression, expected {expected} for {s} slices of {h}x{w}",
                raw.len()
            ));
        }
        let z = raw[24..24 + 2 * s]
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let images = raw[24 + 2 * s..24 + 2 * s + n].to_vec();
        let labels = raw[24 + 2 * s + n..].to_vec();
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= k) {
            return Err(format!("label {bad} is not below the {k} classes"));
        }
        Ok(PreparedSlices {
            height: h,
            width: w,
            num_classes: k,
            z,
            images,
            labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let p = PreparedSlices {
            height: 2,
            width: 3,
            num_classes: 4,
            z: vec![7, 8],
            images: (0..12).collect(),
            labels: vec![0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3],
        };
        let gz = p.encode().unwrap();
        assert_eq!(PreparedSlices::decode(&gz).unwrap(), p);
        assert!(PreparedSlices::decode(&gz[..gz.len() / 2]).is_err());
    }
}
