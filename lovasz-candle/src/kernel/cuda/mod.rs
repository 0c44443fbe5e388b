//! The CUDA backend of [`segmented`](crate::kernel::segmented): each [`Primitives`] step
//! as one or two launches of `cuda/lovasz.cu` (or a CUB call) on candle's stream, over
//! buffers from candle's allocator. Nothing here synchronises or copies pixel data to the
//! host; the plan ([`Segments`]) is made on the host from the labels, which the loss has
//! validated there, and the labels and job records are uploaded once per call.

mod ffi;

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{bail, CudaDevice, CudaStorage, Layout, Result};

use super::call::{ChannelOrder, ErrorKind, Output};
use super::real::Real;
use super::segmented::{self, Chunk, JobRecord, Primitives, Segments};
use ffi::{check, Dims};

/// A float the CUDA backend takes: f32 or f64.
pub(crate) trait CudaReal: Real + CudaDType + DeviceRepr + ValidAsZeroBits {}
impl CudaReal for f32 {}
impl CudaReal for f64 {}

/// Runs the call laid out in `segs` on the contiguous input `storage` / `layout` with host `labels` (`[B, S]`,
/// void as `VOID`), returning the per-pixel values (in the input's layout) and the
/// per-group losses, on the input's device.
pub(crate) fn solve<T: CudaReal>(
    storage: &CudaStorage,
    layout: &Layout,
    segs: &Segments,
    labels: &[u32],
) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("lovasz cuda: input must be contiguous")
    };
    let dev = storage.device().clone();
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    let slice = storage.as_cuda_slice::<T>()?;
    let x = slice.slice(start..end);
    let mut backend = CudaPrimitives::new(segs, &dev, stream, x, labels)?;
    segmented::run(&mut backend, segs)?;
    let Some(mut losses) = backend.losses.take() else {
        bail!("lovasz cuda: no losses were written (internal error)")
    };
    // cudarc records a buffer's read / write event when a pointer guard drops: taken again
    // now, after the last launch, they make any other stream wait for these kernels.
    let s = backend.stream.clone();
    drop(backend.x.device_ptr(&s));
    drop(backend.out.device_ptr_mut(&s));
    drop(losses.device_ptr_mut(&s));
    Ok((backend.out, losses))
}

/// The device buffers of one call.
struct CudaPrimitives<'a, T: CudaReal> {
    stream: Arc<CudaStream>,
    dims: Dims,
    x: CudaView<'a, T>,
    labels: CudaSlice<u32>,
    /// The call's [`JobRecord`]s as bytes.
    jobs: CudaSlice<u8>,
    probas: Option<CudaSlice<T>>,
    keys: [CudaSlice<u64>; 2],
    /// Values of `value_bytes` each, as bytes.
    values: [CudaSlice<u8>; 2],
    /// The buffer of `values` the last sort left its result in.
    current: usize,
    counts: CudaSlice<u32>,
    partials: CudaSlice<f64>,
    temp: CudaSlice<u8>,
    temp_bytes: usize,
    nan: CudaSlice<u32>,
    /// Two f64 per group: offset, loss.
    sums: CudaSlice<f64>,
    out: CudaSlice<T>,
    losses: Option<CudaSlice<T>>,
    dev: CudaDevice,
}

/// The raw device address of a buffer (the event guard is dropped at once: every step runs
/// on candle's stream; [`solve`] records the events of its inputs and outputs after the
/// last step).
fn ptr<T, S: DevicePtr<T>>(s: &S, stream: &CudaStream) -> *const c_void {
    s.device_ptr(stream).0 as *const c_void
}

fn ptr_mut<T, S: DevicePtrMut<T>>(s: &mut S, stream: &CudaStream) -> *mut c_void {
    s.device_ptr_mut(stream).0 as *mut c_void
}

impl<'a, T: CudaReal> CudaPrimitives<'a, T> {
    fn new(
        segs: &Segments,
        dev: &CudaDevice,
        stream: Arc<CudaStream>,
        x: CudaView<'a, T>,
        labels: &[u32],
    ) -> Result<Self> {
        let call = segs.call();
        let (b_n, c_n, s_n) = call.dims;
        if x.len() != b_n * c_n * s_n || labels.len() != b_n * s_n {
            bail!("lovasz cuda: inconsistent sizes (internal error)")
        }
        let dims = Dims {
            batch: b_n as u64,
            channels: c_n as u64,
            spatial: s_n as u64,
            seg_len: segs.seg_len as u64,
            channels_last: u32::from(call.order == ChannelOrder::Last),
            kind: match call.kind {
                ErrorKind::Abs => 0,
                ErrorKind::Hinge => 1,
            },
            output: match call.output {
                Output::Linear => 0,
                Output::Weights => 1,
            },
            wide: u32::from(segs.wide),
        };
        let elems = segs
            .chunks
            .iter()
            .map(|c| c.elems)
            .max()
            .unwrap_or(0)
            .max(1);
        let blocks = (segs.chunks.iter())
            .map(|c| c.jobs.len() * c.blocks_per_job())
            .max()
            .unwrap_or(0)
            .max(1);
        let value_bytes = if segs.wide { 8 } else { 4 };
        let mut temp_bytes = 0usize;
        // SAFETY: a host-only size query.
        check("the CUB size query", unsafe {
            ffi::lc_temp_bytes(elems as u64, dims.wide, &mut temp_bytes)
        })?;
        let records: Vec<u8> = segs.jobs.iter().flat_map(record_bytes).collect();
        let records = if records.is_empty() {
            vec![0u8; 1]
        } else {
            records
        };
        // SAFETY (the `alloc`s): every buffer is written by a step before any step reads it.
        let alloc_u8 = |n: usize| unsafe { dev.alloc::<u8>(n.max(1)) };
        let alloc_u64 = |n: usize| unsafe { dev.alloc::<u64>(n) };
        Ok(Self {
            dims,
            labels: dev.clone_htod(labels)?,
            jobs: dev.clone_htod(&records)?,
            probas: None,
            keys: [alloc_u64(elems)?, alloc_u64(elems)?],
            values: [
                alloc_u8(elems * value_bytes)?,
                alloc_u8(elems * value_bytes)?,
            ],
            current: 0,
            // SAFETY: written by the foreground count before the walk reads it.
            counts: unsafe { dev.alloc::<u32>(elems)? },
            // SAFETY: each walk writes every block's partials before its sum reads them.
            partials: unsafe { dev.alloc::<f64>(2 * blocks)? },
            temp: alloc_u8(temp_bytes)?,
            temp_bytes: temp_bytes.max(1),
            nan: dev.alloc_zeros::<u32>(1)?,
            sums: dev.alloc_zeros::<f64>(2 * segs.groups().max(1))?,
            out: dev.alloc_zeros::<T>(x.len().max(1))?,
            losses: None,
            x,
            stream,
            dev: dev.clone(),
        })
    }

    fn stream_ptr(&self) -> *mut c_void {
        self.stream.cu_stream() as *mut c_void
    }

    /// The values the steps read: the probabilities from logits, else the input.
    fn data(&self) -> *const c_void {
        match &self.probas {
            Some(p) => ptr(p, &self.stream),
            None => ptr(&self.x, &self.stream),
        }
    }

    /// The device address of the chunk's first job record.
    fn chunk_jobs(&self, chunk: &Chunk) -> *const c_void {
        let base = ptr(&self.jobs, &self.stream) as *const u8;
        base.wrapping_add(chunk.jobs.start * std::mem::size_of::<JobRecord>()) as *const c_void
    }
}

/// A job record's bytes, in the struct's `#[repr(C)]` layout.
fn record_bytes(j: &JobRecord) -> Vec<u8> {
    let mut b = Vec::with_capacity(std::mem::size_of::<JobRecord>());
    for v in [j.first_image, j.class, j.channel, j.group] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    b.extend_from_slice(&j.valid.to_ne_bytes());
    b.extend_from_slice(&j.gts.to_ne_bytes());
    b.extend_from_slice(&j.scale.to_ne_bytes());
    b
}

impl<T: CudaReal> Primitives for CudaPrimitives<'_, T> {
    fn softmax(&mut self, _segs: &Segments) -> Result<()> {
        // SAFETY: written whole by the softmax before any read.
        let mut p = unsafe { self.dev.alloc::<T>(self.x.len().max(1))? };
        let s = self.stream.clone();
        // SAFETY: both buffers hold B·C·S values of T, on this stream.
        let code = unsafe {
            ffi::lc_softmax(
                ptr(&self.x, &s),
                ptr_mut(&mut p, &s),
                self.dims,
                self.stream_ptr(),
            )
        };
        check("softmax", code)?;
        self.probas = Some(p);
        Ok(())
    }

    fn scan_nan(&mut self, _segs: &Segments) -> Result<()> {
        let s = self.stream.clone();
        let (data, n) = (self.data(), self.x.len() as u64);
        let flag = ptr_mut(&mut self.nan, &s) as *mut u32;
        // SAFETY: `data` holds `n` values of T; `flag` one u32.
        check("the NaN scan", unsafe {
            ffi::lc_scan_nan(data, n, self.dims.wide, flag, self.stream_ptr())
        })
    }

    fn build_keys(&mut self, _segs: &Segments, chunk: &Chunk) -> Result<()> {
        let s = self.stream.clone();
        let (data, jobs) = (self.data(), self.chunk_jobs(chunk));
        let labels = ptr(&self.labels, &s) as *const u32;
        let keys = ptr_mut(&mut self.keys[0], &s) as *mut u64;
        let values = ptr_mut(&mut self.values[0], &s);
        // SAFETY: the buffers hold the largest chunk; the records its jobs.
        check("building the keys", unsafe {
            ffi::lc_build_keys(
                data,
                labels,
                jobs,
                chunk.elems as u64,
                self.dims,
                keys,
                values,
                self.stream_ptr(),
            )
        })
    }

    fn sort(&mut self, _segs: &Segments, chunk: &Chunk) -> Result<()> {
        let s = self.stream.clone();
        let temp = ptr_mut(&mut self.temp, &s);
        let [k0, k1] = &mut self.keys;
        let (k0, k1) = (ptr_mut(k0, &s) as *mut u64, ptr_mut(k1, &s) as *mut u64);
        let [v0, v1] = &mut self.values;
        let (v0, v1) = (ptr_mut(v0, &s), ptr_mut(v1, &s));
        let mut current: c_int = 0;
        // SAFETY: the buffers and the temporary storage hold the largest chunk.
        let code = unsafe {
            ffi::lc_sort(
                temp,
                self.temp_bytes,
                k0,
                k1,
                v0,
                v1,
                chunk.elems as u64,
                chunk.job_bits,
                self.dims,
                &mut current,
                self.stream_ptr(),
            )
        };
        check("the radix sort", code)?;
        self.current = usize::from(current != 0);
        Ok(())
    }

    fn count_foreground(&mut self, _segs: &Segments, chunk: &Chunk) -> Result<()> {
        let s = self.stream.clone();
        let temp = ptr_mut(&mut self.temp, &s);
        let values = ptr(&self.values[self.current], &s);
        let counts = ptr_mut(&mut self.counts, &s) as *mut u32;
        // SAFETY: as in `sort`.
        check("the foreground count", unsafe {
            ffi::lc_count_foreground(
                temp,
                self.temp_bytes,
                values,
                chunk.elems as u64,
                self.dims.wide,
                counts,
                self.stream_ptr(),
            )
        })
    }

    fn walk(&mut self, _segs: &Segments, chunk: &Chunk) -> Result<()> {
        let s = self.stream.clone();
        let (data, jobs) = (self.data(), self.chunk_jobs(chunk));
        let values = ptr(&self.values[self.current], &s);
        let counts = ptr(&self.counts, &s) as *const u32;
        let out = ptr_mut(&mut self.out, &s);
        let partials = ptr_mut(&mut self.partials, &s) as *mut f64;
        let sums = ptr_mut(&mut self.sums, &s) as *mut f64;
        let (n_jobs, blocks) = (chunk.jobs.len() as u64, chunk.blocks_per_job() as u64);
        // SAFETY: `out` holds the input's values; `partials` the largest chunk's blocks.
        check("the Jaccard walk", unsafe {
            ffi::lc_walk(
                data,
                jobs,
                n_jobs,
                blocks,
                self.dims,
                values,
                counts,
                out,
                partials,
                sums,
                self.stream_ptr(),
            )
        })
    }

    fn finish(&mut self, segs: &Segments) -> Result<()> {
        let s = self.stream.clone();
        if segs.call().from_logits && segs.call().output == Output::Linear {
            if let Some(p) = &self.probas {
                let p = ptr(p, &s);
                let out = ptr_mut(&mut self.out, &s);
                // SAFETY: both hold the input's values.
                check("the softmax backward", unsafe {
                    ffi::lc_softmax_backward(p, out, self.dims, self.stream_ptr())
                })?;
            }
        }
        let groups = segs.groups().max(1);
        // SAFETY: written whole by the kernel below.
        let mut losses = unsafe { self.dev.alloc::<T>(groups)? };
        let sums = ptr(&self.sums, &s) as *const f64;
        let nan = ptr(&self.nan, &s) as *const u32;
        let out = ptr_mut(&mut losses, &s);
        // SAFETY: `sums` holds two f64 per group, `losses` one T.
        check("the losses", unsafe {
            ffi::lc_losses(
                sums,
                nan,
                segs.groups() as u64,
                self.dims.wide,
                out,
                self.stream_ptr(),
            )
        })?;
        self.losses = Some(losses);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_records_are_packed_as_the_struct() {
        let j = JobRecord {
            first_image: 1,
            class: 2,
            channel: 3,
            group: 4,
            valid: 5,
            gts: 6,
            scale: 0.5,
        };
        let bytes = record_bytes(&j);
        assert_eq!(bytes.len(), std::mem::size_of::<JobRecord>());
        // SAFETY: JobRecord is plain old data of exactly these bytes.
        let back: JobRecord =
            unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const JobRecord) };
        assert_eq!(back, j);
    }
}
