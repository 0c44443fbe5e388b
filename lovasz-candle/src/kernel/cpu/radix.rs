//! LSD radix sort of packed `u64` keys by their upper 32 bits (the error key), stable, so
//! equal errors keep the order they were generated in (ascending pixel index).
//!
//! Only the bits in which the high words differ are sorted on: errors in `[0, 1]` span 30
//! bits, sorted in three passes of 10 bits. Measured here on uniform errors, in ns per key
//! for 90k / 900k keys: 3.4 / 4.6 with three 10-bit passes, 4.9 / 6.2 with four 8-bit
//! passes, 11 / 14 for `sort_unstable`.
//! One large sort on several threads is [`super::partition`]'s: it sorts each of its
//! buckets here.

use super::buffer::working;

/// Below this many keys a comparison sort is faster than the radix passes.
const SMALL: usize = 1 << 11;

/// From this many keys on, digits of 10 or 11 bits (fewer passes) pay for their larger
/// histograms.
const WIDE_MIN: usize = 1 << 15;

/// Sorts `keys` in ascending order of `key >> 32`, ties in their current order; `scratch`
/// is working memory, and the two vectors may be swapped. For keys whose lower word
/// increases along the input (as the kernel generates them), the result is the ascending
/// order of the whole `u64`.
pub(crate) fn sort_by_high_word(keys: &mut Vec<u64>, scratch: &mut Vec<u64>) {
    working(scratch, keys.len());
    if radix(keys, scratch) {
        std::mem::swap(keys, scratch);
    }
}

/// Sorts `data` as [`sort_by_high_word`] does, with `scratch` of the same length; returns
/// whether the result ended in `scratch` (an odd number of passes) rather than in `data`.
fn radix(data: &mut [u64], scratch: &mut [u64]) -> bool {
    if data.len() < SMALL {
        data.sort_unstable();
        return false;
    }
    if data.len() >= WIDE_MIN {
        return radix_wide(data, scratch);
    }
    let (lo, hi) = high_range(data);
    radix_in(data, scratch, lo, 32 - (hi - lo).leading_zeros())
}

/// [`radix`] for at least [`WIDE_MIN`] keys: one pass takes both the keys' range and the
/// histograms of three 10-bit digits at fixed places of the high word (bits 0 to 30).
/// When the high words agree above bit 30 (errors in `[0, 2)` do) and those digits need
/// no more passes than digits placed on the range would, they are sorted on; else on the
/// range, as [`radix_in`] does.
fn radix_wide(data: &mut [u64], scratch: &mut [u64]) -> bool {
    const W: u32 = 10;
    // Arrays of a constant length: the masked digits index them without bounds checks.
    let mut hist = vec![[0usize; 1 << W]; 3];
    let (mut lo, mut hi) = (u32::MAX, 0u32);
    for &k in data.iter() {
        let h = (k >> 32) as u32;
        lo = lo.min(h);
        hi = hi.max(h);
        for (pass, counts) in hist.iter_mut().enumerate() {
            counts[digit::<W>(k, 0, pass)] += 1;
        }
    }
    let bits = 32 - (hi - lo).leading_zeros();
    let on_range = match bits {
        0 => 0,
        1..=10 => 1,
        11..=22 => 2,
        _ => 3,
    };
    let n = data.len();
    let fixed = hist.iter().filter(|h| !h.contains(&n)).count();
    // All high words between `lo` and `hi` share the bits above 30 when those two do.
    if (lo ^ hi) >> (3 * W) == 0 && fixed <= on_range {
        scatter_passes::<3, W>(data, scratch, 0, hist.as_flattened_mut())
    } else {
        radix_in(data, scratch, lo, bits)
    }
}

/// The smallest and largest high word of `keys` (`(u32::MAX, 0)` if empty).
pub(crate) fn high_range(keys: &[u64]) -> (u32, u32) {
    keys.iter().fold((u32::MAX, 0), |(lo, hi), &k| {
        let h = (k >> 32) as u32;
        (lo.min(h), hi.max(h))
    })
}

/// [`radix`] for keys whose high words lie in `lo .. lo + 2^bits`.
pub(crate) fn radix_in(data: &mut [u64], scratch: &mut [u64], lo: u32, bits: u32) -> bool {
    let n = data.len();
    if n < SMALL {
        data.sort_unstable();
        return false;
    }
    if bits == 0 {
        // One error value: the input order is the sorted order.
        return false;
    }
    // Small inputs keep histograms small; larger ones take fewer, wider passes. Digit
    // widths are constants: a shift by a variable amount made the scatter loop about 35 %
    // slower on x86-64 without BMI2.
    if n < WIDE_MIN {
        match bits.div_ceil(8) {
            1 => passes_of::<1, 8>(data, scratch, lo),
            2 => passes_of::<2, 8>(data, scratch, lo),
            3 => passes_of::<3, 8>(data, scratch, lo),
            _ => passes_of::<4, 8>(data, scratch, lo),
        }
    } else {
        match bits {
            ..=10 => passes_of::<1, 10>(data, scratch, lo),
            11..=20 => passes_of::<2, 10>(data, scratch, lo),
            21..=22 => passes_of::<2, 11>(data, scratch, lo),
            23..=30 => passes_of::<3, 10>(data, scratch, lo),
            _ => passes_of::<3, 11>(data, scratch, lo),
        }
    }
}

/// `P` stable counting passes of `W` bits over `(key >> 32) - lo`, least significant
/// digit first, between `data` and `scratch`. Returns whether the result is in `scratch`.
fn passes_of<const P: usize, const W: u32>(data: &mut [u64], scratch: &mut [u64], lo: u32) -> bool {
    let buckets = 1usize << W;
    let mut hist = vec![0usize; buckets * P];
    for &k in data.iter() {
        for pass in 0..P {
            hist[pass * buckets + digit::<W>(k, lo, pass)] += 1;
        }
    }
    scatter_passes::<P, W>(data, scratch, lo, &mut hist)
}

/// The counting passes of [`passes_of`], given the histograms of its `P` digits
/// (`hist[pass * 2^W + digit]`); a digit with one value everywhere is skipped. Returns
/// whether the result is in `scratch`.
fn scatter_passes<const P: usize, const W: u32>(
    data: &mut [u64],
    scratch: &mut [u64],
    lo: u32,
    hist: &mut [usize],
) -> bool {
    let n = data.len();
    let buckets = 1usize << W;
    let mut in_scratch = false;
    for (pass, offsets) in hist.chunks_mut(buckets).enumerate() {
        if offsets.contains(&n) {
            // The same digit everywhere: this pass would not move anything.
            continue;
        }
        let mut total = 0;
        for o in offsets.iter_mut() {
            let count = *o;
            *o = total;
            total += count;
        }
        // The histogram counts every key once: the bound the writes below rely on.
        assert_eq!(total, n, "radix: histogram of {total} keys for {n}");
        let (src, dst): (&[u64], &mut [u64]) = if in_scratch {
            (scratch, data)
        } else {
            (data, scratch)
        };
        assert!(offsets.len() == buckets && dst.len() == n && src.len() == n);
        // Unchecked indexing: the bounds checks cost about a tenth of the per-image
        // sort's time (two compares and branches per key in its hottest loop).
        for &k in src {
            let d = digit::<W>(k, lo, pass);
            // SAFETY: `d < 2^W = offsets.len()` (a masked digit), and `offsets[d]` stays
            // below `n = dst.len()`: it starts at the count of smaller digits and moves
            // up once per key with digit `d`, of which the histogram (of `n` keys,
            // asserted above) counted exactly as many: `src` holds the keys it counted,
            // permuted by the earlier passes, and the digit is a function of the key.
            unsafe {
                let o = offsets.get_unchecked_mut(d);
                *dst.get_unchecked_mut(*o) = k;
                *o += 1;
            }
        }
        in_scratch = !in_scratch;
    }
    in_scratch
}

/// Digit `pass` (of `W` bits, least significant first) of `(key >> 32) - lo`.
#[inline(always)]
fn digit<const W: u32>(k: u64, lo: u32, pass: usize) -> usize {
    (((k >> 32) as u32 - lo) >> (pass as u32 * W) & ((1 << W) - 1)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_digit_plan_sorts() {
        // Key ranges of 1 to 32 bits, on inputs that take the narrow and the wide digits.
        let mut rng = crate::test_rng::Lcg(77);
        for n in [3_000u64, 40_000] {
            for bits in 1..=32u32 {
                let keys: Vec<u64> = (0..n)
                    .map(|i| {
                        let high = (rng.next_u64() >> 32) as u32 >> (32 - bits);
                        let offset = 0x1234_5678u32.checked_shr(bits).unwrap_or(0);
                        (u64::from(high.wrapping_add(offset)) << 32) | i
                    })
                    .collect();
                let mut sorted = keys.clone();
                sort_by_high_word(&mut sorted, &mut vec![9; 5]);
                let mut reference = keys;
                reference.sort_unstable();
                assert!(sorted == reference, "{n} keys over {bits} bits");
            }
        }
    }

    #[test]
    fn small_and_constant_inputs() {
        let mut v: Vec<u64> = (0..5000u64).rev().map(|i| (7 << 32) | (4999 - i)).collect();
        let expected = v.clone();
        sort_by_high_word(&mut v, &mut Vec::new());
        assert_eq!(v, expected);
        let mut w = vec![3u64 << 32, 1 << 32, 2 << 32];
        sort_by_high_word(&mut w, &mut Vec::new());
        assert_eq!(w, vec![1 << 32, 2 << 32, 3 << 32]);
    }
}
