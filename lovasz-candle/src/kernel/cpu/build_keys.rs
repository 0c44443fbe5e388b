//! The keys of a job's pixels, in pixel order: each error packed with its pixel index,
//! slope and foreground bits ([`crate::kernel::keys`]). Void pixels, and in the hinge's
//! linear form errors `<= 0`, get no key; the NaN scan of the input rides along.

use std::ops::Range;

use super::Slices;
use crate::input::VOID;
use crate::kernel::call::{ChannelOrder, ErrorKind};
use crate::kernel::keys::index_shift;
use crate::kernel::real::Real;
/// Writes the keys of the group-local pixels `pixels` (pixel `i` of the group is pixel
/// `i % S` of image `first_image + i / S`) for one class, in pixel order, at the start
/// of `out` (at least as long as `pixels`); returns how many were kept, and whether an
/// input value read was NaN (void pixels included).
pub(crate) fn build_keys<T: Real>(
    p: &Slices<T>,
    first_image: usize,
    pixels: Range<usize>,
    class: u32,
    channel: usize,
    out: &mut [T::Packed],
) -> (usize, bool) {
    let s_n = p.call.dims.2;
    let mut at = pixels.start;
    let (mut kept, mut nan) = (0, false);
    while at < pixels.end {
        let (li, i0) = (at / s_n, at % s_n);
        let i1 = s_n.min(i0 + pixels.end - at);
        let b = first_image + li;
        let labels = &p.labels[b * s_n..][i0..i1];
        let base = (li << index_shift(s_n) | i0) as u32;
        let out = &mut out[kept..];
        let (k, n) = match p.call.order {
            ChannelOrder::First => {
                let x = p.data[(b * p.call.dims.1 + channel) * s_n..][i0..i1].iter();
                push_keys_of(p, out, x.copied(), labels, class, base)
            }
            // The channel's values at every `C`-th position, read in place.
            ChannelOrder::Last => {
                let x = p.data[p.call.index(b, channel, i0)..]
                    .iter()
                    .step_by(p.call.dims.1);
                push_keys_of(p, out, x.copied(), labels, class, base)
            }
        };
        kept += k;
        nan |= n;
        at += i1 - i0;
    }
    (kept, nan)
}

/// [`push_keys`] with the error of `p`'s kind (only the hinge drops errors `<= 0`).
#[inline(always)]
fn push_keys_of<T: Real>(
    p: &Slices<T>,
    out: &mut [T::Packed],
    x: impl Iterator<Item = T>,
    labels: &[u32],
    class: u32,
    base: u32,
) -> (usize, bool) {
    let drop_nonpositive = p.call.drops_nonpositive();
    match p.call.kind {
        ErrorKind::Abs => push_keys(out, x, labels, class, base, false, |x, fg| {
            ErrorKind::Abs.error(x, fg)
        }),
        ErrorKind::Hinge => push_keys(out, x, labels, class, base, drop_nonpositive, |x, fg| {
            ErrorKind::Hinge.error(x, fg)
        }),
    }
}

/// Appends the packed keys of one image's row: the values `x` of its pixels (at least as
/// many as `labels`), labels `labels`, pixel indices from `base`; skipping void pixels
/// and, if `drop_nonpositive`, errors `<= 0`. `error` is [`ErrorKind::error`] for one
/// fixed kind, so the loop has no dispatch in it.
#[inline(always)]
fn push_keys<T: Real>(
    out: &mut [T::Packed],
    x: impl Iterator<Item = T>,
    labels: &[u32],
    class: u32,
    base: u32,
    drop_nonpositive: bool,
    error: impl Fn(T, bool) -> (T, bool),
) -> (usize, bool) {
    let out = &mut out[..labels.len()];
    // An error is NaN exactly when its input is: the NaN scan of the input rides along.
    // A plain map the compiler can keep branch-free, counting the keys to drop.
    let (mut nan, mut dropped) = (false, 0usize);
    for (o, (i, (x, &l))) in out.iter_mut().zip(x.zip(labels).enumerate()) {
        let fg = l == class;
        let (err, slope) = error(x, fg);
        *o = T::pack(err, base + i as u32, slope, fg);
        nan |= err.is_nan();
        dropped += usize::from(is_dropped(drop_nonpositive, l, err));
    }
    if dropped == 0 {
        return (labels.len(), nan);
    }
    // Then the kept keys move to the front, in order (their errors read back from the
    // keys, which hold their bits exactly).
    let end = keep_in_order::<T>(out, |i, key| {
        !is_dropped(drop_nonpositive, labels[i], T::error(key))
    });
    (end, nan)
}

/// Whether a pixel with label `label` and error `err` gets no key: void, or (with
/// `drop_nonpositive`, see [`Call::drops_nonpositive`](crate::kernel::call::Call::drops_nonpositive)) an error `<= 0`. That is false
/// for a NaN error, which reaches the walk like any other. Without a branch.
#[inline(always)]
pub(crate) fn is_dropped<T: Real>(drop_nonpositive: bool, label: u32, err: T) -> bool {
    (label == VOID) | (drop_nonpositive & (err <= T::zero()))
}

/// Moves the keys for which `keep(position, key)` holds to the front of `keys`, in order,
/// and returns how many there are. Every key is copied and the end moves past it only if
/// it is kept: no branch on `keep`.
#[inline(always)]
pub(crate) fn keep_in_order<T: Real>(
    keys: &mut [T::Packed],
    keep: impl Fn(usize, T::Packed) -> bool,
) -> usize {
    let mut end = 0;
    for i in 0..keys.len() {
        let key = keys[i];
        keys[end] = key;
        end += usize::from(keep(i, key));
    }
    end
}
