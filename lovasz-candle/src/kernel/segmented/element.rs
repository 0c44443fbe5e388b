//! What the device does for one element: where a chunk element's pixel is, its sort key
//! and value, and a ranked slot's output. The CUDA kernels (`cuda/lovasz.cu`) compute
//! the same expressions in the same order; [`super::host`] calls these.

use crate::input::VOID;
use crate::kernel::call::Output;
use crate::kernel::jaccard_walk::JaccardWalk;
use crate::kernel::real::Real;
use crate::kernel::segmented::{JobRecord, Segments};

/// Working bytes per chunk element: keys (8) and values (4 in f32, 8 in f64), each twice
/// for the sort, and a 4-byte count.
pub(crate) fn bytes_per_element(wide: bool) -> usize {
    let value = if wide { 8 } else { 4 };
    2 * 8 + 2 * value + 4
}

/// Pixel `i` of `job`'s group: `(position in the input, position in the labels)`.
#[inline]
pub(crate) fn locate(segs: &Segments, job: &JobRecord, i: usize) -> (usize, usize) {
    let (_, c_n, s_n) = segs.call().dims;
    let (image, pixel) = (job.first_image as usize + i / s_n, i % s_n);
    let at = segs
        .call()
        .order
        .index((c_n, s_n), image, job.channel as usize, pixel);
    (at, image * s_n + pixel)
}

/// The sort key and value of element `e` of a chunk: pixel `i` of the chunk's job
/// `in_chunk` (`job`), of input value `x` and label `label`.
///
/// f32 (`!wide`): key `in_chunk << 32 | error key`, value `i << 2 | slope << 1 | fg`;
/// f64: key the error key, value `e << 2 | slope << 1 | fg`. A void pixel has the
/// largest error key and no bits.
#[inline]
pub(crate) fn key_of<T: Real>(
    segs: &Segments,
    job: &JobRecord,
    in_chunk: usize,
    e: usize,
    i: usize,
    x: T,
    label: u32,
) -> (u64, u64) {
    let position = if segs.wide { e } else { i } as u64;
    let high = if segs.wide {
        0
    } else {
        (in_chunk as u64) << 32
    };
    if label == VOID {
        let void = if segs.wide {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        return (high | void, position << 2);
    }
    let fg = label == job.class;
    let (err, slope) = segs.call().kind.error(x, fg);
    let bits = u64::from(slope) << 1 | u64::from(fg);
    (high | T::error_key(err), position << 2 | bits)
}

/// The output of the ranked slot `k` of `job` (`k < job.valid`), holding sorted value
/// `value` with `fg_before` foreground slots before it in the job, for the pixel of
/// input value `x`: the value written at the pixel, and its shares of the group's offset
/// and loss. `(0, 0, 0)` for the weights of [`Output::Weights`] apart from the value.
#[inline]
pub(crate) fn walk_slot<T: Real>(
    segs: &Segments,
    job: &JobRecord,
    k: usize,
    fg_before: u64,
    value: u64,
    x: T,
) -> (T, f64, f64) {
    let (slope, fg) = (value & 2 != 0, value & 1 != 0);
    let weight = JaccardWalk::resume(job.gts, fg_before, k as u64 - fg_before).step(fg);
    let w = weight * job.scale;
    let (v, offset, loss) = match segs.call().output {
        Output::Weights => (w, 0.0, 0.0),
        Output::Linear => {
            let err = segs.call().kind.error(x, fg).0.to_f64();
            segs.call().kind.linear::<false>(w, err, slope, fg)
        }
    };
    (T::from_f64(v), offset, loss)
}

/// The pixel of `job`'s group that a sorted value names (`(value >> 2) mod L`).
#[inline]
pub(crate) fn pixel_of(value: u64, seg_len: usize) -> usize {
    (value >> 2) as usize % seg_len
}
