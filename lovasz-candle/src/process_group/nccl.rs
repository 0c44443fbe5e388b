//! [`NcclGroup`]: the ranks of a process group as CUDA devices that exchange through NCCL
//! (cudarc's bindings, with the `nccl` feature), one rank per process and GPU.

use std::mem;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle::cuda_backend::cudarc::driver::{CudaStream, DriverError};
use candle::cuda_backend::cudarc::nccl::safe::{Comm, Id};
use candle::{bail, CudaDevice, Result};

use super::{all_reduce_by_gather, fmt_group, lock_usable, ProcessGroup, ReduceBuffer};

/// The id that names one NCCL job: one rank makes it ([`NcclId::new`]) and every other
/// rank gets its 128 bytes ([`NcclId::to_bytes`], [`NcclId::from_bytes`]) over another
/// channel. `NcclGroup::from_mpi` (feature `mpi`) does that over MPI.
#[derive(Clone, Copy)]
pub struct NcclId(Id);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A new job id (`ncclGetUniqueId`). An `Err` when the NCCL library cannot be loaded
    /// or fails.
    pub fn new() -> Result<Self> {
        match Id::new() {
            Ok(id) => Ok(NcclId(id)),
            Err(e) => {
                bail!("NCCL: cannot make a job id ({e:?}): is libnccl.so.2 on the library path?")
            }
        }
    }

    /// The id's 128 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal().iter().map(|&c| c as u8).collect()
    }

    /// The id of [`NcclId::to_bytes`]'s bytes; an `Err` unless there are 128.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let Ok(raw) = <[u8; 128]>::try_from(bytes) else {
            bail!("NCCL: a job id has 128 bytes, got {}", bytes.len())
        };
        Ok(NcclId(Id::uninit(raw.map(|b| b as std::ffi::c_char))))
    }
}

/// This process's rank of an NCCL job on one CUDA device.
///
/// # Collectives
///
/// [`all_gather`](ProcessGroup::all_gather) gathers the byte counts (`ncclAllGather` of
/// one u64 per rank), then every rank's bytes padded to the largest count;
/// [`broadcast`](ProcessGroup::broadcast) sends the root's count, then its bytes
/// (`ncclBroadcast`); [`all_reduce_sum`](ProcessGroup::all_reduce_sum) is an all-gather
/// summed in rank order on every rank, as the trait asks (the same bits on every rank;
/// NCCL's own all-reduce sums in an order of its choosing). The bytes go from the host to
/// the device and back: the group serves the host-side exchange of the distributed
/// losses and a training loop's host-side gradient buffers.
///
/// # When a rank does not come
///
/// Each collective is queued on the device's stream and polled until it completes or the
/// timeout passes ([`NcclGroup::timeout`], 10 minutes by default); then the communicator
/// is aborted (`ncclCommAbort`), the collective's buffers are leaked, every later
/// collective is an `Err`, and the `Err` names the collective and the rank. Starting the
/// communicator ([`NcclGroup::new`]) waits for every rank without a timeout (NCCL's
/// blocking initialisation); under `mpirun`, a rank that fails before it exits non-zero
/// and `mpirun` ends the job.
pub struct NcclGroup {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    stream: Arc<CudaStream>,
    inner: Mutex<Inner>,
}

struct Inner {
    /// `None` once aborted after a timeout.
    comm: Option<Comm>,
    /// Why the group is unusable.
    failed: Option<String>,
}

impl Inner {
    /// Why the group is unusable, if it is.
    fn why_failed(&self) -> Option<&String> {
        self.failed.as_ref()
    }
}

// SAFETY: the communicator is only used through `inner`'s mutex, so by one thread at a
// time; NCCL communicators may be used from any thread, one call at a time, and the
// stream is cudarc's thread-safe handle.
unsafe impl Send for NcclGroup {}
// SAFETY: as for `Send`.
unsafe impl Sync for NcclGroup {}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = (self.rank, self.world_size);
        fmt_group(f, "NcclGroup", who, self.timeout)
    }
}

fn cuda_error(what: &str, e: DriverError) -> candle::Error {
    candle::Error::Msg(format!("NcclGroup: {what}: CUDA error {e:?}"))
}

impl NcclGroup {
    /// Rank `rank` of `world_size` of the NCCL job `id`, on `device` (its stream carries
    /// the collectives). Every rank must call it with the same id and world size; it
    /// returns when all have (`ncclCommInitRank`).
    pub fn new(device: &CudaDevice, rank: usize, world_size: usize, id: NcclId) -> Result<Self> {
        if rank >= world_size {
            bail!("NcclGroup::new: rank {rank} of a world of {world_size}")
        }
        let stream = device.cuda_stream();
        (stream.context().bind_to_thread()).map_err(|e| cuda_error("binding the device", e))?;
        let comm = match Comm::from_rank(stream.clone(), rank, world_size, id.0) {
            Ok(c) => c,
            Err(e) => {
                bail!("NcclGroup::new: rank {rank} of {world_size}: NCCL failed to start ({e:?})")
            }
        };
        Ok(NcclGroup {
            rank,
            world_size,
            timeout: Duration::from_secs(600),
            stream,
            inner: Mutex::new(Inner {
                comm: Some(comm),
                failed: None,
            }),
        })
    }

    /// A world of one rank on `device` (no launcher needed).
    pub fn single(device: &CudaDevice) -> Result<Self> {
        Self::new(device, 0, 1, NcclId::new()?)
    }

    /// The ranks of `mpi` as an NCCL job on `device` (this rank's GPU): rank 0 makes the
    /// id and broadcasts it over MPI, so that `mpirun -np N` starts either group. When
    /// rank 0 cannot make one, every rank gets its error.
    #[cfg(feature = "mpi")]
    pub fn from_mpi(mpi: &super::MpiGroup, device: &CudaDevice) -> Result<Self> {
        // Rank 0 sends the id's 128 bytes, or its error as text (never 128 bytes long).
        let mut bytes = if mpi.rank() == 0 {
            match NcclId::new() {
                Ok(id) => id.to_bytes(),
                Err(e) => {
                    let mut text: String = e.to_string().chars().take(100).collect();
                    if text.len() == 128 {
                        text.push('.');
                    }
                    text.into_bytes()
                }
            }
        } else {
            Vec::new()
        };
        mpi.broadcast(&mut bytes, 0)?;
        if bytes.len() != 128 {
            bail!(
                "NcclGroup::from_mpi: rank 0 could not start NCCL: {}",
                String::from_utf8_lossy(&bytes)
            )
        }
        Self::new(
            device,
            mpi.rank(),
            mpi.world_size(),
            NcclId::from_bytes(&bytes)?,
        )
    }

    /// This group with collectives that fail after waiting `timeout` for the other ranks.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn lock(&self, what: &str) -> Result<MutexGuard<'_, Inner>> {
        let inner = lock_usable(
            &self.inner,
            Inner::why_failed,
            ("NcclGroup", self.rank, what),
        )?;
        (self.stream.context().bind_to_thread()).map_err(|e| cuda_error(what, e))?;
        Ok(inner)
    }

    /// The communicator of a usable group.
    fn comm<'a>(&self, inner: &'a Inner) -> Result<&'a Comm> {
        match &inner.comm {
            Some(c) => Ok(c),
            None => bail!(
                "NcclGroup: rank {}: the communicator was aborted",
                self.rank
            ),
        }
    }

    /// Waits for the work queued on the stream so far, up to the timeout. On timeout the
    /// communicator is aborted, `buffers` (what NCCL may still touch) are leaked and the
    /// group is marked unusable.
    fn wait<B>(&self, inner: &mut Inner, buffers: B, what: &str) -> Result<B> {
        let event = (self.stream.record_event(None)).map_err(|e| cuda_error(what, e))?;
        let start = Instant::now();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(buffers),
                Ok(false) if start.elapsed() < self.timeout => {
                    if start.elapsed() < Duration::from_millis(1) {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
                Ok(false) => {
                    mem::forget(buffers);
                    // Dropping the communicator aborts it.
                    inner.comm = None;
                    let why = format!(
                        "{what} waited {:?} for the other ranks (the communicator is aborted)",
                        self.timeout
                    );
                    inner.failed = Some(why.clone());
                    bail!("NcclGroup: rank {}: {why}", self.rank)
                }
                Err(e) => {
                    mem::forget(buffers);
                    inner.failed = Some(format!("{what} failed on the device: {e:?}"));
                    return Err(cuda_error(what, e));
                }
            }
        }
    }

    /// Every rank's `value`, in rank order.
    fn gather_u64(&self, inner: &mut Inner, value: u64, what: &str) -> Result<Vec<u64>> {
        let s = &self.stream;
        let send = s.clone_htod(&[value]).map_err(|e| cuda_error(what, e))?;
        let mut recv = (s.alloc_zeros::<u64>(self.world_size)).map_err(|e| cuda_error(what, e))?;
        if let Err(e) = self.comm(inner)?.all_gather(&send, &mut recv) {
            bail!("NcclGroup: rank {}: {what}: {e:?}", self.rank)
        }
        let (_send, recv) = self.wait(inner, (send, recv), what)?;
        s.clone_dtoh(&recv).map_err(|e| cuda_error(what, e))
    }

    /// Root's `value` on every rank.
    fn broadcast_u64(&self, inner: &mut Inner, value: u64, root: usize, what: &str) -> Result<u64> {
        let mut buf = (self.stream.clone_htod(&[value])).map_err(|e| cuda_error(what, e))?;
        if let Err(e) = self.comm(inner)?.broadcast_in_place(&mut buf, root as i32) {
            bail!("NcclGroup: rank {}: {what}: {e:?}", self.rank)
        }
        let buf = self.wait(inner, buf, what)?;
        let v = (self.stream.clone_dtoh(&buf)).map_err(|e| cuda_error(what, e))?;
        Ok(v.first().copied().unwrap_or(0))
    }
}

impl ProcessGroup for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut inner = self.lock("all_gather")?;
        let n = self.world_size;
        let lens = self.gather_u64(
            &mut inner,
            bytes.len() as u64,
            "all_gather (the byte counts)",
        )?;
        let max = lens.iter().copied().max().unwrap_or(0) as usize;
        if max == 0 {
            return Ok(vec![Vec::new(); n]);
        }
        let what = "all_gather (the bytes)";
        let mut padded = bytes.to_vec();
        padded.resize(max, 0);
        let s = &self.stream;
        let send = s.clone_htod(&padded).map_err(|e| cuda_error(what, e))?;
        let mut recv = (s.alloc_zeros::<u8>(max * n)).map_err(|e| cuda_error(what, e))?;
        if let Err(e) = self.comm(&inner)?.all_gather(&send, &mut recv) {
            bail!("NcclGroup: rank {}: {what}: {e:?}", self.rank)
        }
        let (_send, recv) = self.wait(&mut inner, (send, recv), what)?;
        let all = s.clone_dtoh(&recv).map_err(|e| cuda_error(what, e))?;
        Ok((lens.iter().enumerate())
            .map(|(q, &len)| all[q * max..q * max + len as usize].to_vec())
            .collect())
    }

    fn all_reduce_sum(&self, values: ReduceBuffer<'_>) -> Result<()> {
        all_reduce_by_gather(self, values)
    }

    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.world_size {
            bail!(
                "NcclGroup: broadcast from root {root} in a world of {}",
                self.world_size
            )
        }
        let mut inner = self.lock("broadcast")?;
        let len = bytes.len() as u64;
        let len = self.broadcast_u64(&mut inner, len, root, "broadcast (the count)")? as usize;
        if len == 0 {
            bytes.clear();
            return Ok(());
        }
        let what = "broadcast (the bytes)";
        let s = &self.stream;
        let mut buf = if self.rank == root {
            s.clone_htod(&bytes[..]).map_err(|e| cuda_error(what, e))?
        } else {
            s.alloc_zeros::<u8>(len).map_err(|e| cuda_error(what, e))?
        };
        if let Err(e) = self.comm(&inner)?.broadcast_in_place(&mut buf, root as i32) {
            bail!("NcclGroup: rank {}: {what}: {e:?}", self.rank)
        }
        let buf = self.wait(&mut inner, buf, what)?;
        *bytes = s.clone_dtoh(&buf).map_err(|e| cuda_error(what, e))?;
        Ok(())
    }
}
