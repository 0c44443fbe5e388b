//! The Pascal VOC colour map, in which the demos draw label images.

/// RGB colour of label `index` in the Pascal VOC palette: 0 black, 1 dark red
/// (128, 0, 0), 2 green (0, 128, 0), ..., 255 (void) light beige (224, 224, 192).
pub fn voc_colour(index: u8) -> [u8; 3] {
    // The bits of the index are spread over the three channels, most significant first.
    let mut bits = index;
    let mut rgb = [0u8; 3];
    for shift in (0..8).rev() {
        for (channel, value) in rgb.iter_mut().enumerate() {
            *value |= ((bits >> channel) & 1) << shift;
        }
        bits >>= 3;
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::voc_colour;

    #[test]
    fn voc_colours_match_the_pascal_voc_palette() {
        assert_eq!(voc_colour(0), [0, 0, 0]);
        assert_eq!(voc_colour(1), [128, 0, 0]);
        assert_eq!(voc_colour(2), [0, 128, 0]);
        assert_eq!(voc_colour(3), [128, 128, 0]);
        assert_eq!(voc_colour(15), [192, 128, 128]);
        assert_eq!(voc_colour(255), [224, 224, 192]);
    }
}
