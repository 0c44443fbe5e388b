//! The parallel sort of one large job's keys: the pieces the threads built are scattered
//! into buckets of whole key ranges (each piece into its own slots, so the input order
//! holds within a bucket), then each bucket is radix-sorted on its own thread; the
//! buckets in order are the sorted sequence, with no merge at the end.

use rayon::prelude::*;

use super::buffer::working;
use super::radix::{high_range, radix_in};
use super::sorted::Sorted;

/// Bits of the key range that choose a key's bucket in the parallel sort.
const BIN_BITS: u32 = 12;

/// Bits of a key's high word below its bin: a bin is the top [`BIN_BITS`] bits.
const BIN_SHIFT: u32 = 32 - BIN_BITS;

/// The bin of a key for [`par_sort_pieces`]: the top [`BIN_BITS`] bits of its high word
/// (sign, exponent and three mantissa bits of a float error), fixed in advance so that the
/// histograms can be taken while the keys are built.
#[inline]
pub(crate) fn bin_of(k: u64) -> usize {
    (k >> (32 + BIN_SHIFT)) as usize
}

/// The histogram of `keys` over the bins of [`bin_of`].
pub(crate) fn bin_histogram(keys: &[u64]) -> Vec<u32> {
    histogram(keys, bin_of)
}

/// The histogram of `keys` over [`BIN_BITS`]-bit bins chosen by `bin`.
fn histogram(keys: &[u64], bin: impl Fn(u64) -> usize) -> Vec<u32> {
    let mut h = vec![0u32; 1 << BIN_BITS];
    for &k in keys {
        h[bin(k)] += 1;
    }
    h
}

/// Sorts, as [`sort_by_high_word`](super::radix::sort_by_high_word) does and on all rayon threads, the keys of the pieces
/// of `pieces` (piece `i`: the first `lens[i]` keys from `i * stride`, with `hists[i]` its
/// [`bin_histogram`]), in order, into `out` and `pieces` as the returned runs say; both
/// vectors then hold the total number of keys. Keys must be distinct (the kernel's carry
/// their pixel index) and their lower words increasing along the pieces. Bit 0 is counted
/// per `stretch` sorted keys while each bucket is still in cache.
pub(crate) fn par_sort_pieces(
    pieces: &mut Vec<u64>,
    stride: usize,
    lens: &[usize],
    hists: &[Vec<u32>],
    out: &mut Vec<u64>,
    stretch: usize,
) -> Sorted {
    let n: usize = lens.iter().sum();
    working(out, n);
    let buckets = {
        let views: Vec<&[u64]> = pieces
            .chunks(stride)
            .zip(lens)
            .map(|(piece, &len)| &piece[..len])
            .collect();
        partition(&views, hists, out)
    };
    // The pieces are read: their buffer is the working memory of the bucket sorts.
    pieces.truncate(n);
    // Buckets are whole key ranges in order: sorting each sorts everything.
    let mut parts = Vec::with_capacity(buckets.len());
    let (mut data, mut free, mut start): (&mut [u64], &mut [u64], usize) = (out, pieces, 0);
    for b in &buckets {
        let (d, d_rest) = data.split_at_mut(b.len);
        let (s, s_rest) = free.split_at_mut(b.len);
        parts.push((d, s, b.lo, b.bits, start));
        data = d_rest;
        free = s_rest;
        start += b.len;
    }
    // Each bucket's result stays where its passes left it (by their parity).
    let sorted: Vec<(bool, Vec<(usize, u64)>)> = parts
        .par_iter_mut()
        .map(|(d, s, lo, bits, start)| {
            let in_spare = radix_in(d, s, *lo, *bits);
            let keys: &[u64] = if in_spare { s } else { d };
            (in_spare, flagged_by_stretch(keys, *start, stretch))
        })
        .collect();
    let mut flagged = vec![0u64; n.div_ceil(stretch)];
    let mut runs = Vec::with_capacity(buckets.len());
    for (b, (in_spare, counts)) in buckets.iter().zip(sorted) {
        runs.push((b.len, in_spare));
        for (i, c) in counts {
            flagged[i] += c;
        }
    }
    Sorted { runs, flagged }
}

/// For keys at sorted positions `start ..`: `(i, keys with bit 0 set)` for each stretch
/// `i * stretch .. (i + 1) * stretch` they meet.
fn flagged_by_stretch(keys: &[u64], start: usize, stretch: usize) -> Vec<(usize, u64)> {
    let mut counts = Vec::new();
    let (mut at, mut rest) = (start, keys);
    while !rest.is_empty() {
        let (head, tail) = rest.split_at((stretch - at % stretch).min(rest.len()));
        counts.push((at / stretch, head.iter().map(|&k| k & 1).sum()));
        at += head.len();
        rest = tail;
    }
    counts
}

/// One bucket of [`partition`]: its number of keys, and the range `lo .. lo + 2^bits`
/// that holds their high words.
struct Bucket {
    len: usize,
    lo: u32,
    bits: u32,
}

/// Scatters the keys of `pieces` into `out` (of their total length) by buckets of whole
/// key ranges, in key order, each piece into its own slots so that the input order holds
/// within a bucket; returns the buckets.
///
/// Buckets group consecutive bins into about four per thread of similar sizes, so a key's
/// bucket is one table lookup (a search among splitters mispredicts about every other
/// comparison on random keys). The bins are those of [`bin_of`], whose histograms
/// `hists` came with the pieces, unless one bin holds too many keys to share the work
/// (errors within a narrow range): then the bins are the top [`BIN_BITS`] bits of the
/// range the keys span, at the cost of two more passes over them.
fn partition(pieces: &[&[u64]], hists: &[Vec<u32>], out: &mut [u64]) -> Vec<Bucket> {
    let fixed_total = sum_bins(hists);
    let per_bucket = keys_per_bucket(out.len());
    if fixed_total.iter().all(|&c| c <= per_bucket) {
        return scatter_by_bins(pieces, hists, &fixed_total, 0, BIN_SHIFT, out, bin_of);
    }
    let (lo, hi) = pieces
        .par_iter()
        .map(|c| high_range(c))
        .reduce(|| (u32::MAX, 0), |a, b| (a.0.min(b.0), a.1.max(b.1)));
    let bits = 32 - hi.saturating_sub(lo).leading_zeros();
    let shift = bits.saturating_sub(BIN_BITS);
    let bin = move |k: u64| (((k >> 32) as u32 - lo) >> shift) as usize;
    let hists: Vec<Vec<u32>> = pieces.par_iter().map(|c| histogram(c, bin)).collect();
    let total = sum_bins(&hists);
    scatter_by_bins(pieces, &hists, &total, lo, shift, out, bin)
}

/// About four buckets per thread for `n` keys: the keys each bucket should hold.
fn keys_per_bucket(n: usize) -> usize {
    n.div_ceil(4 * rayon::current_num_threads()).max(1)
}

/// The sum of per-piece bin histograms.
fn sum_bins(hists: &[Vec<u32>]) -> Vec<usize> {
    let mut total = vec![0usize; 1 << BIN_BITS];
    for h in hists {
        for (t, &c) in total.iter_mut().zip(h) {
            *t += c as usize;
        }
    }
    total
}

/// The scatter of [`partition`] by `bin` (bin `b` holds the high words
/// `lo + (b << shift) ..`), with per-piece histograms `hists` summing to `total`.
fn scatter_by_bins(
    pieces: &[&[u64]],
    hists: &[Vec<u32>],
    total: &[usize],
    lo: u32,
    shift: u32,
    out: &mut [u64],
    bin: impl Fn(u64) -> usize + Sync,
) -> Vec<Bucket> {
    // Consecutive bins, up to about `per_bucket` keys per bucket.
    let per_bucket = keys_per_bucket(out.len());
    let mut bucket_of_bin = vec![0u16; total.len()];
    let mut first_bins = vec![0usize];
    let mut filled = 0;
    for (b, (slot, &count)) in bucket_of_bin.iter_mut().zip(total).enumerate() {
        if filled > 0 && filled + count > per_bucket {
            first_bins.push(b);
            filled = 0;
        }
        *slot = (first_bins.len() - 1) as u16;
        filled += count;
    }
    let n_buckets = first_bins.len();
    let buckets: Vec<Bucket> = (0..n_buckets)
        .map(|i| {
            let (b0, b1) = (
                first_bins[i],
                first_bins.get(i + 1).copied().unwrap_or(total.len()),
            );
            // The bins' span of high words, below 2^32.
            let span = (((b1 - b0) as u64) << shift) - 1;
            Bucket {
                len: total[b0..b1].iter().sum(),
                lo: lo + ((b0 as u32) << shift),
                bits: 64 - span.leading_zeros(),
            }
        })
        .collect();
    // Every piece gets, in every bucket, its slot after the earlier pieces' slots.
    let mut counts: Vec<Vec<usize>> = vec![vec![0; n_buckets]; pieces.len()];
    for (c, h) in counts.iter_mut().zip(hists) {
        for (b, &count) in h.iter().enumerate() {
            c[usize::from(bucket_of_bin[b])] += count as usize;
        }
    }
    let mut slots: Vec<Vec<&mut [u64]>> = pieces.iter().map(|_| Vec::new()).collect();
    let mut rest: &mut [u64] = out;
    for b in 0..n_buckets {
        for (piece_slots, c) in slots.iter_mut().zip(&counts) {
            let (slot, tail) = rest.split_at_mut(c[b]);
            piece_slots.push(slot);
            rest = tail;
        }
    }
    pieces
        .par_iter()
        .zip(slots.par_iter_mut())
        .for_each(|(piece, piece_slots)| {
            let mut filled = vec![0usize; n_buckets];
            for &k in piece.iter() {
                let b = usize::from(bucket_of_bin[bin(k)]);
                piece_slots[b][filled[b]] = k;
                filled[b] += 1;
            }
        });
    buckets
}

#[cfg(test)]
mod tests {
    use super::super::radix::sort_by_high_word;
    use super::*;

    /// `n` keys with increasing low words and high words from `high(random)`.
    fn lcg_keys(n: u64, seed: u64, high: impl Fn(u64) -> u64) -> Vec<u64> {
        let mut rng = crate::test_rng::Lcg(seed);
        (0..n).map(|i| (high(rng.next_u64()) << 32) | i).collect()
    }

    #[test]
    fn matches_a_comparison_sort() {
        // Two bins holding half the keys each (the parallel sort falls back to bins of the
        // keys' range), with many equal high words; and high words spread over all bins.
        let narrow = lcg_keys(150_000, 12345, |s| {
            (s >> 40) % 70_000 + ((s >> 20) & 1) * 0x3f80_0000
        });
        let spread = lcg_keys(150_000, 777, |s| s >> 32);
        // High words over 2^26 values: buckets of a few bins, sorted in an odd number of
        // passes, so their results stay in the working buffer.
        let dense = lcg_keys(150_000, 4242, |s| (s >> 38) + 0x3f00_0000);
        // Runs left in the result buffer and in the working buffer.
        let mut runs_in = [0; 2];
        for keys in [narrow, spread, dense] {
            let mut radix = keys.clone();
            sort_by_high_word(&mut radix, &mut Vec::new());
            let mut reference = keys.clone();
            reference.sort_unstable();
            assert_eq!(radix, reference);
            for threads in [2, 3, 8] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                for piece in [1000, 40_000, 150_000] {
                    // Each piece holds its keys at the start of a stretch twice its size.
                    let stride = 2 * piece;
                    let mut buffer = vec![u64::MAX; keys.len().div_ceil(piece) * stride];
                    let mut lens = Vec::new();
                    for (i, chunk) in keys.chunks(piece).enumerate() {
                        buffer[i * stride..][..chunk.len()].copy_from_slice(chunk);
                        lens.push(chunk.len());
                    }
                    let hists: Vec<Vec<u32>> = keys.chunks(piece).map(bin_histogram).collect();
                    let mut out = vec![7u64; 3];
                    let stretch = 1 << 14;
                    let sorted = pool.install(|| {
                        par_sort_pieces(&mut buffer, stride, &lens, &hists, &mut out, stretch)
                    });
                    assert_eq!((out.len(), buffer.len()), (keys.len(), keys.len()));
                    let mut joined = Vec::new();
                    for &(len, in_spare) in &sorted.runs {
                        runs_in[usize::from(in_spare)] += 1;
                        let from = if in_spare { &buffer } else { &out };
                        joined.extend_from_slice(&from[joined.len()..][..len]);
                    }
                    assert_eq!(joined, reference, "{threads} threads, pieces of {piece}");
                    let flagged: Vec<u64> = (reference.chunks(stretch))
                        .map(|c| c.iter().map(|&k| k & 1).sum())
                        .collect();
                    assert_eq!(sorted.flagged, flagged);
                }
            }
        }
        assert!(
            runs_in[0] > 0 && runs_in[1] > 0,
            "runs per buffer: {runs_in:?}"
        );
    }
}
