//! [`Real`]: the float dtypes the losses are computed in (f32 and f64), with the
//! operations the kernels and the softmax take without branches.

use crate::kernel::keys::PackedKey;

/// A float dtype the losses are computed in: f32 or f64 (half precision is upcast to f32
/// before). Its errors can be ranked as packed integers ([`PackedKey`]).
pub(crate) trait Real: candle::WithDType + PartialOrd + PackedKey {
    /// `e^self`, as every softmax of the crate takes it: `f64::exp` in f64; in f32 a
    /// branch-free Cephes-style polynomial (range reduction by `ln 2`, degree-7 minimax on
    /// `[−ln 2 / 2, ln 2 / 2]`, within 2 ulp of `f32::exp`) that the compiler turns into
    /// vector code. Below about −87.3 it returns 0 (a softmax term is at most 1).
    fn exp(self) -> Self;
    /// `1` if `b`, else `0`, without a branch.
    fn indicator(b: bool) -> Self;
    /// `-self` if `b`, else `self`, without a branch (the sign bit flipped).
    fn neg_if(self, b: bool) -> Self;
    /// `|self|` (the sign bit cleared).
    fn abs(self) -> Self;
    fn is_nan(self) -> bool;
}

/// The methods of [`Real`] that are the same for f32 and f64 up to the width of their
/// bits: `(float, bits of the same width, bits of 1.0)`.
macro_rules! float_bit_ops {
    ($t:ty, $bits:ty, $one:expr) => {
        #[inline]
        fn indicator(b: bool) -> $t {
            <$t>::from_bits(<$bits>::from(b) * $one)
        }
        #[inline]
        fn neg_if(self, b: bool) -> $t {
            <$t>::from_bits(self.to_bits() ^ <$bits>::from(b) << (<$bits>::BITS - 1))
        }
        #[inline]
        fn abs(self) -> $t {
            <$t>::abs(self)
        }
        #[inline]
        fn is_nan(self) -> bool {
            <$t>::is_nan(self)
        }
    };
}

impl Real for f32 {
    float_bit_ops!(f32, u32, 0x3f80_0000);

    #[inline]
    fn exp(self) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        // Below ~-87.3 the result is subnormal: flush to 0.
        let x = self.clamp(-87.3, 88.0);
        // Round to nearest by the 1.5·2²³ trick (no libm call, so the loop vectorises).
        const ROUND: f32 = 12_582_912.0;
        let n = (x * LOG2E + ROUND) - ROUND;
        let r = x - n * LN2_HI - n * LN2_LO;
        let p = 1.987_569_1e-4_f32;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 0.166_666_65;
        let p = p * r + 0.5;
        let e = p * r * r + r + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
        let v = e * scale;
        if self < -87.3 {
            0.0
        } else if self.is_nan() {
            self
        } else {
            v
        }
    }
}

impl Real for f64 {
    float_bit_ops!(f64, u64, 0x3ff0_0000_0000_0000);

    #[inline]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
}

#[cfg(test)]
mod tests {
    use super::Real;

    #[test]
    fn f32_exp_is_within_two_ulp_of_the_standard_one() {
        let mut worst = 0u32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (a, b) = (Real::exp(x), x.exp());
            worst = worst.max(a.to_bits().abs_diff(b.to_bits()));
        }
        assert!(worst <= 2, "worst difference {worst} ulp");
        assert_eq!(Real::exp(-100f32), 0.0);
        assert_eq!(Real::exp(0f32), 1.0);
        assert!(Real::exp(f32::NAN).is_nan());
    }
}
