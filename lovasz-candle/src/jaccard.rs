//! The Jaccard gradient (Alg. 1 of Berman et al., CVPR 2018): the weights that the
//! Lovász extension of the Jaccard loss gives to errors sorted in decreasing order.

use candle::{bail, DType, Device, Result, Tensor};

/// Running state of the Jaccard gradient over a sorted ground-truth vector.
///
/// With `G` foreground pixels in the group, after `k` sorted pixels of which `f` are
/// foreground and `b = k - f` background, the Jaccard loss of the prefix set is
/// `J_k = 1 - (G - f) / (G + b)` and the weight of pixel `k` is `J_k - J_(k-1)`. In closed
/// form that is `1 / (G + b)` for a foreground pixel and `(G - f) / ((G + b - 1)(G + b))`
/// for a background one (`1` for the first pixel when `G = 0`). Counts are exact integers,
/// the weights are taken in f64 without the cancellation of a difference, and `1 / (G + b)`
/// is kept between steps, so a step costs at most one division.
#[derive(Debug, Clone)]
pub(crate) struct JaccardWalk {
    gts: u64,
    fg_seen: u64,
    bg_seen: u64,
    /// `1 / (G + b)` for the current `b` (0 while `G + b = 0`: no weight reads it then,
    /// and the blend in [`Self::step_blended`] needs it finite).
    inv_union: f64,
}

impl JaccardWalk {
    /// Starts a walk over a group with `gts` foreground pixels.
    pub fn new(gts: u64) -> Self {
        Self {
            gts,
            fg_seen: 0,
            bg_seen: 0,
            inv_union: reciprocal(gts),
        }
    }

    /// Resumes a walk after `fg_seen` foreground and `bg_seen` background pixels: the same
    /// state, bit for bit, as stepping over them.
    pub fn resume(gts: u64, fg_seen: u64, bg_seen: u64) -> Self {
        Self {
            gts,
            fg_seen,
            bg_seen,
            inv_union: reciprocal(gts + bg_seen),
        }
    }

    /// Advances by one sorted pixel and returns its weight `J_k - J_(k-1)`.
    ///
    /// Branches on `fg`: the faster step when the ground truth is mostly one value (a
    /// class among many, where a foreground pixel also skips the division), the slower
    /// one when it is close to random in sorted order; see [`Self::step_blended`].
    #[inline]
    pub fn step(&mut self, fg: bool) -> f64 {
        if fg {
            // A foreground pixel exists, so G >= 1 and 1 / (G + b) is finite.
            self.fg_seen += 1;
            return self.inv_union;
        }
        self.bg_seen += 1;
        let union = self.gts + self.bg_seen;
        let inv_prev = self.inv_union;
        self.inv_union = 1.0 / count(union);
        if union == 1 {
            // G = 0: the first pixel takes J from 0 to 1.
            return 1.0;
        }
        count(self.gts - self.fg_seen) * inv_prev * self.inv_union
    }

    /// [`Self::step`] without a branch on `fg`, the same weight bit for bit: both cases
    /// are computed and blended by 0 / 1 factors (exact, both weights being finite). When
    /// the ground truth in sorted order is close to random (a binary loss), a branch
    /// mispredicts on about every other pixel, which costs more than the division both
    /// cases then take.
    #[inline]
    pub fn step_blended(&mut self, fg: bool) -> f64 {
        let is_fg = u64::from(fg);
        self.fg_seen += is_fg;
        self.bg_seen += 1 - is_fg;
        let union = self.gts + self.bg_seen;
        let inv_prev = self.inv_union;
        // For a foreground pixel `union` is unchanged and so is its reciprocal.
        self.inv_union = 1.0 / count(union);
        let bg_weight = if union == 1 {
            // G = 0: the first pixel takes J from 0 to 1 (taken at most once per walk).
            1.0
        } else {
            count(self.gts - self.fg_seen) * inv_prev * self.inv_union
        };
        let fg_factor = is_fg as i64 as f64;
        inv_prev * fg_factor + bg_weight * (1.0 - fg_factor)
    }
}

/// `1 / n` for a union count, 0 for `n = 0`; a step's own unions are at least 1.
fn reciprocal(n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        1.0 / count(n)
    }
}

/// A pixel count as f64. Counts stay below 2^62, so going through i64 is exact, and it is
/// one instruction on x86-64 where u64 to f64 takes several.
#[inline]
fn count(n: u64) -> f64 {
    n as i64 as f64
}

/// The Jaccard gradient of a ground-truth vector sorted by decreasing error (the
/// reference's `lovasz_grad`, Alg. 1 of the paper).
///
/// * `gt_sorted`: 1-D, values 0 or 1, any integer dtype (u8, u32, i64, ...) or f32 / f64.
///
/// Returns a 1-D tensor of the same length on the same device: f64 if `gt_sorted` is f64,
/// else f32. An empty input gives an empty output.
///
/// ```
/// # fn main() -> candle::Result<()> {
/// use candle::{Device, Tensor};
/// let gt = Tensor::new(&[1u32, 0, 1, 0], &Device::Cpu)?;
/// let g = lovasz_candle::lovasz_grad(&gt)?.to_vec1::<f32>()?;
/// // J = 1 - I/U over the prefixes: 0.5, 2/3, 1, 1
/// assert!((g[0] - 0.5).abs() < 1e-6 && (g[2] - 1.0 / 3.0).abs() < 1e-6 && g[3] == 0.0);
/// # Ok(()) }
/// ```
pub fn lovasz_grad(gt_sorted: &Tensor) -> Result<Tensor> {
    if gt_sorted.rank() != 1 {
        bail!(
            "lovasz_grad expects a 1-D gt_sorted, got shape {:?}",
            gt_sorted.dims()
        )
    }
    let out_dtype = match gt_sorted.dtype() {
        DType::F64 => DType::F64,
        DType::F16 | DType::BF16 | DType::F32 => DType::F32,
        DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64 => DType::F32,
        dt => bail!("lovasz_grad: unsupported dtype {dt:?} for gt_sorted"),
    };
    let host: Vec<f64> = gt_sorted
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1()?;
    let mut fg = Vec::with_capacity(host.len());
    for (i, &v) in host.iter().enumerate() {
        if v == 1.0 {
            fg.push(true);
        } else if v == 0.0 {
            fg.push(false);
        } else {
            bail!("lovasz_grad: gt_sorted must hold 0 or 1, got {v} at position {i}")
        }
    }
    let gts = fg.iter().filter(|&&f| f).count() as u64;
    let mut walk = JaccardWalk::new(gts);
    let grad: Vec<f64> = fg.iter().map(|&f| walk.step(f)).collect();
    Tensor::from_vec(grad, host.len(), gt_sorted.device())?.to_dtype(out_dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_final_jaccard() {
        // The weights telescope: their sum is J of the full set, 1 when G > 0 or n > 0.
        let fg = [true, false, false, true, true, false];
        let mut walk = JaccardWalk::new(3);
        let total: f64 = fg.iter().map(|&f| walk.step(f)).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }

    #[test]
    fn closed_form_matches_differences_of_the_jaccard_loss() {
        let fg = [
            false, true, true, false, false, true, false, true, false, false,
        ];
        let gts = fg.iter().filter(|&&f| f).count() as u64;
        let jaccard = |f: u64, b: u64| 1.0 - (gts - f) as f64 / (gts + b) as f64;
        let mut walk = JaccardWalk::new(gts);
        let (mut f, mut b, mut prev) = (0, 0, 0.0);
        for &is_fg in &fg {
            if is_fg {
                f += 1;
            } else {
                b += 1;
            }
            let j = jaccard(f, b);
            let w = walk.step(is_fg);
            assert!((w - (j - prev)).abs() < 1e-15, "{w} vs {}", j - prev);
            prev = j;
        }
    }

    #[test]
    fn a_resumed_walk_continues_bit_for_bit() {
        let fg: Vec<bool> = (0..50).map(|i| i % 7 == 2 || i % 11 == 0).collect();
        let gts = fg.iter().filter(|&&f| f).count() as u64;
        let mut whole = JaccardWalk::new(gts);
        let all: Vec<f64> = fg.iter().map(|&f| whole.step(f)).collect();
        for split in [0, 1, 13, 49, 50] {
            let f_before = fg[..split].iter().filter(|&&f| f).count() as u64;
            let mut resumed = JaccardWalk::resume(gts, f_before, split as u64 - f_before);
            for (i, &f) in fg.iter().enumerate().skip(split) {
                assert_eq!(resumed.step(f).to_bits(), all[i].to_bits(), "split {split}");
            }
        }
    }

    #[test]
    fn blended_steps_match_branched_steps() {
        let mut rng = crate::test_rng::Lcg(5);
        for (n, every) in [(200usize, 2u64), (200, 20), (50, 1), (50, 0)] {
            let fg: Vec<bool> = (0..n)
                .map(|_| {
                    let state = rng.next_u64();
                    every > 0 && (state >> 33) % every == 0
                })
                .collect();
            let gts = fg.iter().filter(|&&f| f).count() as u64;
            let (mut a, mut b) = (JaccardWalk::new(gts), JaccardWalk::new(gts));
            for &f in &fg {
                assert_eq!(a.step(f).to_bits(), b.step_blended(f).to_bits(), "n {n}");
            }
        }
    }

    #[test]
    fn no_foreground_puts_all_weight_first() {
        let mut walk = JaccardWalk::new(0);
        assert_eq!(walk.step(false), 1.0);
        assert_eq!(walk.step(false), 0.0);
        assert_eq!(JaccardWalk::resume(0, 0, 0).step(false), 1.0);
        assert_eq!(JaccardWalk::resume(0, 0, 3).step(false), 0.0);
        let mut blended = JaccardWalk::new(0);
        assert_eq!(blended.step_blended(false), 1.0);
        assert_eq!(blended.step_blended(false), 0.0);
        assert_eq!(JaccardWalk::resume(0, 0, 0).step_blended(false), 1.0);
    }

    #[test]
    fn rejects_non_binary_and_bad_rank() {
        let dev = Device::Cpu;
        let err = lovasz_grad(&Tensor::new(&[0u32, 2], &dev).unwrap()).unwrap_err();
        assert!(err.to_string().contains("0 or 1"), "{err}");
        let err = lovasz_grad(&Tensor::zeros((2, 2), DType::U32, &dev).unwrap()).unwrap_err();
        assert!(err.to_string().contains("1-D"), "{err}");
    }
}
