//! How the CPU kernel sorts the keys of each float width: f32 keys (`u64`) by the LSD
//! radix sort of [`super::radix`] and, split over threads, the bucket partition of
//! [`super::partition`]; f64 keys (`u128`) by comparison sorts.

use rayon::prelude::*;

use super::buffer::{Cached, ZeroBits};
use super::partition::{bin_histogram, par_sort_pieces};
use super::radix::sort_by_high_word;
use super::sorted::{Sorted, PIECE};
use crate::kernel::keys::PackedKey;
use crate::kernel::real::Real;

/// A float dtype the CPU kernel handles: its keys can be sorted here and kept in the
/// cache of working buffers, and its zero is all-zero bits (outputs start from fresh
/// zeroed memory).
pub(crate) trait HostSort: Real<Packed: Cached> + ZeroBits {
    /// Sorts ascending; `scratch` is working memory (the vectors may be swapped).
    fn sort(keys: &mut Vec<Self::Packed>, scratch: &mut Vec<Self::Packed>);
    /// What [`HostSort::par_sort`] needs to know of one piece of keys, taken while the
    /// piece is hot in cache: its histogram over [`super::partition::bin_of`] for f32.
    fn piece_summary(piece: &[Self::Packed]) -> Vec<u32>;
    /// Sorts, on all rayon threads, the keys of the pieces of `pieces`: piece `i` is the
    /// first `lens[i]` keys of its stretch `i * stride ..` of the buffer, summed up in
    /// `summaries[i]` by [`HostSort::piece_summary`]. The sorted keys are left in `out`
    /// and `pieces` as the returned runs say, with the foreground keys per [`PIECE`]
    /// sorted positions.
    fn par_sort(
        pieces: &mut Vec<Self::Packed>,
        stride: usize,
        lens: &[usize],
        summaries: &[Vec<u32>],
        out: &mut Vec<Self::Packed>,
    ) -> Sorted;
}

impl HostSort for f32 {
    fn sort(keys: &mut Vec<u64>, scratch: &mut Vec<u64>) {
        sort_by_high_word(keys, scratch);
    }
    fn piece_summary(piece: &[u64]) -> Vec<u32> {
        bin_histogram(piece)
    }
    fn par_sort(
        pieces: &mut Vec<u64>,
        stride: usize,
        lens: &[usize],
        summaries: &[Vec<u32>],
        out: &mut Vec<u64>,
    ) -> Sorted {
        par_sort_pieces(pieces, stride, lens, summaries, out, PIECE)
    }
}

impl HostSort for f64 {
    fn sort(keys: &mut Vec<u128>, _scratch: &mut Vec<u128>) {
        keys.sort_unstable();
    }
    fn piece_summary(_piece: &[u128]) -> Vec<u32> {
        Vec::new()
    }
    fn par_sort(
        pieces: &mut Vec<u128>,
        stride: usize,
        lens: &[usize],
        _summaries: &[Vec<u32>],
        out: &mut Vec<u128>,
    ) -> Sorted {
        out.clear();
        out.reserve(lens.iter().sum());
        for (piece, &len) in pieces.chunks(stride).zip(lens) {
            out.extend_from_slice(&piece[..len]);
        }
        out.par_sort_unstable();
        Sorted {
            runs: vec![(out.len(), false)],
            flagged: (out.par_chunks(PIECE))
                .map(|c| {
                    c.iter()
                        .filter(|&&k| <f64 as PackedKey>::unpack(k).2)
                        .count() as u64
                })
                .collect(),
        }
    }
}
