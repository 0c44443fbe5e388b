//! Random label images made of filled triangles (the authors' `dummy_triangles`).

use rand::Rng;

/// A `size × size` label image, row-major, of `background` with one random triangle per
/// value of `fills`, drawn in that order (later triangles cover earlier ones). Each
/// triangle has three vertices drawn uniformly from the pixel grid.
pub fn random_triangles(size: usize, background: u8, fills: &[u8], rng: &mut impl Rng) -> Vec<u8> {
    let mut image = vec![background; size * size];
    for &fill in fills {
        let vertices =
            std::array::from_fn(|_| (rng.random_range(0..size), rng.random_range(0..size)));
        fill_triangle(&mut image, size, vertices, fill);
    }
    image
}

/// Sets to `value` every pixel `(x, y)` of the `size × size` image that lies inside the
/// triangle or on its border; `vertices` are `(x, y)` pixel coordinates below `size`.
pub fn fill_triangle(image: &mut [u8], size: usize, vertices: [(usize, usize); 3], value: u8) {
    let v = vertices.map(|(x, y)| (x as i64, y as i64));
    // Twice the signed area of (a, b, p): its sign says on which side of a→b the point p is.
    let side = |a: (i64, i64), b: (i64, i64), p: (i64, i64)| {
        (b.0 - a.0) * (p.1 - a.1) - (b.1 - a.1) * (p.0 - a.0)
    };
    // Scanning only the bounding box also keeps a degenerate (flat) triangle to its segment.
    let (xs, ys) = (v.map(|p| p.0), v.map(|p| p.1));
    let (x0, x1) = (xs.iter().min(), xs.iter().max());
    let (y0, y1) = (ys.iter().min(), ys.iter().max());
    let (Some(&x0), Some(&x1), Some(&y0), Some(&y1)) = (x0, x1, y0, y1) else {
        return;
    };
    for y in y0..=y1 {
        for x in x0..=x1 {
            let s = [
                side(v[0], v[1], (x, y)),
                side(v[1], v[2], (x, y)),
                side(v[2], v[0], (x, y)),
            ];
            if s.iter().all(|&s| s >= 0) || s.iter().all(|&s| s <= 0) {
                image[y as usize * size + x as usize] = value;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::{fill_triangle, random_triangles};

    #[test]
    fn a_right_triangle_covers_the_pixels_under_its_hypotenuse() {
        let mut image = vec![0u8; 16];
        fill_triangle(&mut image, 4, [(0, 0), (3, 0), (0, 3)], 1);
        for y in 0..4 {
            for x in 0..4 {
                assert_eq!(image[y * 4 + x], u8::from(x + y <= 3), "pixel ({x}, {y})");
            }
        }
    }

    #[test]
    fn a_flat_triangle_draws_only_its_segment() {
        let mut image = vec![0u8; 25];
        fill_triangle(&mut image, 5, [(1, 2), (3, 2), (2, 2)], 7);
        let drawn: Vec<usize> = (0..25).filter(|&i| image[i] == 7).collect();
        assert_eq!(drawn, vec![11, 12, 13]);
    }

    #[test]
    fn triangles_are_drawn_in_order_from_the_seed() {
        let draw = |seed| random_triangles(32, 0, &[255, 1], &mut ChaCha8Rng::seed_from_u64(seed));
        let image = draw(3);
        assert_eq!(image, draw(3));
        assert!(image.iter().all(|&v| v == 0 || v == 1 || v == 255));
    }
}
