//! [`ShapesDataset`]: synthetic images of random shapes, generated on the fly from a seed.

use rand::Rng;

use crate::rng::rng_for;
use crate::{voc_palette, Dataset, Error, Result, Sample, VOID};

/// Options of the synthetic shapes generator.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapesConfig {
    /// Number of classes `K`, background included (2..=255). Default 6.
    pub num_classes: usize,
    /// Image height in pixels. Default 64.
    pub height: usize,
    /// Image width in pixels. Default 64.
    pub width: usize,
    /// Number of samples. Default 512.
    pub len: usize,
    /// Seed: sample `i` depends only on `(seed, i)` and the other options. Use different
    /// seeds for train and validation sets; class appearance does not depend on it.
    pub seed: u64,
    /// Image channels: 3 (RGB) or 1 (grey). Default 3.
    pub channels: usize,
    /// Width in pixels of the void (255) band along the outline of filled shapes, like
    /// the Pascal VOC borders; 0 for none. Default 1.0.
    pub void_border: f32,
    /// Standard deviation of the per-pixel Gaussian noise. Default 0.08.
    pub noise: f32,
}

impl Default for ShapesConfig {
    fn default() -> Self {
        ShapesConfig {
            num_classes: 6,
            height: 64,
            width: 64,
            len: 512,
            seed: 0,
            channels: 3,
            void_border: 1.0,
            noise: 0.08,
        }
    }
}

/// What class `c >= 1` draws: `(c - 1) % 4` picks the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Filled rotated ellipses, common and large.
    Ellipse,
    /// Filled convex polygons (3 to 6 vertices).
    Polygon,
    /// Thin line segments, 1 to 2 px wide: a thin class, no void band.
    Line,
    /// Small ellipses present in about one image in four: a rare class.
    Speck,
}

fn kind(class: usize) -> Kind {
    match (class - 1) % 4 {
        0 => Kind::Ellipse,
        1 => Kind::Polygon,
        2 => Kind::Line,
        _ => Kind::Speck,
    }
}

/// Synthetic segmentation images: `K - 1` foreground classes of random shapes on a
/// textured, noisy background (class 0).
///
/// Class `c >= 1` draws, by `(c - 1) % 4`: filled ellipses, filled convex polygons,
/// thin lines (1–2 px, a thin class) or small specks in about a quarter of the images
/// (a rare class). Each class has its own colour and stripe texture, shared across
/// seeds, jittered per instance; filled shapes get a void band of
/// [`ShapesConfig::void_border`] px on their outline. Samples are generated in `get`,
/// fully determined by the seed and index, so any size and count cost no memory.
///
/// ```
/// use datasets::{Dataset, ShapesConfig, ShapesDataset};
/// let ds = ShapesDataset::new(ShapesConfig { num_classes: 5, len: 10, seed: 7, ..Default::default() });
/// let s = ds.get(3)?;
/// assert_eq!((s.channels, s.height, s.width), (3, 64, 64));
/// assert_eq!(s, ds.get(3)?);
/// # Ok::<(), datasets::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ShapesDataset {
    cfg: ShapesConfig,
}

impl ShapesDataset {
    /// A generator with these options. Invalid options (see [`ShapesDataset::try_new`])
    /// make every `get` return the error.
    pub fn new(cfg: ShapesConfig) -> Self {
        ShapesDataset { cfg }
    }

    /// Like [`ShapesDataset::new`] but checks the options now: `2 <= num_classes <= 255`,
    /// `height, width >= 8`, `channels` 1 or 3, finite non-negative `void_border` and
    /// `noise`.
    pub fn try_new(cfg: ShapesConfig) -> Result<Self> {
        validate(&cfg)?;
        Ok(ShapesDataset { cfg })
    }

    /// The options.
    pub fn config(&self) -> &ShapesConfig {
        &self.cfg
    }
}

fn validate(cfg: &ShapesConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(format!("ShapesConfig: {m}")));
    if !(2..=255).contains(&cfg.num_classes) {
        return bad(format!("num_classes {} is not in 2..=255", cfg.num_classes));
    }
    if cfg.height < 8 || cfg.width < 8 {
        return bad(format!("{}x{} is smaller than 8x8", cfg.height, cfg.width));
    }
    if cfg.channels != 1 && cfg.channels != 3 {
        return bad(format!("channels {} is not 1 or 3", cfg.channels));
    }
    if !(cfg.void_border.is_finite() && cfg.void_border >= 0.0) {
        return bad(format!("void_border {} is not >= 0", cfg.void_border));
    }
    if !(cfg.noise.is_finite() && cfg.noise >= 0.0) {
        return bad(format!("noise {} is not >= 0", cfg.noise));
    }
    Ok(())
}

/// A class's fixed look: base RGB colour and stripe direction/frequency.
fn class_look(class: usize, num_classes: usize) -> ([f32; 3], [f32; 2]) {
    let hue = (class - 1) as f32 / (num_classes - 1) as f32;
    let rgb = hsv_to_rgb(hue, 0.75, if class % 2 == 0 { 0.95 } else { 0.7 });
    let angle = class as f32 * 2.399; // golden angle: well-spread directions
    let freq = 0.4 + 0.25 * (class % 3) as f32;
    (rgb, [angle.cos() * freq, angle.sin() * freq])
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h6 = (h.fract() * 6.0).min(5.999);
    let f = h6.fract();
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match h6 as u32 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// A standard normal draw (Box–Muller).
fn gaussian(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// A shape as a signed distance (px, positive inside) at a pixel centre.
enum Shape {
    Ellipse {
        c: [f32; 2],
        axes: [f32; 2],
        angle: f32,
    },
    /// Convex polygon, vertices by increasing angle around its centre (x right, y down).
    Polygon { vertices: Vec<[f32; 2]> },
    Line {
        a: [f32; 2],
        b: [f32; 2],
        half_width: f32,
    },
}

impl Shape {
    fn signed_distance(&self, p: [f32; 2]) -> f32 {
        match self {
            Shape::Ellipse { c, axes, angle } => {
                let (dx, dy) = (p[0] - c[0], p[1] - c[1]);
                let (s, co) = angle.sin_cos();
                let (u, v) = (co * dx + s * dy, -s * dx + co * dy);
                let rho = ((u / axes[0]).powi(2) + (v / axes[1]).powi(2)).sqrt();
                (1.0 - rho) * axes[0].min(axes[1])
            }
            Shape::Polygon { vertices } => {
                // Distance to each edge line, inward normal; exact inside a convex polygon.
                let n = vertices.len();
                (0..n)
                    .map(|i| {
                        let (a, b) = (vertices[i], vertices[(i + 1) % n]);
                        let (ex, ey) = (b[0] - a[0], b[1] - a[1]);
                        let len = (ex * ex + ey * ey).sqrt().max(1e-6);
                        (ex * (p[1] - a[1]) - ey * (p[0] - a[0])) / len
                    })
                    .fold(f32::INFINITY, f32::min)
            }
            Shape::Line { a, b, half_width } => {
                let (ex, ey) = (b[0] - a[0], b[1] - a[1]);
                let t = (((p[0] - a[0]) * ex + (p[1] - a[1]) * ey) / (ex * ex + ey * ey).max(1e-6))
                    .clamp(0.0, 1.0);
                let (dx, dy) = (p[0] - a[0] - t * ex, p[1] - a[1] - t * ey);
                half_width - (dx * dx + dy * dy).sqrt()
            }
        }
    }
}

fn random_shape(kind: Kind, rng: &mut impl Rng, h: f32, w: f32) -> Shape {
    let s = h.min(w);
    let centre = [rng.random_range(0.0..w), rng.random_range(0.0..h)];
    match kind {
        Kind::Ellipse => Shape::Ellipse {
            c: centre,
            axes: [
                rng.random_range(0.08..0.25) * s,
                rng.random_range(0.06..0.2) * s,
            ],
            angle: rng.random_range(0.0..std::f32::consts::PI),
        },
        Kind::Speck => {
            let r = (rng.random_range(0.025..0.06) * s).max(1.5);
            Shape::Ellipse {
                c: centre,
                axes: [r, r * rng.random_range(0.7..1.0)],
                angle: rng.random_range(0.0..std::f32::consts::PI),
            }
        }
        Kind::Polygon => {
            let n = rng.random_range(3..=6);
            let r = rng.random_range(0.1..0.28) * s;
            let mut angles: Vec<f32> = (0..n)
                .map(|_| rng.random_range(0.0..std::f32::consts::TAU))
                .collect();
            angles.sort_by(f32::total_cmp);
            let vertices = angles
                .iter()
                .map(|a| {
                    let rr = r * rng.random_range(0.75..1.0);
                    [centre[0] + rr * a.cos(), centre[1] + rr * a.sin()]
                })
                .collect();
            Shape::Polygon { vertices }
        }
        Kind::Line => {
            let len = rng.random_range(0.3..0.8) * s;
            let a = rng.random_range(0.0..std::f32::consts::PI);
            let d = [0.5 * len * a.cos(), 0.5 * len * a.sin()];
            Shape::Line {
                a: [centre[0] - d[0], centre[1] - d[1]],
                b: [centre[0] + d[0], centre[1] + d[1]],
                half_width: rng.random_range(0.55..1.0),
            }
        }
    }
}

/// Generates sample `index` of `cfg` (already validated).
fn generate(cfg: &ShapesConfig, index: usize) -> Sample {
    let (h, w, k) = (cfg.height, cfg.width, cfg.num_classes);
    let mut rng = rng_for(cfg.seed, &[index as u64]);
    let n = h * w;

    // Background: a tinted grey with a few low-frequency waves.
    let base = rng.random_range(0.3..0.55f32);
    let tint: [f32; 3] = std::array::from_fn(|_| rng.random_range(-0.06..0.06f32));
    let waves: Vec<[f32; 4]> = (0..3)
        .map(|_| {
            [
                rng.random_range(-0.3..0.3f32),
                rng.random_range(-0.3..0.3f32),
                rng.random_range(0.0..std::f32::consts::TAU),
                rng.random_range(0.03..0.09f32),
            ]
        })
        .collect();
    let mut rgb = vec![[0f32; 3]; n];
    for y in 0..h {
        for x in 0..w {
            let wave: f32 = waves
                .iter()
                .map(|[fx, fy, ph, amp]| amp * (fx * x as f32 + fy * y as f32 + ph).sin())
                .sum();
            rgb[y * w + x] = std::array::from_fn(|c| base + tint[c] + wave);
        }
    }
    let mut mask = vec![0u32; n];

    // Instances: filled shapes in random order, then thin lines on top.
    let mut instances = Vec::new();
    for class in 1..k {
        let (p, max) = match kind(class) {
            Kind::Speck => (0.25, 1),
            _ => (0.6, 2),
        };
        if rng.random_bool(p) {
            for _ in 0..rng.random_range(1..=max) {
                instances.push(class);
            }
        }
    }
    for i in (1..instances.len()).rev() {
        instances.swap(i, rng.random_range(0..=i));
    }
    instances.sort_by_key(|&c| kind(c) == Kind::Line);

    let half_band = 0.5 * cfg.void_border;
    for class in instances {
        let shape = random_shape(kind(class), &mut rng, h as f32, w as f32);
        let (colour, stripes) = class_look(class, k);
        let jitter: [f32; 3] = std::array::from_fn(|_| rng.random_range(-0.07..0.07f32));
        let phase = rng.random_range(0.0..std::f32::consts::TAU);
        let banded = kind(class) != Kind::Line && half_band > 0.0;
        for y in 0..h {
            for x in 0..w {
                let d = shape.signed_distance([x as f32 + 0.5, y as f32 + 0.5]);
                let p = y * w + x;
                if d >= 0.0 {
                    let stripe =
                        0.08 * (stripes[0] * x as f32 + stripes[1] * y as f32 + phase).sin();
                    rgb[p] = std::array::from_fn(|c| colour[c] + jitter[c] + stripe);
                    mask[p] = class as u32;
                }
                if banded && d.abs() < half_band {
                    mask[p] = VOID;
                }
            }
        }
    }

    let mut image = vec![0f32; cfg.channels * n];
    for (p, px) in rgb.iter().enumerate() {
        if cfg.channels == 1 {
            let luma = 0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2];
            image[p] = (luma + cfg.noise * gaussian(&mut rng)).clamp(0.0, 1.0);
        } else {
            for (c, v) in px.iter().enumerate() {
                image[c * n + p] = (v + cfg.noise * gaussian(&mut rng)).clamp(0.0, 1.0);
            }
        }
    }
    Sample {
        image,
        mask,
        channels: cfg.channels,
        height: h,
        width: w,
    }
}

impl Dataset for ShapesDataset {
    fn len(&self) -> usize {
        self.cfg.len
    }

    fn get(&self, i: usize) -> Result<Sample> {
        validate(&self.cfg)?;
        if i >= self.cfg.len {
            return Err(Error::Index {
                index: i,
                len: self.cfg.len,
            });
        }
        Ok(generate(&self.cfg, i))
    }

    fn num_classes(&self) -> usize {
        self.cfg.num_classes
    }

    fn channels(&self) -> usize {
        self.cfg.channels
    }

    fn class_names(&self) -> Vec<String> {
        (0..self.cfg.num_classes)
            .map(|c| match c {
                0 => "background".to_string(),
                c => {
                    let name = match kind(c) {
                        Kind::Ellipse => "ellipse",
                        Kind::Polygon => "polygon",
                        Kind::Line => "line",
                        Kind::Speck => "speck",
                    };
                    format!("{name}{c}")
                }
            })
            .collect()
    }

    fn palette(&self) -> Vec<[u8; 3]> {
        voc_palette(self.cfg.num_classes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polygon_and_line_distances() {
        let square = Shape::Polygon {
            vertices: vec![[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0]],
        };
        assert!((square.signed_distance([2.0, 1.0]) - 1.0).abs() < 1e-6);
        assert!(square.signed_distance([5.0, 2.0]) < 0.0);
        let line = Shape::Line {
            a: [0.0, 0.0],
            b: [10.0, 0.0],
            half_width: 1.0,
        };
        assert!((line.signed_distance([5.0, 0.5]) - 0.5).abs() < 1e-6);
        assert!(line.signed_distance([12.0, 0.0]) < 0.0);
    }
}
