//! The exponential of the fused softmax, computed by the same IEEE operations on every
//! device: Cody-Waite range reduction `x = n ln 2 + r` (`|r| <= ln 2 / 2`), the Taylor
//! polynomial of `e^r` in Horner form, and a scale by `2^n` built from its bits. With no
//! fused multiply-adds (Rust never contracts; `cuda/lovasz.cu` is built with
//! `-fmad=false`) the CPU and the CUDA kernel (`portable_exp` there) get the same bits,
//! so the probabilities from logits, and the order of their errors, are the same on both.
//! Within 2 ulp of the correctly rounded value (tested below against `std`).

/// `e^x` in f32: NaN for NaN, `+inf` above the largest finite result, `0` below the
/// smallest subnormal one. Without branches (selects only), so that loops over it
/// vectorise: `n` is rounded by the add-and-subtract of `1.5 · 2^23`, and `2^n` is applied
/// as two powers of two that are normal numbers whatever `n`.
#[inline]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // few bits: n · LN2_HI is exact for |n| < 256
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    let (lo, hi) = (-103.972_08, 88.722_84);
    let y = x.clamp(lo, hi);
    let n = (y * LOG2E + ROUND) - ROUND;
    let r = (y - n * LN2_HI) - n * LN2_LO;
    let c = |k: f32| 1.0 / k;
    let p = 1.0
        + r * (1.0
            + r * (c(2.0)
                + r * (c(6.0) + r * (c(24.0) + r * (c(120.0) + r * (c(720.0) + r * c(5040.0)))))));
    let n = n as i32;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let half = n >> 1;
    let v = p * pow2(half) * pow2(n - half);
    let v = if x > hi { f32::INFINITY } else { v };
    let v = if x < lo { 0.0 } else { v };
    if x.is_nan() {
        x
    } else {
        v
    }
}

/// `e^x` in f64, as [`exp_f32`] (rounding by `1.5 · 2^52`).
#[inline]
pub(crate) fn exp_f64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    let ln2_hi = f64::from_bits(0x3fe6_2e42_fee0_0000); // low 21 bits zero
    let (lo, hi) = (-745.133_219_101_941_2, 709.782_712_893_384);
    let y = x.clamp(lo, hi);
    let n = (y * LOG2E + ROUND) - ROUND;
    let r = (y - n * ln2_hi) - n * LN2_LO;
    // 1 / k! for k = 13 down to 2, then 1 + r (1 + r (...)).
    let mut p = 1.0 / 6_227_020_800.0;
    for k in [
        479_001_600.0,
        39_916_800.0,
        3_628_800.0,
        362_880.0,
        40_320.0,
        5_040.0,
        720.0,
        120.0,
        24.0,
        6.0,
        2.0,
        1.0,
        1.0,
    ] {
        p = 1.0 / k + r * p;
    }
    let n = n as i64;
    let pow2 = |e: i64| f64::from_bits(((e + 1023) as u64) << 52);
    let half = n >> 1;
    let v = p * pow2(half) * pow2(n - half);
    let v = if x > hi { f64::INFINITY } else { v };
    let v = if x < lo { 0.0 } else { v };
    if x.is_nan() {
        x
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in representable values.
    fn ulps32(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    fn ulps64(a: f64, b: f64) -> u64 {
        (a.to_bits() as i128 - b.to_bits() as i128).unsigned_abs() as u64
    }

    #[test]
    fn within_two_ulp_of_std_over_the_range() {
        let mut worst = (0u32, 0u64);
        let steps = 200_000;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let x = -103.0 + t * (88.0 + 103.0);
            worst.0 = worst.0.max(ulps32(exp_f32(x as f32), (x as f32).exp()));
            let x = -744.0 + t * (709.0 + 744.0);
            worst.1 = worst.1.max(ulps64(exp_f64(x), x.exp()));
        }
        for x in [-1e-3f64, -0.3, -0.5, 0.346, -0.347, -20.0, -87.5] {
            worst.0 = worst.0.max(ulps32(exp_f32(x as f32), (x as f32).exp()));
            worst.1 = worst.1.max(ulps64(exp_f64(x), x.exp()));
        }
        eprintln!("worst ulp error (f32, f64): {worst:?}");
        assert!(worst.0 <= 2 && worst.1 <= 2, "worst ulp error {worst:?}");
    }

    #[test]
    fn special_values() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f64(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f64(1000.0), f64::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan() && exp_f64(f64::NAN).is_nan());
        // Subnormal results, as std gives them (to 2 ulp).
        assert!(ulps32(exp_f32(-100.0), (-100f32).exp()) <= 2);
        assert!(ulps64(exp_f64(-740.0), (-740f64).exp()) <= 2);
    }
}
