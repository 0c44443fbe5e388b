//! Where the jobs write: the output (in the input's layout) handed out as one row per
//! (image, class channel), each to the one job that writes it. Channels first, a row is a
//! contiguous slice; channels last, it is every `C`-th value, between the rows of the
//! other channels, which other jobs write at the same time.

use std::marker::PhantomData;
use std::ops::Range;

use crate::kernel::problem::ChannelOrder;

/// The output of one call, `B × C` rows of `S` values, handed out to the jobs.
pub(crate) struct OutputRows<'a, T> {
    rows: Rows<'a, T>,
    channels: usize,
}

enum Rows<'a, T> {
    /// `[B, C, S]`: each row as its own slice, `None` once taken.
    First(Vec<Option<&'a mut [T]>>),
    /// `[B, S, C]`: the whole buffer, and which rows are taken.
    Last {
        base: *mut T,
        spatial: usize,
        taken: Vec<bool>,
        _out: PhantomData<&'a mut [T]>,
    },
}

impl<'a, T> OutputRows<'a, T> {
    /// The rows of `values`, `B × C × S` values in `order` (`values.len()` must be
    /// `batch * channels * spatial`).
    pub fn new(
        values: &'a mut [T],
        order: ChannelOrder,
        (batch, channels, spatial): (usize, usize, usize),
    ) -> Self {
        assert_eq!(
            values.len(),
            batch * channels * spatial,
            "lovasz kernel: output size"
        );
        let rows = match order {
            ChannelOrder::First => Rows::First(values.chunks_mut(spatial).map(Some).collect()),
            ChannelOrder::Last => Rows::Last {
                base: values.as_mut_ptr(),
                spatial,
                taken: vec![false; batch * channels],
                _out: PhantomData,
            },
        };
        Self { rows, channels }
    }

    /// The rows of `channel` for `images`, or `None` if one of them was taken before.
    pub fn take(&mut self, images: Range<usize>, channel: usize) -> Option<JobRows<'a, T>> {
        let c_n = self.channels;
        match &mut self.rows {
            Rows::First(chunks) => {
                let mut rows = Vec::with_capacity(images.len());
                for b in images {
                    rows.push(chunks[b * c_n + channel].take()?);
                }
                Some(JobRows::Contiguous(rows))
            }
            Rows::Last {
                base,
                spatial,
                taken,
                ..
            } => {
                let mut starts = Vec::with_capacity(images.len());
                for b in images {
                    if std::mem::replace(&mut taken[b * c_n + channel], true) {
                        return None;
                    }
                    // SAFETY: `b * S * C + channel` is inside the buffer (`b < B`,
                    // `channel < C` by the indexing of `taken` above).
                    starts.push(unsafe { base.add(b * *spatial * c_n + channel) });
                }
                Some(JobRows::Strided {
                    starts,
                    len: *spatial,
                    stride: c_n,
                    _out: PhantomData,
                })
            }
        }
    }

    /// The rows `b * C + c` that no job took.
    pub fn untaken(&self) -> Vec<usize> {
        match &self.rows {
            Rows::First(chunks) => (chunks.iter().enumerate())
                .filter(|(_, c)| c.is_some())
                .map(|(r, _)| r)
                .collect(),
            Rows::Last { taken, .. } => (taken.iter().enumerate())
                .filter(|(_, &t)| !t)
                .map(|(r, _)| r)
                .collect(),
        }
    }
}

/// The rows of one job, one per image of its group, each `S` values long.
pub(crate) enum JobRows<'a, T> {
    /// Contiguous rows (channels first).
    Contiguous(Vec<&'a mut [T]>),
    /// Row `i` is `len` values at `starts[i]`, `stride` apart (channels last); the values
    /// between belong to other jobs' rows.
    Strided {
        starts: Vec<*mut T>,
        len: usize,
        stride: usize,
        _out: PhantomData<&'a mut [T]>,
    },
}

// SAFETY: the positions of a job's strided rows are its own (`OutputRows::take` hands
// each row out once), so the job may write them from any thread.
unsafe impl<T: Send> Send for JobRows<'_, T> {}

/// A job's rows written by pixel index `image << shift | pixel`, from several threads,
/// each index at most once.
pub(crate) struct RowWrites<'a, T> {
    starts: Vec<*mut T>,
    len: usize,
    stride: usize,
    shift: u32,
    _rows: PhantomData<&'a mut [T]>,
}

// SAFETY: shared use only writes through `write`, whose contract rules out two writes to
// one index; `T: Send` values may be moved into the rows from any thread.
unsafe impl<T: Send> Sync for RowWrites<'_, T> {}

impl<'a, T> RowWrites<'a, T> {
    /// `rows` all have the same length, at most `1 << shift`.
    pub fn new(rows: &'a mut JobRows<T>, shift: u32) -> Self {
        let (starts, len, stride) = match rows {
            JobRows::Contiguous(rows) => {
                let len = rows.first().map_or(0, |r| r.len());
                assert!(
                    rows.iter().all(|r| r.len() == len),
                    "lovasz kernel: rows of unequal lengths (internal error)"
                );
                (rows.iter_mut().map(|r| r.as_mut_ptr()).collect(), len, 1)
            }
            JobRows::Strided {
                starts,
                len,
                stride,
                ..
            } => (starts.clone(), *len, *stride),
        };
        assert!(
            len <= 1 << shift,
            "lovasz kernel: rows longer than their index"
        );
        Self {
            starts,
            len,
            stride,
            shift,
            _rows: PhantomData,
        }
    }

    /// Writes `value` at pixel index `index` (`image << shift | pixel`, checked against
    /// the rows).
    ///
    /// # Safety
    /// No other call, on any thread, may write the same index while the rows are shared.
    #[inline(always)]
    pub unsafe fn write(&self, index: usize, value: T) {
        let (image, pixel) = (index >> self.shift, index & ((1 << self.shift) - 1));
        let start = self.starts[image];
        assert!(pixel < self.len, "pixel {pixel} out of {}", self.len);
        // SAFETY: in bounds (checked above: a row's `len` values, `stride` apart, lie in
        // the output), and no other thread touches this element.
        unsafe { start.add(pixel * self.stride).write(value) }
    }
}
