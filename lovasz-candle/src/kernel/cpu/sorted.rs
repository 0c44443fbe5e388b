//! A job's keys once sorted: [`Sorted`], where a parallel sort left them, and
//! [`SortedKeys`], the sequence the walk reads across the two buffers in pieces of
//! [`PIECE`] sorted positions.

use std::ops::Range;

/// Keys per piece when one job is split over threads (key building and the walk). The
/// walk sums its loss per piece in both modes, so results do not depend on the mode.
pub(crate) const PIECE: usize = 1 << 16;

/// Where a parallel sort left its keys: consecutive runs of the sorted sequence, each in
/// the result buffer or at the same positions in the working buffer, and, for each
/// stretch of `stretch` sorted positions, how many keys have bit 0 set (the kernel's
/// foreground bit), so that a walk over the stretches can start each one from the counts
/// before it.
pub(crate) struct Sorted {
    /// `(length, in the working buffer)` of each run, in order.
    pub runs: Vec<(usize, bool)>,
    /// Keys with bit 0 set in sorted positions `i * stretch .. (i + 1) * stretch`.
    pub flagged: Vec<u64>,
}

/// A job's sorted keys: consecutive runs `(length, in spare)` of the sorted sequence,
/// each in `main` or at the same positions in `spare` (where a parallel sort left it).
pub(crate) struct SortedKeys<'a, P> {
    pub main: &'a [P],
    pub spare: &'a [P],
    pub runs: &'a [(usize, bool)],
}

impl<'a, P> SortedKeys<'a, P> {
    pub fn len(&self) -> usize {
        self.runs.iter().map(|r| r.0).sum()
    }

    /// How many [`PIECE`]s of sorted positions the keys fill.
    pub fn pieces(&self) -> usize {
        self.len().div_ceil(PIECE)
    }

    /// The keys of piece `i` (sorted positions `i * PIECE ..`), in order, as slices of the
    /// two buffers.
    pub fn piece(&self, i: usize) -> Vec<&'a [P]> {
        self.slices(i * PIECE..self.len().min((i + 1) * PIECE))
    }

    /// The keys at sorted positions `range`, in order, as slices of the two buffers.
    pub fn slices(&self, range: Range<usize>) -> Vec<&'a [P]> {
        let mut slices = Vec::new();
        let mut start = 0;
        for &(len, in_spare) in self.runs {
            let (lo, hi) = (start.max(range.start), (start + len).min(range.end));
            if lo < hi {
                slices.push(&(if in_spare { self.spare } else { self.main })[lo..hi]);
            }
            start += len;
        }
        slices
    }
}
