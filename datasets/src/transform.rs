//! Seeded sample transforms: scale jitter, horizontal flip, crop / pad and intensity
//! normalisation, applied to an image and its mask together.

use rand::Rng;

use crate::{Error, Result, Sample, VOID};

/// Options of a [`Transform`]. The default changes nothing.
///
/// Applied in this order: scale jitter, horizontal flip, crop / pad, normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformConfig {
    /// Output `(height, width)`: larger inputs are cropped, smaller ones padded (image
    /// with [`TransformConfig::pad_value`], mask with [`VOID`]). `None` keeps the size.
    pub crop: Option<(usize, usize)>,
    /// Centre the crop / pad window instead of placing it at random (for evaluation).
    pub center_crop: bool,
    /// Probability of a left-right flip, in `[0, 1]`. Default 0.
    pub hflip: f32,
    /// Resize by a factor drawn uniformly from `[lo, hi]` (image bilinear, mask nearest),
    /// `0 < lo <= hi`. Default `(1.0, 1.0)`: no resize.
    pub scale: (f32, f32),
    /// Per-channel mean subtracted after cropping; one value applies to every channel,
    /// empty for none.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by after subtracting `mean`; one value
    /// applies to every channel, empty for none.
    pub std: Vec<f32>,
    /// Image value of padded pixels, before normalisation. Default 0.
    pub pad_value: f32,
}

impl Default for TransformConfig {
    fn default() -> Self {
        TransformConfig {
            crop: None,
            center_crop: false,
            hflip: 0.0,
            scale: (1.0, 1.0),
            mean: Vec::new(),
            std: Vec::new(),
            pad_value: 0.0,
        }
    }
}

/// A validated [`TransformConfig`], applied with a caller-provided random generator so
/// results are reproducible.
///
/// ```
/// use datasets::{Sample, Transform, TransformConfig};
/// use rand::SeedableRng;
/// let t = Transform::new(TransformConfig { crop: Some((4, 4)), hflip: 0.5, ..Default::default() })?;
/// let s = Sample::new(vec![0.5; 2 * 3], vec![1; 2 * 3], 1, 2, 3)?;
/// let out = t.apply(s, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0))?;
/// assert_eq!((out.height, out.width), (4, 4));
/// assert_eq!(out.mask.iter().filter(|&&m| m == datasets::VOID).count(), 16 - 6);
/// # Ok::<(), datasets::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    cfg: TransformConfig,
}

impl Transform {
    /// Checks the options: a non-empty crop, `hflip` in `[0, 1]`, `0 < lo <= hi` for
    /// `scale`, positive finite `std`, and finite `mean` and `pad_value`.
    pub fn new(cfg: TransformConfig) -> Result<Self> {
        let bad = |m: String| Err(Error::Config(format!("TransformConfig: {m}")));
        if let Some((h, w)) = cfg.crop {
            if h == 0 || w == 0 {
                return bad(format!("crop {h}x{w} is empty"));
            }
        }
        if !(0.0..=1.0).contains(&cfg.hflip) {
            return bad(format!("hflip probability {} is not in [0, 1]", cfg.hflip));
        }
        let (lo, hi) = cfg.scale;
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return bad(format!("scale range ({lo}, {hi}) is not 0 < lo <= hi"));
        }
        if let Some(s) = cfg.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return bad(format!("std {s} is not positive"));
        }
        if !cfg
            .mean
            .iter()
            .chain([&cfg.pad_value])
            .all(|v| v.is_finite())
        {
            return bad("mean and pad_value must be finite".to_string());
        }
        Ok(Transform { cfg })
    }

    /// The options.
    pub fn config(&self) -> &TransformConfig {
        &self.cfg
    }

    /// Transforms `sample` (image f32 `[C, H, W]`, mask u32 `[H, W]`), drawing random
    /// choices from `rng`. Returns image f32 `[C, H', W']` and mask u32 `[H', W']` with
    /// `(H', W')` the crop size when set. Errors when the buffers do not match the
    /// sample's shape or `mean` / `std` have neither 1 nor `C` values.
    pub fn apply(&self, sample: Sample, rng: &mut impl Rng) -> Result<Sample> {
        sample.check()?;
        let c = sample.channels;
        for (name, v) in [("mean", &self.cfg.mean), ("std", &self.cfg.std)] {
            if v.len() > 1 && v.len() != c {
                return Err(Error::Config(format!(
                    "TransformConfig: {} {name} values for a {c}-channel image",
                    v.len()
                )));
            }
        }
        let mut s = sample;
        let (lo, hi) = self.cfg.scale;
        if hi > lo || lo != 1.0 {
            let factor = if hi > lo {
                rng.random_range(lo..=hi)
            } else {
                lo
            };
            s = rescale(s, factor);
        }
        if self.cfg.hflip > 0.0 && rng.random::<f32>() < self.cfg.hflip {
            s = hflip(s);
        }
        if let Some((h, w)) = self.cfg.crop {
            let top = self.window_offset(s.height, h, rng);
            let left = self.window_offset(s.width, w, rng);
            s = crop_or_pad(s, (h, w), (top, left), self.cfg.pad_value);
        }
        if !self.cfg.mean.is_empty() || !self.cfg.std.is_empty() {
            let n = s.height * s.width;
            for (ch, plane) in s.image.chunks_mut(n.max(1)).enumerate() {
                let m = pick(&self.cfg.mean, ch, 0.0);
                let sd = pick(&self.cfg.std, ch, 1.0);
                plane.iter_mut().for_each(|v| *v = (*v - m) / sd);
            }
        }
        Ok(s)
    }

    /// Where the output window starts along a dimension of `size` for an output of
    /// `target`: an offset into the input when cropping (`size > target`) or into the
    /// output when padding, as `size as isize - target as isize` signs it.
    fn window_offset(&self, size: usize, target: usize, rng: &mut impl Rng) -> isize {
        let slack = size.abs_diff(target);
        let offset = if self.cfg.center_crop || slack == 0 {
            slack / 2
        } else {
            rng.random_range(0..=slack)
        };
        if size >= target {
            offset as isize
        } else {
            -(offset as isize)
        }
    }
}

fn pick(values: &[f32], channel: usize, default: f32) -> f32 {
    match values {
        [] => default,
        [v] => *v,
        vs => vs[channel],
    }
}

/// Mirrors columns.
fn hflip(mut s: Sample) -> Sample {
    let w = s.width.max(1);
    s.image.chunks_mut(w).for_each(<[f32]>::reverse);
    s.mask.chunks_mut(w).for_each(<[u32]>::reverse);
    s
}

/// Resizes by `factor`: image by bilinear interpolation (pixel centres aligned),
/// mask by nearest neighbour.
fn rescale(s: Sample, factor: f32) -> Sample {
    let (h, w, c) = (s.height, s.width, s.channels);
    let nh = ((h as f32 * factor).round() as usize).max(1);
    let nw = ((w as f32 * factor).round() as usize).max(1);
    if (nh, nw) == (h, w) || h == 0 || w == 0 {
        return s;
    }
    let (sy, sx) = (h as f32 / nh as f32, w as f32 / nw as f32);
    let src = |o: usize, scale: f32, n: usize| {
        let f = ((o as f32 + 0.5) * scale - 0.5).clamp(0.0, (n - 1) as f32);
        let i0 = f.floor() as usize;
        (i0, (i0 + 1).min(n - 1), f - i0 as f32)
    };
    let mut image = vec![0f32; c * nh * nw];
    let mut mask = vec![0u32; nh * nw];
    for y in 0..nh {
        let (y0, y1, fy) = src(y, sy, h);
        let ny = (((y as f32 + 0.5) * sy) as usize).min(h - 1);
        for x in 0..nw {
            let (x0, x1, fx) = src(x, sx, w);
            for ch in 0..c {
                let p = &s.image[ch * h * w..(ch + 1) * h * w];
                let top = p[y0 * w + x0] * (1.0 - fx) + p[y0 * w + x1] * fx;
                let bottom = p[y1 * w + x0] * (1.0 - fx) + p[y1 * w + x1] * fx;
                image[ch * nh * nw + y * nw + x] = top * (1.0 - fy) + bottom * fy;
            }
            let nx = (((x as f32 + 0.5) * sx) as usize).min(w - 1);
            mask[y * nw + x] = s.mask[ny * w + nx];
        }
    }
    Sample {
        image,
        mask,
        channels: c,
        height: nh,
        width: nw,
    }
}

/// Copies the window of `size` whose top-left corner is `origin` in input coordinates
/// (negative: the input starts inside the output). Outside pixels get `pad` / [`VOID`].
fn crop_or_pad(s: Sample, size: (usize, usize), origin: (isize, isize), pad: f32) -> Sample {
    let (h, w) = size;
    let c = s.channels;
    let mut image = vec![pad; c * h * w];
    let mut mask = vec![VOID; h * w];
    for y in 0..h {
        let sy = y as isize + origin.0;
        if sy < 0 || sy >= s.height as isize {
            continue;
        }
        for x in 0..w {
            let sx = x as isize + origin.1;
            if sx < 0 || sx >= s.width as isize {
                continue;
            }
            let (src, dst) = (sy as usize * s.width + sx as usize, y * w + x);
            mask[dst] = s.mask[src];
            for ch in 0..c {
                image[ch * h * w + dst] = s.image[ch * s.height * s.width + src];
            }
        }
    }
    Sample {
        image,
        mask,
        channels: c,
        height: h,
        width: w,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn ramp(h: usize, w: usize) -> Sample {
        let n = h * w;
        Sample::new(
            (0..n).map(|v| v as f32).collect(),
            (0..n as u32).collect(),
            1,
            h,
            w,
        )
        .unwrap()
    }

    #[test]
    fn identity_by_default() {
        let t = Transform::new(TransformConfig::default()).unwrap();
        let s = ramp(3, 5);
        assert_eq!(
            t.apply(s.clone(), &mut ChaCha8Rng::seed_from_u64(1))
                .unwrap(),
            s
        );
    }

    #[test]
    fn flip_mirrors_image_and_mask_together() {
        let t = Transform::new(TransformConfig {
            hflip: 1.0,
            ..Default::default()
        })
        .unwrap();
        let out = t
            .apply(ramp(2, 3), &mut ChaCha8Rng::seed_from_u64(0))
            .unwrap();
        assert_eq!(out.image, vec![2., 1., 0., 5., 4., 3.]);
        assert_eq!(out.mask, vec![2, 1, 0, 5, 4, 3]);
    }

    #[test]
    fn centre_crop_and_pad() {
        let crop = Transform::new(TransformConfig {
            crop: Some((1, 3)),
            center_crop: true,
            ..Default::default()
        })
        .unwrap();
        let out = crop
            .apply(ramp(3, 5), &mut ChaCha8Rng::seed_from_u64(0))
            .unwrap();
        assert_eq!(out.mask, vec![6, 7, 8]);
        let pad = Transform::new(TransformConfig {
            crop: Some((3, 3)),
            center_crop: true,
            pad_value: -1.0,
            ..Default::default()
        })
        .unwrap();
        let out = pad
            .apply(ramp(1, 1), &mut ChaCha8Rng::seed_from_u64(0))
            .unwrap();
        assert_eq!(out.mask[4], 0);
        assert_eq!(out.mask.iter().filter(|&&m| m == VOID).count(), 8);
        assert_eq!(out.image[0], -1.0);
    }

    #[test]
    fn random_crop_is_reproducible_and_stays_inside() {
        let t = Transform::new(TransformConfig {
            crop: Some((4, 4)),
            hflip: 0.5,
            scale: (0.5, 2.0),
            ..Default::default()
        })
        .unwrap();
        for seed in 0..20 {
            let a = t
                .apply(ramp(8, 8), &mut ChaCha8Rng::seed_from_u64(seed))
                .unwrap();
            let b = t
                .apply(ramp(8, 8), &mut ChaCha8Rng::seed_from_u64(seed))
                .unwrap();
            assert_eq!(a, b);
            assert_eq!((a.height, a.width, a.image.len()), (4, 4, 16));
        }
    }

    #[test]
    fn rescale_doubles_with_nearest_mask() {
        let out = rescale(ramp(2, 2), 2.0);
        assert_eq!((out.height, out.width), (4, 4));
        assert_eq!(
            out.mask,
            vec![0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
        );
        assert_eq!(out.image[0], 0.0);
        assert!((out.image[1] - 0.25).abs() < 1e-6);
    }

    #[test]
    fn normalises_per_channel_and_checks_lengths() {
        let t = Transform::new(TransformConfig {
            mean: vec![1.0, 2.0],
            std: vec![2.0],
            ..Default::default()
        })
        .unwrap();
        let s = Sample::new(vec![3.0, 4.0], vec![0], 2, 1, 1).unwrap();
        let out = t.apply(s, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
        assert_eq!(out.image, vec![1.0, 1.0]);
        assert!(t
            .apply(ramp(1, 1), &mut ChaCha8Rng::seed_from_u64(0))
            .is_err());
        assert!(Transform::new(TransformConfig {
            std: vec![0.0],
            ..Default::default()
        })
        .is_err());
        assert!(Transform::new(TransformConfig {
            scale: (2.0, 1.0),
            ..Default::default()
        })
        .is_err());
    }
}
