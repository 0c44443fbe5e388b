//! The [`Primitives`] on the host: each step as the plain loop a device kernel runs in
//! parallel, over the same arrays. It is what tests run the device path's composition
//! through on a machine without a GPU (and what the public losses use under
//! [`crate::force_device_emulation`]).

use candle::{bail, Result};

use super::element::{key_of, locate, pixel_of, walk_slot};
use super::{Call, Chunk, Primitives, WALK_BLOCK};
use crate::channel_softmax::{softmax, softmax_backward};
use crate::kernel::problem::Output;
use crate::kernel::real::Real;

/// The host backend's arrays: the input, the labels, the working set of the largest
/// chunk, and the outputs.
pub(crate) struct HostPrimitives<'a, T> {
    x: &'a [T],
    labels: &'a [u32],
    probas: Option<Vec<T>>,
    keys: Vec<u64>,
    values: Vec<u64>,
    counts: Vec<u32>,
    /// Per block of the chunk's walk: (offset, loss).
    partials: Vec<(f64, f64)>,
    nan: bool,
    /// Per group: (offset, loss).
    sums: Vec<(f64, f64)>,
    /// The per-pixel outputs, in the input's layout.
    pub out: Vec<T>,
    /// The per-group losses (NaN when an input value is NaN).
    pub losses: Vec<T>,
    /// The per-group offsets `K` of the linear form.
    pub offsets: Vec<f64>,
    /// The per-group losses in f64, NaN or not.
    pub group_losses: Vec<f64>,
}

impl<'a, T: Real> HostPrimitives<'a, T> {
    /// A backend for `call` over input `x` (`[B, C, S]` or `[B, S, C]`) and labels `[B, S]`.
    pub fn new(call: &Call, x: &'a [T], labels: &'a [u32]) -> Result<Self> {
        let (b_n, c_n, s_n) = call.shape.dims;
        if x.len() != b_n * c_n * s_n || labels.len() != b_n * s_n {
            bail!("lovasz device emulation: inconsistent sizes (internal error)")
        }
        Ok(Self {
            x,
            labels,
            probas: None,
            keys: Vec::new(),
            values: Vec::new(),
            counts: Vec::new(),
            partials: Vec::new(),
            nan: false,
            sums: vec![(0.0, 0.0); call.groups],
            out: vec![T::zero(); x.len()],
            losses: Vec::new(),
            offsets: Vec::new(),
            group_losses: Vec::new(),
        })
    }

    fn data(&self) -> &[T] {
        self.probas.as_deref().unwrap_or(self.x)
    }
}

impl<T: Real> Primitives for HostPrimitives<'_, T> {
    fn softmax(&mut self, call: &Call) -> Result<()> {
        self.probas = Some(softmax(self.x, call.shape.dims, call.shape.order));
        Ok(())
    }

    fn scan_nan(&mut self, _call: &Call) -> Result<()> {
        self.nan = self.data().iter().any(|v| v.is_nan());
        Ok(())
    }

    fn build_keys(&mut self, call: &Call, chunk: &Chunk) -> Result<()> {
        let l = call.seg_len;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for e in 0..chunk.elems {
            let (in_chunk, i) = (e / l, e % l);
            let job = &call.jobs[chunk.jobs.start + in_chunk];
            let (at, label_at) = locate(&call.shape, job, i);
            let x = self.data()[at];
            let (k, v) = key_of(&call.shape, job, in_chunk, e, i, x, self.labels[label_at]);
            keys.push(k);
            values.push(v);
        }
        (self.keys, self.values) = (keys, values);
        Ok(())
    }

    fn sort(&mut self, call: &Call, chunk: &Chunk) -> Result<()> {
        let mut pairs: Vec<(u64, u64)> = self
            .keys
            .iter()
            .copied()
            .zip(self.values.iter().copied())
            .collect();
        if call.shape.wide {
            // A stable sort by error key, then a stable sort by job.
            pairs.sort_by_key(|p| p.0);
            let l = call.seg_len as u64;
            pairs.sort_by_key(|p| (p.1 >> 2) / l);
        } else {
            let mask = if 32 + chunk.job_bits >= 64 {
                u64::MAX
            } else {
                (1u64 << (32 + chunk.job_bits)) - 1
            };
            pairs.sort_by_key(|p| p.0 & mask);
        }
        (self.keys, self.values) = pairs.into_iter().unzip();
        Ok(())
    }

    fn count_foreground(&mut self, _call: &Call, _chunk: &Chunk) -> Result<()> {
        let mut before = 0u32;
        self.counts = (self.values.iter())
            .map(|v| {
                let c = before;
                before = before.wrapping_add((v & 1) as u32);
                c
            })
            .collect();
        Ok(())
    }

    fn walk(&mut self, call: &Call, chunk: &Chunk) -> Result<()> {
        let l = call.seg_len;
        let blocks = chunk.blocks_per_job();
        self.partials = vec![(0.0, 0.0); chunk.jobs.len() * blocks];
        for (in_chunk, j) in chunk.jobs.clone().enumerate() {
            let job = &call.jobs[j];
            let first = in_chunk * l;
            for k in 0..(job.valid as usize) {
                let slot = first + k;
                let fg_before = u64::from(self.counts[slot].wrapping_sub(self.counts[first]));
                let value = self.values[slot];
                let (at, _) = locate(&call.shape, job, pixel_of(value, l));
                let x = self.data()[at];
                let (v, offset, loss) = walk_slot(&call.shape, job, k, fg_before, value, x);
                self.out[at] = v;
                let p = &mut self.partials[in_chunk * blocks + k / WALK_BLOCK];
                p.0 += offset;
                p.1 += loss;
            }
        }
        // Per job, its blocks in order, into its group.
        for (in_chunk, j) in chunk.jobs.clone().enumerate() {
            let g = call.jobs[j].group as usize;
            let (mut offset, mut loss) = (0.0, 0.0);
            for p in &self.partials[in_chunk * blocks..(in_chunk + 1) * blocks] {
                offset += p.0;
                loss += p.1;
            }
            self.sums[g].0 += offset;
            self.sums[g].1 += loss;
        }
        Ok(())
    }

    fn finish(&mut self, call: &Call) -> Result<()> {
        if call.shape.from_logits && call.shape.output == Output::Linear {
            if let Some(p) = &self.probas {
                softmax_backward(p, &mut self.out, call.shape.dims, call.shape.order);
            }
        }
        let nan = self.nan;
        self.losses = (self.sums.iter())
            .map(|s| T::from_f64(if nan { f64::NAN } else { s.1 }))
            .collect();
        self.offsets = self.sums.iter().map(|s| s.0).collect();
        self.group_losses = self.sums.iter().map(|s| s.1).collect();
        Ok(())
    }
}
