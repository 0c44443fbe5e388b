//! A process group: the ranks of a data-parallel job and the collectives the distributed
//! losses (and a training loop's gradient averaging) need. [`LocalGroup`] runs the ranks
//! as threads of one process, `MpiGroup` (with the `mpi` feature) as the processes of
//! an MPI job, `NcclGroup` (with the `nccl` feature) as CUDA devices exchanging through
//! NCCL.

mod local;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

pub use local::LocalGroup;
#[cfg(feature = "mpi")]
pub use mpi::MpiGroup;
#[cfg(feature = "nccl")]
pub use nccl::{NcclGroup, NcclId};

use candle::Result;
#[cfg(any(feature = "mpi", feature = "nccl"))]
use std::sync::{Mutex, MutexGuard};
#[cfg(any(feature = "mpi", feature = "nccl"))]
use std::time::Duration;

/// Values summed element-wise over the ranks by [`ProcessGroup::all_reduce_sum`].
#[derive(Debug)]
pub enum ReduceBuffer<'a> {
    /// f32 values (gradients).
    F32(&'a mut [f32]),
    /// f64 values (losses).
    F64(&'a mut [f64]),
    /// u64 values (pixel counts).
    U64(&'a mut [u64]),
}

impl ReduceBuffer<'_> {
    /// The number of values.
    pub fn len(&self) -> usize {
        match self {
            ReduceBuffer::F32(v) => v.len(),
            ReduceBuffer::F64(v) => v.len(),
            ReduceBuffer::U64(v) => v.len(),
        }
    }

    /// `true` when there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The ranks of a data-parallel job and their collectives.
///
/// Every rank calls the same collectives in the same order. An implementation must not
/// hang when a rank leaves or disagrees: a collective that cannot complete returns an
/// `Err` on every rank that is still in it. Sums are taken in rank order, so every rank
/// gets the same bits.
pub trait ProcessGroup: Send + Sync {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// Every rank's `bytes`, in rank order (the lengths may differ between ranks).
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Sums `values` element-wise over the ranks, in place, in rank order; every rank
    /// passes the same variant and length.
    fn all_reduce_sum(&self, values: ReduceBuffer<'_>) -> Result<()>;

    /// Root's `bytes` on every rank (the other ranks' input is replaced).
    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
}

/// `state` locked for `what`, unless the group `name` of `rank` is unusable: `failed`
/// reads the reason from the state (a collective that timed out).
#[cfg(any(feature = "mpi", feature = "nccl"))]
pub(crate) fn lock_usable<'a, T>(
    state: &'a Mutex<T>,
    failed: fn(&T) -> Option<&String>,
    (name, rank, what): (&str, usize, &str),
) -> Result<MutexGuard<'a, T>> {
    let guard = match state.lock() {
        Ok(g) => g,
        Err(_) => candle::bail!("{name}: the group's state was poisoned by a panic"),
    };
    if let Some(why) = failed(&guard) {
        candle::bail!("{name}: rank {rank} cannot run {what}: {why}")
    }
    Ok(guard)
}

/// The `Debug` form of a group over an engine: its name, rank, world size and timeout.
#[cfg(any(feature = "mpi", feature = "nccl"))]
pub(crate) fn fmt_group(
    f: &mut std::fmt::Formatter<'_>,
    name: &str,
    (rank, world_size): (usize, usize),
    timeout: Duration,
) -> std::fmt::Result {
    f.debug_struct(name)
        .field("rank", &rank)
        .field("world_size", &world_size)
        .field("timeout", &timeout)
        .finish_non_exhaustive()
}

/// Sums `parts` (one per rank, in rank order, each `values.len()` values of the variant's
/// type as little-endian bytes) into `values`: the reduction of an all-gather.
pub(crate) fn sum_gathered(values: ReduceBuffer<'_>, parts: &[Vec<u8>]) -> Result<()> {
    fn sum<const N: usize, T: Copy + std::ops::Add<Output = T>>(
        out: &mut [T],
        parts: &[Vec<u8>],
        zero: T,
        read: impl Fn([u8; N]) -> T,
    ) -> Result<()> {
        for part in parts {
            if part.len() != out.len() * N {
                candle::bail!(
                    "all_reduce_sum: the ranks passed different lengths ({} and {} values)",
                    out.len(),
                    part.len() / N
                )
            }
        }
        for (i, o) in out.iter_mut().enumerate() {
            let mut acc = zero;
            for part in parts {
                let mut b = [0u8; N];
                b.copy_from_slice(&part[i * N..(i + 1) * N]);
                acc = acc + read(b);
            }
            *o = acc;
        }
        Ok(())
    }
    match values {
        ReduceBuffer::F32(v) => sum(v, parts, 0.0, f32::from_le_bytes),
        ReduceBuffer::F64(v) => sum(v, parts, 0.0, f64::from_le_bytes),
        ReduceBuffer::U64(v) => sum(v, parts, 0, u64::from_le_bytes),
    }
}

/// The little-endian bytes of `values`, tagged with their variant.
pub(crate) fn reduce_bytes(values: &ReduceBuffer<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + values.len() * 8);
    match values {
        ReduceBuffer::F32(v) => {
            out.push(0);
            v.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        ReduceBuffer::F64(v) => {
            out.push(1);
            v.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        ReduceBuffer::U64(v) => {
            out.push(2);
            v.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
    }
    out
}

/// [`ProcessGroup::all_reduce_sum`] built on [`ProcessGroup::all_gather`]: every rank
/// gathers every rank's values and sums them in rank order. Fails on every rank when the
/// ranks passed different variants or lengths.
pub(crate) fn all_reduce_by_gather<G: ProcessGroup + ?Sized>(
    group: &G,
    values: ReduceBuffer<'_>,
) -> Result<()> {
    let bytes = reduce_bytes(&values);
    let tag = bytes[0];
    let parts = group.all_gather(&bytes)?;
    if let Some(p) = parts.iter().find(|p| p.first() != Some(&tag)) {
        candle::bail!(
            "all_reduce_sum: the ranks passed different value types (tags {tag} and {:?})",
            p.first()
        )
    }
    let parts: Vec<Vec<u8>> = parts.into_iter().map(|p| p[1..].to_vec()).collect();
    sum_gathered(values, &parts)
}
