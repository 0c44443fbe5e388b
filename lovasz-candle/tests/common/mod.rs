//! What the tests that compare two paths of the same loss share: a random problem and the
//! comparison of flat results.
#![allow(dead_code)]

use candle::{DType, Device, Tensor};

#[path = "../../src/test_rng.rs"]
mod test_rng;

pub type Result<T> = anyhow::Result<T>;

/// Values in `[-3, 3)` of `dims` (tie-free in practice), and labels below `classes` of
/// `label_dims` with about one pixel in 9 void (255), on the CPU.
pub fn problem(
    dims: &[usize],
    label_dims: &[usize],
    classes: u32,
    seed: u64,
) -> Result<(Tensor, Tensor)> {
    let mut rng = test_rng::Lcg(seed);
    let n: usize = dims.iter().product();
    let x: Vec<f32> = (0..n).map(|_| 6.0 * rng.next_f32() - 3.0).collect();
    let m: usize = label_dims.iter().product();
    let labels: Vec<u32> = (0..m)
        .map(|i| {
            if i % 9 == 4 {
                255
            } else {
                (rng.next_u64() >> 33) as u32 % classes
            }
        })
        .collect();
    Ok((
        Tensor::from_vec(x, dims, &Device::Cpu)?,
        Tensor::from_vec(labels, label_dims, &Device::Cpu)?,
    ))
}

/// `t` as f64 values on the host.
pub fn flat(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?)
}

/// Fails unless `got` and `want` have the same length and agree within `tol` relative
/// (to magnitudes of at least `floor`), NaN matching NaN.
pub fn assert_all_close(what: &str, got: &[f64], want: &[f64], tol: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: sizes");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= tol * w.abs().max(floor) || (g.is_nan() && w.is_nan());
        assert!(ok, "{what}[{i}]: {g} vs {w}");
    }
}

/// [`assert_all_close`], but allowing up to `share` of the entries to differ: where the two
/// paths' inputs to the sort differ by an ulp (probabilities from logits through two
/// exponentials), errors tied to within it may rank differently and swap weights.
pub fn assert_mostly_close(
    what: &str,
    got: &[f64],
    want: &[f64],
    tol: f64,
    floor: f64,
    share: f64,
) {
    assert_eq!(got.len(), want.len(), "{what}: sizes");
    let off = (got.iter().zip(want))
        .filter(|(g, w)| {
            !((*g - *w).abs() <= tol * w.abs().max(floor) || (g.is_nan() && w.is_nan()))
        })
        .count();
    let limit = (share * got.len() as f64).ceil() as usize;
    assert!(
        off <= limit,
        "{what}: {off} of {} entries differ (at most {limit} allowed)",
        got.len()
    );
}
