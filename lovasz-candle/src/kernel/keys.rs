//! A pixel's sort key: its error's bits packed with its pixel index, slope bit and
//! foreground bit into one integer twice the float's width (`u64` for f32, `u128` for
//! f64), so that ascending integer order is decreasing error order, ties by ascending
//! pixel index; and the float operations the kernel takes without branches.
//!
//! The pixel index of a group of several images is `image << index_shift(S) | pixel`, in
//! 30 bits; the bits below it are the slope and foreground bits.

/// A float dtype's errors packed with their pixels into integer sort keys (a supertrait
/// of [`Real`](crate::kernel::Real)).
pub(crate) trait PackedKey: Sized {
    /// (descending error key, pixel index, slope bit, foreground bit) packed so that
    /// ascending integer order is descending error order, ties by ascending index.
    type Packed: Ord + Copy + Send + Sync + 'static;
    fn pack(err: Self, index: u32, slope: bool, fg: bool) -> Self::Packed;
    /// The high half of [`PackedKey::pack`]'s key, widened to `u64`: ascending order of
    /// these is descending error order (the total order of IEEE floats, reversed).
    fn error_key(err: Self) -> u64;
    /// The pixel index (`< 2^30`), the slope bit and the foreground bit.
    fn unpack(p: Self::Packed) -> (usize, bool, bool);
    /// The error a key was made from.
    fn error(p: Self::Packed) -> Self;
    /// [`PackedKey::error`] for a key whose error has its sign bit clear (an absolute
    /// value, NaN included): the same bits, with no select on the sign.
    fn unsigned_error(p: Self::Packed) -> Self;
    /// How many of `keys` are foreground keys, and the largest of those (the smallest
    /// foreground error; meaningless when there are none).
    fn foreground_floor(keys: &[Self::Packed]) -> (u64, Self::Packed);
}

/// The low word of a packed key: index, slope bit, foreground bit.
#[inline]
fn low_word(index: u32, slope: bool, fg: bool) -> u32 {
    index << 2 | u32::from(slope) << 1 | u32::from(fg)
}

#[inline]
fn split_low_word(w: u32) -> (usize, bool, bool) {
    ((w >> 2) as usize, w & 2 != 0, w & 1 != 0)
}

/// The methods of [`PackedKey`] for a float whose bits are `$bits`, packed with the low word
/// into `$packed` (twice as wide): the error's bits in the high half, the low word of
/// [`low_word`] in the bottom 32 bits.
macro_rules! packed_key_ops {
    ($t:ty, $bits:ty, $packed:ty, $descending:ident) => {
        #[inline]
        fn pack(err: $t, index: u32, slope: bool, fg: bool) -> $packed {
            (<$packed>::from($descending(err)) << <$bits>::BITS)
                | <$packed>::from(low_word(index, slope, fg))
        }
        #[inline]
        fn error_key(err: $t) -> u64 {
            u64::from($descending(err))
        }
        #[inline]
        fn unpack(p: $packed) -> (usize, bool, bool) {
            split_low_word(p as u32)
        }
        #[inline]
        fn error(p: $packed) -> $t {
            const TOP: u32 = <$bits>::BITS - 1;
            let ascending = !((p >> <$bits>::BITS) as $bits);
            <$t>::from_bits(if ascending >> TOP == 1 {
                ascending & !(1 << TOP)
            } else {
                !ascending
            })
        }
        fn foreground_floor(keys: &[$packed]) -> (u64, $packed) {
            // Branch-free over the high words (a background key counts as 0), which the
            // compiler can vectorise.
            let (mut count, mut top) = (0u64, 0 as $bits);
            for &k in keys {
                let fg = (k as $bits) & 1;
                count += fg as u64;
                let high = ((k >> <$bits>::BITS) as $bits) & fg.wrapping_neg();
                top = if high > top { high } else { top };
            }
            (count, <$packed>::from(top) << <$bits>::BITS)
        }
        #[inline]
        fn unsigned_error(p: $packed) -> $t {
            <$t>::from_bits(!((p >> <$bits>::BITS) as $bits) & !(1 << (<$bits>::BITS - 1)))
        }
    };
}

/// The total order of IEEE floats of the width `$bits` as unsigned integers, reversed:
/// ascending order of the results is descending order of the floats.
macro_rules! descending_bits {
    ($name:ident, $t:ty, $bits:ty) => {
        #[inline]
        fn $name(err: $t) -> $bits {
            const TOP: u32 = <$bits>::BITS - 1;
            let bits = err.to_bits();
            let ascending = if bits >> TOP == 1 {
                !bits
            } else {
                bits | 1 << TOP
            };
            !ascending
        }
    };
}

descending_bits!(descending_bits32, f32, u32);
descending_bits!(descending_bits64, f64, u64);

impl PackedKey for f32 {
    type Packed = u64;
    packed_key_ops!(f32, u32, u64, descending_bits32);
}

impl PackedKey for f64 {
    type Packed = u128;
    packed_key_ops!(f64, u64, u128, descending_bits64);
}

/// Bits of a key's pixel index that hold the pixel within its image: enough for
/// `spatial - 1`. The image within the group is in the bits above.
pub(crate) fn index_shift(spatial: usize) -> u32 {
    usize::BITS - spatial.saturating_sub(1).leading_zeros()
}
