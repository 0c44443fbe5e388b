//! The [`Primitives`] on the host: each step as the plain loop a device kernel runs in
//! parallel, over the same arrays. It is what tests run the device path's composition
//! through on a machine without a GPU (and what the public losses use when the
//! `test-paths` feature's `force_device_emulation` is on).

use candle::{bail, DType, Result};

use super::element::{key_of, locate, pixel_of, walk_slot};
use super::{run, Chunk, Primitives, Segments, WALK_BLOCK};
use crate::kernel::call::{Output, Solved};
use crate::kernel::plan::Plan;
use crate::kernel::real::Real;
use crate::kernel::softmax::{softmax, softmax_backward};

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
    /// A backend for the call laid out in `segs`, over input `x` (`[B, C, S]` or `[B, S, C]`) and labels `[B, S]`.
    pub fn new(segs: &Segments, x: &'a [T], labels: &'a [u32]) -> Result<Self> {
        let (b_n, c_n, s_n) = segs.call().dims;
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
            sums: vec![(0.0, 0.0); segs.groups()],
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
    fn softmax(&mut self, segs: &Segments) -> Result<()> {
        self.probas = Some(softmax(self.x, segs.call().dims, segs.call().order));
        Ok(())
    }

    fn scan_nan(&mut self, _segs: &Segments) -> Result<()> {
        self.nan = self.data().iter().any(|v| v.is_nan());
        Ok(())
    }

    fn build_keys(&mut self, segs: &Segments, chunk: &Chunk) -> Result<()> {
        let l = segs.seg_len;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for e in 0..chunk.elems {
            let (in_chunk, i) = (e / l, e % l);
            let job = &segs.jobs[chunk.jobs.start + in_chunk];
            let (at, label_at) = locate(segs, job, i);
            let x = self.data()[at];
            let (k, v) = key_of(segs, job, in_chunk, e, i, x, self.labels[label_at]);
            keys.push(k);
            values.push(v);
        }
        (self.keys, self.values) = (keys, values);
        Ok(())
    }

    fn sort(&mut self, segs: &Segments, chunk: &Chunk) -> Result<()> {
        let mut pairs: Vec<(u64, u64)> = self
            .keys
            .iter()
            .copied()
            .zip(self.values.iter().copied())
            .collect();
        if segs.wide {
            // A stable sort by error key, then a stable sort by job.
            pairs.sort_by_key(|p| p.0);
            let l = segs.seg_len as u64;
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

    fn count_foreground(&mut self, _segs: &Segments, _chunk: &Chunk) -> Result<()> {
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

    fn walk(&mut self, segs: &Segments, chunk: &Chunk) -> Result<()> {
        let l = segs.seg_len;
        let blocks = chunk.blocks_per_job();
        self.partials = vec![(0.0, 0.0); chunk.jobs.len() * blocks];
        for (in_chunk, j) in chunk.jobs.clone().enumerate() {
            let job = &segs.jobs[j];
            let first = in_chunk * l;
            for k in 0..(job.valid as usize) {
                let slot = first + k;
                let fg_before = u64::from(self.counts[slot].wrapping_sub(self.counts[first]));
                let value = self.values[slot];
                let (at, _) = locate(segs, job, pixel_of(value, l));
                let x = self.data()[at];
                let (v, offset, loss) = walk_slot(segs, job, k, fg_before, value, x);
                self.out[at] = v;
                let p = &mut self.partials[in_chunk * blocks + k / WALK_BLOCK];
                p.0 += offset;
                p.1 += loss;
            }
        }
        // Per job, its blocks in order, into its group.
        for (in_chunk, j) in chunk.jobs.clone().enumerate() {
            let g = segs.jobs[j].group as usize;
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

    fn finish(&mut self, segs: &Segments) -> Result<()> {
        if segs.call().from_logits && segs.call().output == Output::Linear {
            if let Some(p) = &self.probas {
                softmax_backward(p, &mut self.out, segs.call().dims, segs.call().order);
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

/// The device path's composition run on the host for `plan` over `data` and `labels`:
/// what [`crate::kernel::cpu::solve`] returns (with the softmax and its Jacobian inside
/// when the call is from logits; no rows are left unread, NaN is scanned in full).
pub(crate) fn emulate<T: Real>(plan: Plan, data: &[T], labels: &[u32]) -> Result<Solved<T>> {
    let segs = Segments::new(plan, T::DTYPE == DType::F64)?;
    let mut host = HostPrimitives::new(&segs, data, labels)?;
    run(&mut host, &segs)?;
    Ok(Solved {
        nan: host.losses.iter().any(|l| l.is_nan()),
        losses: host.losses.iter().map(|l| l.to_f64()).collect(),
        values: host.out,
        offsets: host.offsets,
        unread_rows: Vec::new(),
    })
}
