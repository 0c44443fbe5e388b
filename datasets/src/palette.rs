//! Class colours: the Pascal VOC palette and colouring of masks for display.

use crate::VOID;

/// The colour Pascal VOC uses for void (255) pixels: RGB `(224, 224, 192)`.
pub const VOID_COLOUR: [u8; 3] = [224, 224, 192];

/// The 21 Pascal VOC 2012 class names, index 0 = background.
pub const VOC_CLASS_NAMES: [&str; 21] = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// The colour of label `index` in the Pascal VOC palette: 0 black, 1 `(128, 0, 0)`,
/// 2 `(0, 128, 0)`, ..., 255 (void) [`VOID_COLOUR`]. Built with the VOC development kit's
/// bit interleaving: bit `3k + c` of the index becomes bit `7 - k` of colour channel `c`.
pub fn voc_colour(index: u8) -> [u8; 3] {
    let mut rgb = [0u8; 3];
    let mut c = index;
    for k in 0..8 {
        for (ch, value) in rgb.iter_mut().enumerate() {
            *value |= ((c >> ch) & 1) << (7 - k);
        }
        c >>= 3;
    }
    rgb
}

/// The first `n` colours of the Pascal VOC palette (`n <= 256`; see [`voc_colour`]).
pub fn voc_palette(n: usize) -> Vec<[u8; 3]> {
    (0..=u8::MAX).take(n).map(voc_colour).collect()
}

/// Colours a mask for display.
///
/// - `mask`: u32 `[H, W]` class indices or [`VOID`].
/// - `palette`: one RGB colour per class.
///
/// Returns u8 `[H, W, 3]` interleaved RGB: [`VOID`] pixels get [`VOID_COLOUR`], indices
/// past the palette get white.
pub fn mask_to_rgb(mask: &[u32], palette: &[[u8; 3]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(mask.len() * 3);
    for &m in mask {
        let colour = if m == VOID {
            VOID_COLOUR
        } else {
            palette.get(m as usize).copied().unwrap_or([255, 255, 255])
        };
        out.extend_from_slice(&colour);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voc_palette_matches_devkit_colours() {
        let p = voc_palette(21);
        assert_eq!(p[0], [0, 0, 0]);
        assert_eq!(p[1], [128, 0, 0]);
        assert_eq!(p[2], [0, 128, 0]);
        assert_eq!(p[3], [128, 128, 0]);
        assert_eq!(p[7], [128, 128, 128]);
        assert_eq!(p[15], [192, 128, 128]);
        assert_eq!(p[20], [0, 64, 128]);
        assert_eq!(voc_palette(300).len(), 256);
    }

    #[test]
    fn voc_colours_match_the_pascal_voc_palette() {
        assert_eq!(voc_colour(0), [0, 0, 0]);
        assert_eq!(voc_colour(1), [128, 0, 0]);
        assert_eq!(voc_colour(2), [0, 128, 0]);
        assert_eq!(voc_colour(3), [128, 128, 0]);
        assert_eq!(voc_colour(15), [192, 128, 128]);
        assert_eq!(voc_colour(255), VOID_COLOUR);
    }

    #[test]
    fn void_and_unknown_colours() {
        let rgb = mask_to_rgb(&[0, VOID, 9], &voc_palette(2));
        assert_eq!(rgb, vec![0, 0, 0, 224, 224, 192, 255, 255, 255]);
    }
}
