//! The walk over a job's sorted keys: the Jaccard weight of each pixel in turn from exact
//! counts ([`JaccardWalk`]), turned into the pixel's output (its weight, or its
//! coefficient in the linear form) and written to its row; and the job's share of its
//! group's offset and loss. One job's walk is split over the threads in pieces that
//! resume from the counts before them, with the same results bit for bit.

use rayon::prelude::*;

use super::sorted::{SortedKeys, PIECE};
use super::Slices;
use crate::kernel::call::{ErrorKind, Output};
use crate::kernel::jaccard_walk::JaccardWalk;
use crate::kernel::plan::Job;
use crate::kernel::real::Real;

/// A job's share of its group's offset `K` and loss.
#[derive(Default)]
pub(crate) struct JobSums {
    pub offset: f64,
    pub loss: f64,
}

/// The walk of one job's sorted keys, with the outputs of its call (`MIXED` and
/// `fg_per_piece`: see [`walk`]).
pub(crate) fn walk_job<T: Real, const MIXED: bool>(
    p: &Slices<T>,
    keys: &SortedKeys<T::Packed>,
    outs: &mut [&mut [T]],
    shift: u32,
    job: &Job,
    fg_per_piece: Option<&[u64]>,
) -> JobSums {
    let (gts, scale) = (job.gts, job.scale);
    match (p.call.output, p.call.kind) {
        (Output::Weights, _) => {
            walk::<T, _, MIXED>(keys, outs, shift, gts, scale, fg_per_piece, |w, _| {
                (w, 0.0, 0.0)
            })
        }
        (Output::Linear, ErrorKind::Abs) => {
            walk::<T, _, MIXED>(keys, outs, shift, gts, scale, fg_per_piece, |w, key| {
                let (_, slope, fg) = T::unpack(key);
                // An absolute difference: its sign bit is clear.
                ErrorKind::Abs.linear::<MIXED>(w, T::unsigned_error(key).to_f64(), slope, fg)
            })
        }
        (Output::Linear, ErrorKind::Hinge) => {
            walk::<T, _, MIXED>(keys, outs, shift, gts, scale, fg_per_piece, |w, key| {
                let (_, slope, fg) = T::unpack(key);
                ErrorKind::Hinge.linear::<MIXED>(w, T::error(key).to_f64(), slope, fg)
            })
        }
    }
}

/// Walks the sorted keys once, writing each pixel's value into its image's row of `rows`
/// (pixel index `image << shift | pixel`): `out` maps (Jaccard weight times `scale`, key)
/// to (value, share of K, share of the loss). With `fg_per_piece` (the foreground keys in
/// each [`PIECE`] of sorted positions), the pieces are walked on all threads, each
/// starting from the foreground and background counts before it. With `MIXED`
/// (foreground and background both common), the steps are [`JaccardWalk::step_blended`],
/// else [`JaccardWalk::step`].
fn walk<T: Real, F, const MIXED: bool>(
    keys: &SortedKeys<T::Packed>,
    rows: &mut [&mut [T]],
    shift: u32,
    gts: u64,
    scale: f64,
    fg_per_piece: Option<&[u64]>,
    out: F,
) -> JobSums
where
    F: Fn(f64, T::Packed) -> (f64, f64, f64) + Sync,
{
    let sums: Vec<JobSums> = if let Some(fg) = fg_per_piece {
        let mut starts = Vec::with_capacity(fg.len());
        let mut fg_before = 0;
        for (i, f) in fg.iter().enumerate() {
            starts.push(JaccardWalk::resume(
                gts,
                fg_before,
                (i * PIECE) as u64 - fg_before,
            ));
            fg_before += f;
        }
        let rows = RowWrites::new(rows, shift);
        starts
            .into_par_iter()
            .enumerate()
            .map(|(i, mut jw)| {
                // SAFETY: keys are built one per pixel, so every index is written once, by
                // the one thread that walks its key.
                let write = |i, v| unsafe { rows.write(i, v) };
                walk_piece::<T, MIXED>(&keys.piece(i), &mut jw, scale, &out, write)
            })
            .collect()
    } else if let [row] = rows {
        // One image: its pixel index is the key's whole index.
        let row = &mut **row;
        walk_serial::<T, MIXED>(keys, gts, scale, &out, |i, v| row[i] = v)
    } else {
        let mask = (1usize << shift) - 1;
        walk_serial::<T, MIXED>(keys, gts, scale, &out, |i, v| {
            rows[i >> shift][i & mask] = v
        })
    };
    sums.into_iter().fold(JobSums::default(), |a, b| JobSums {
        offset: a.offset + b.offset,
        loss: a.loss + b.loss,
    })
}

/// [`walk`] on the calling thread: its pieces in order, one walk state throughout.
fn walk_serial<T: Real, const MIXED: bool>(
    keys: &SortedKeys<T::Packed>,
    gts: u64,
    scale: f64,
    out: &impl Fn(f64, T::Packed) -> (f64, f64, f64),
    mut write: impl FnMut(usize, T),
) -> Vec<JobSums> {
    let mut jw = JaccardWalk::new(gts);
    (0..keys.pieces())
        .map(|i| walk_piece::<T, MIXED>(&keys.piece(i), &mut jw, scale, out, &mut write))
        .collect()
}

/// One piece of [`walk`]: advances `jw` over the keys of `slices`, in order (by
/// [`JaccardWalk::step_blended`] if `MIXED`, else [`JaccardWalk::step`]), hands each
/// value to `write`.
#[inline(always)]
fn walk_piece<T: Real, const MIXED: bool>(
    slices: &[&[T::Packed]],
    jw: &mut JaccardWalk,
    scale: f64,
    out: &impl Fn(f64, T::Packed) -> (f64, f64, f64),
    mut write: impl FnMut(usize, T),
) -> JobSums {
    // Local copies stay in registers: through `&mut`, the walk's state and the sums were
    // stored to memory and reloaded at every step.
    let (mut offset, mut loss) = (0.0, 0.0);
    let mut walk = jw.clone();
    for &slice in slices {
        for &key in slice {
            let (idx, _, fg) = T::unpack(key);
            let weight = if MIXED {
                walk.step_blended(fg)
            } else {
                walk.step(fg)
            };
            let (value, k, l) = out(weight * scale, key);
            write(idx, T::from_f64(value));
            offset += k;
            loss += l;
        }
    }
    *jw = walk;
    JobSums { offset, loss }
}

/// The rows of one job's output (one per image of its group), written by pixel index
/// `image << shift | pixel` from several threads, each index at most once.
struct RowWrites<'a, T> {
    starts: Vec<*mut T>,
    len: usize,
    shift: u32,
    _rows: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: shared use only writes through `write`, whose contract rules out two writes to
// one index; `T: Send` values may be moved into the rows from any thread.
unsafe impl<T: Send> Sync for RowWrites<'_, T> {}

impl<'a, T> RowWrites<'a, T> {
    /// `rows` all have the same length, below `1 << shift`.
    fn new(rows: &'a mut [&mut [T]], shift: u32) -> Self {
        let len = rows.first().map_or(0, |r| r.len());
        assert!(
            rows.iter().all(|r| r.len() == len) && len <= 1 << shift,
            "lovasz kernel: rows of unequal lengths (internal error)"
        );
        Self {
            starts: rows.iter_mut().map(|r| r.as_mut_ptr()).collect(),
            len,
            shift,
            _rows: std::marker::PhantomData,
        }
    }

    /// Writes `value` at pixel index `index` (`image << shift | pixel`, checked against
    /// the rows).
    ///
    /// # Safety
    /// No other call, on any thread, may write the same index while the rows are shared.
    #[inline(always)]
    unsafe fn write(&self, index: usize, value: T) {
        let (image, pixel) = (index >> self.shift, index & ((1 << self.shift) - 1));
        let start = self.starts[image];
        assert!(pixel < self.len, "pixel {pixel} out of {}", self.len);
        // SAFETY: in bounds (checked above), and no other thread touches this element.
        unsafe { start.add(pixel).write(value) }
    }
}
