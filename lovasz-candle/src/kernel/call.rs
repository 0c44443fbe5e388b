//! What one loss call computes ([`Call`]: the input's dims and layout, how each pixel's
//! error is formed ([`ErrorKind`]), what the kernel writes per pixel ([`Output`])), the
//! classes it averages over ([`Selection`]), and what the kernel returns ([`Solved`]).
//! [`crate::kernel::plan::Plan`] turns a call and its labels into jobs.

use crate::kernel::real::Real;

/// How a pixel's error is formed from its input value `x` and whether it is foreground.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// `|fg - x|` with `x` a probability (Lovász-Softmax and Lovász-Sigmoid).
    Abs,
    /// `relu(1 - x t)` with `x` a logit and `t = ±1` (Lovász hinge); sorted unclamped.
    Hinge,
}

/// What the kernel writes per pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// Coefficients `A` with `loss = K + Σ A ⊙ x` (see [`crate::kernel`]).
    Linear,
    /// The weights `W` themselves: `loss = Σ W ⊙ errors`.
    Weights,
}

/// One class of the loss: its label value, the input channel holding its scores, and its
/// weight in the class mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ClassEntry {
    pub class: u32,
    pub channel: usize,
    pub weight: f64,
}

/// The classes averaged over in each group.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Selection {
    pub entries: Vec<ClassEntry>,
    /// Skip, per group, the classes without a non-void ground-truth pixel.
    pub only_present: bool,
}

/// Where the class axis of the input (and of the kernel's output) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChannelOrder {
    /// `[B, C, S]`: each (image, channel) row of `S` values is contiguous.
    First,
    /// `[B, S, C]`: each pixel's `C` values are contiguous.
    Last,
}

/// One loss call, whatever its data and device: inputs `[B, C, S]` (or `[B, S, C]`, see
/// `order`) of which it computes what.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Call {
    /// `(B, C, S)`: the input with its spatial axes (and, for binary losses, a unit class
    /// axis) flattened, whichever the order of the class and spatial axes.
    pub dims: (usize, usize, usize),
    /// The layout of the input, and of the values the kernel returns.
    pub order: ChannelOrder,
    pub kind: ErrorKind,
    pub output: Output,
    /// One group per image (the Jaccard index of each image), else one of the batch.
    pub per_image: bool,
    /// A factor applied to every group (e.g. `1 / B` for a mean over images).
    pub group_scale: f64,
    /// The input is logits: the softmax over the class axis is taken first, and the
    /// coefficients turned into the gradient with respect to the logits at the end.
    pub from_logits: bool,
}

impl Call {
    /// The call of a loss over inputs of `dims` in `order`: its linear form (the fused
    /// op's output), no group scale, not from logits. Each use sets those three.
    pub(crate) fn new(
        dims: (usize, usize, usize),
        order: ChannelOrder,
        kind: ErrorKind,
        per_image: bool,
    ) -> Self {
        Self {
            dims,
            order,
            kind,
            output: Output::Linear,
            per_image,
            group_scale: 1.0,
            from_logits: false,
        }
    }

    /// Whether keys with errors `<= 0` are left out: a hinge error `<= 0` has relu weight
    /// 0 and sorts after every positive one, so it changes no other pixel's rank; in
    /// linear mode such pixels are left out (their coefficient stays 0). The weights `W`
    /// need every pixel.
    pub(crate) fn drops_nonpositive(&self) -> bool {
        self.kind == ErrorKind::Hinge && self.output == Output::Linear
    }

    /// The position in the input (and in the output) of `channel` at `pixel` of `image`.
    #[inline]
    pub(crate) fn index(&self, image: usize, channel: usize, pixel: usize) -> usize {
        let (_, c_n, s_n) = self.dims;
        self.order.index((c_n, s_n), image, channel, pixel)
    }
}

impl ChannelOrder {
    /// The position of `channel` at `pixel` of `image` in values of `(C, S) = dims` per
    /// image laid out in this order.
    #[inline]
    pub(crate) fn index(
        self,
        (channels, spatial): (usize, usize),
        image: usize,
        channel: usize,
        pixel: usize,
    ) -> usize {
        match self {
            ChannelOrder::First => (image * channels + channel) * spatial + pixel,
            ChannelOrder::Last => (image * spatial + pixel) * channels + channel,
        }
    }
}

/// The kernel's result: per-pixel values in the input's layout (zero where no class job wrote), and
/// per group the offset `K` and the loss `Σ W ⊙ errors` in f64 (both zero in
/// [`Output::Weights`] mode).
pub(crate) struct Solved<T> {
    pub values: Vec<T>,
    pub offsets: Vec<f64>,
    pub losses: Vec<f64>,
    /// Whether an input value the jobs read was NaN.
    pub nan: bool,
    /// The rows `b * C + c` of the input that no job read (channels of classes not
    /// counted in a group): a NaN there is not seen by `nan`.
    pub unread_rows: Vec<usize>,
}

impl ErrorKind {
    /// The error of input `x` and the slope bit: for `Abs`, whether `target - x >= 0`
    /// (the error is `target - x`, else `x - target`); for `Hinge`, whether the error is
    /// positive (else relu clamps it to 0).
    #[inline]
    pub(crate) fn error<T: Real>(self, x: T, fg: bool) -> (T, bool) {
        // Sign flips and bit tricks rather than branches on a label that is close to
        // random in pixel order; the results are the same bits as `1 - x`, `x`, `1 + x`.
        match self {
            ErrorKind::Abs => {
                let d = T::indicator(fg) - x;
                (d.abs(), d >= T::zero())
            }
            ErrorKind::Hinge => {
                let e = T::from_f64(1.0) + x.neg_if(fg);
                (e, e > T::zero())
            }
        }
    }

    /// For weight `w` of a pixel with error `err` (clamped by the caller's key), slope bit
    /// and ground truth: `(w a, w k, w e)` with `e = k + a x` the clamped error near `x`.
    ///
    /// With `MIXED` (the walk's ground truth close to random, as in a binary loss), by
    /// sign flips and products with 0 / 1 rather than branches on the slope and
    /// ground-truth bits; the results are the same.
    #[inline(always)]
    pub(crate) fn linear<const MIXED: bool>(
        self,
        w: f64,
        err: f64,
        slope: bool,
        fg: bool,
    ) -> (f64, f64, f64) {
        if MIXED {
            let target = f64::indicator(fg);
            return match self {
                // slope: e = t - x, else e = x - t.
                ErrorKind::Abs => {
                    let a = w.neg_if(slope);
                    (a, -a * target, w * err)
                }
                // slope: e = 1 - x t = 1 + x (-t), else the clamped error is 0 (+0.0 in all
                // three, whatever `err` is, as the branched form gives).
                ErrorKind::Hinge => {
                    let mask = 0u64.wrapping_sub(u64::from(slope));
                    let on = |v: f64| f64::from_bits(v.to_bits() & mask);
                    (on(w.neg_if(fg)), on(w), on(w * err))
                }
            };
        }
        let target = if fg { 1.0 } else { 0.0 };
        match (self, slope) {
            (ErrorKind::Abs, true) => (-w, w * target, w * err),
            (ErrorKind::Abs, false) => (w, -w * target, w * err),
            (ErrorKind::Hinge, true) => (if fg { -w } else { w }, w, w * err),
            (ErrorKind::Hinge, false) => (0.0, 0.0, 0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blended_coefficients_match_branched_ones() {
        for kind in [ErrorKind::Abs, ErrorKind::Hinge] {
            for (w, err) in [
                (0.25, 0.75),
                (1e-9, 1.5),
                (3.0, 0.0),
                (0.5, -0.0),
                (2.0, f64::NAN),
            ] {
                for slope in [false, true] {
                    for fg in [false, true] {
                        let bits = |c: (f64, f64, f64)| [c.0, c.1, c.2].map(f64::to_bits);
                        let branched = bits(kind.linear::<false>(w, err, slope, fg));
                        let blended = bits(kind.linear::<true>(w, err, slope, fg));
                        assert_eq!(branched, blended, "{kind:?} {w} {err} {slope} {fg}");
                    }
                }
            }
        }
    }
}
