//! [`MpiGroup`]: the ranks of a process group as the processes of an MPI job
//! (`MPI_COMM_WORLD`), with the `mpi` feature.

use std::mem;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle::{bail, Result};
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::request::{Request, Scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::{Count, Rank, Threading};

use super::{all_reduce_by_gather, fmt_group, lock_usable, ProcessGroup, ReduceBuffer};

/// This process's rank of an MPI job: every process started by `mpirun -np N` holds one
/// `MpiGroup` over `MPI_COMM_WORLD`. A program started without a launcher is a world of
/// one rank (MPI's singleton start).
///
/// Make it once per process with [`MpiGroup::init`], which initialises MPI; MPI is
/// finalised when the group is dropped (drop it on the thread that made it, before the
/// program returns from `main`). MPI cannot be initialised twice in one process, so a
/// second `init` is an `Err`, also after the first group was dropped.
///
/// # Collectives
///
/// [`all_gather`](ProcessGroup::all_gather) exchanges the byte counts
/// (`MPI_Iallgather`), then the bytes (`MPI_Iallgatherv`);
/// [`broadcast`](ProcessGroup::broadcast) the root's count, then its bytes (`MPI_Ibcast`
/// twice); [`all_reduce_sum`](ProcessGroup::all_reduce_sum) is an all-gather summed in
/// rank order on every rank, so every rank gets the same bits (an `MPI_Allreduce` may
/// sum in a different order on different ranks). Every rank's byte count, and their sum,
/// must fit MPI's `int` counts (2 GiB); beyond, every rank gets an `Err`. Calls from
/// several threads are serialised (MPI is initialised with `MPI_THREAD_SERIALIZED`).
///
/// # When a rank does not come
///
/// The collectives are MPI's immediate (non-blocking) ones, polled until they complete
/// or the timeout passes ([`MpiGroup::timeout`], 10 minutes by default). On timeout the
/// collective returns an `Err` naming it and this rank; the other ranks still in the job
/// then fail by the same timeout, or sooner when `mpirun` ends the job. MPI cannot cancel
/// a collective, so the timed-out one is left pending, with its buffers leaked (MPI may
/// still write into them): the group is unusable from then on (every later collective is
/// an `Err`) and is dropped without finalising MPI, since `MPI_Finalize` would wait for
/// the pending collective. `mpirun` reports the process as having exited without
/// finalising and fails the job. Ranks whose calls disagree but complete (different
/// lengths or value types in a sum, different configs of a distributed loss) get an `Err`
/// on every rank from what they gathered, and the group stays usable. A rank that dies
/// ends the job through `mpirun`.
///
/// If MPI itself fails (it cannot start, a peer's connection breaks), MPI's default error
/// handler aborts the process and `mpirun` ends the job.
///
/// ```
/// use lovasz_candle::distributed::{MpiGroup, ProcessGroup, ReduceBuffer};
///
/// // Run as `mpirun -np 2 ./program`; without a launcher, a world of one.
/// let group = MpiGroup::init()?;
/// let mut v = [group.rank() as f64 + 1.0];
/// group.all_reduce_sum(ReduceBuffer::F64(&mut v))?;
/// let n = group.world_size() as f64;
/// assert_eq!(v[0], n * (n + 1.0) / 2.0);
/// # Ok::<(), candle::Error>(())
/// ```
pub struct MpiGroup {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    inner: Mutex<Inner>,
    /// Finalises MPI when dropped; taken and forgotten instead after a timeout.
    universe: Option<Universe>,
}

struct Inner {
    world: SimpleCommunicator,
    /// Why the group is unusable: a collective that timed out and is still pending.
    failed: Option<String>,
}

impl Inner {
    /// Why the group is unusable, if it is.
    fn why_failed(&self) -> Option<&String> {
        self.failed.as_ref()
    }
}

// SAFETY: the communicator is a handle to MPI's world communicator, valid on every thread.
// MPI is initialised with MPI_THREAD_SERIALIZED (`init` checks that it is provided) and
// every MPI call goes through `inner`'s mutex (the communicator lives inside it), or is
// made by `drop` with exclusive access.
unsafe impl Send for MpiGroup {}
// SAFETY: as for `Send`.
unsafe impl Sync for MpiGroup {}

impl std::fmt::Debug for MpiGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = (self.rank, self.world_size);
        fmt_group(f, "MpiGroup", who, self.timeout)
    }
}

impl MpiGroup {
    /// Initialises MPI and returns this process's rank of `MPI_COMM_WORLD`. An `Err` when
    /// MPI is (or was) already initialised in this process, or does not provide
    /// `MPI_THREAD_SERIALIZED`.
    pub fn init() -> Result<MpiGroup> {
        if mpi::environment::is_finalized() {
            bail!(
                "MpiGroup::init: MPI was finalised in this process and cannot be initialised again"
            )
        }
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized)
        else {
            bail!("MpiGroup::init: MPI is already initialised in this process (one MpiGroup per process)")
        };
        if threading < Threading::Serialized {
            // Dropping the universe finalises MPI.
            bail!("MpiGroup::init: the MPI library provides {threading:?} threading, MpiGroup needs Serialized")
        }
        let world = universe.world();
        let (rank, world_size) = (world.rank(), world.size());
        let (Ok(rank), Ok(world_size)) = (usize::try_from(rank), usize::try_from(world_size))
        else {
            bail!("MpiGroup::init: MPI gave rank {rank} of {world_size}")
        };
        Ok(MpiGroup {
            rank,
            world_size,
            timeout: Duration::from_secs(600),
            inner: Mutex::new(Inner {
                world,
                failed: None,
            }),
            universe: Some(universe),
        })
    }

    /// This group with collectives that fail after waiting `timeout` for the other ranks.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Ends every process of the job at once: `MPI_Abort` on `MPI_COMM_WORLD`, `code`
    /// being the exit status `mpirun` reports. For a rank that fails on its own (an error
    /// the other ranks cannot see), so that they do not wait for it in their next
    /// collective until the timeout, nor it for them in `MPI_Finalize` (which waits for
    /// every rank). Print the error first: nothing after this runs.
    pub fn abort(&self, code: i32) -> ! {
        let inner = match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        inner.world.abort(code)
    }

    /// The communicator, unless an earlier collective timed out.
    fn lock(&self, what: &str) -> Result<MutexGuard<'_, Inner>> {
        lock_usable(
            &self.inner,
            Inner::why_failed,
            ("MpiGroup", self.rank, what),
        )
    }

    /// The error of a collective that timed out: `buffers` (what MPI reads and writes)
    /// are leaked, since the collective stays pending, and the group is marked unusable.
    fn abandon<T>(
        &self,
        mut inner: MutexGuard<'_, Inner>,
        buffers: Box<T>,
        what: &str,
    ) -> candle::Error {
        mem::forget(buffers);
        let msg = format!(
            "rank {} waited more than {:?} for the other ranks in {what}",
            self.rank, self.timeout
        );
        inner.failed = Some(format!("an earlier collective failed ({msg})"));
        candle::Error::Msg(format!("MpiGroup: {msg}")).bt()
    }
}

/// Polls `request` until it completes (`true`) or `deadline` passes (`false`: the
/// request is then abandoned, still pending, and the caller must leak its buffers).
fn complete<'a, D: ?Sized, S: Scope<'a>>(
    mut request: Request<'a, D, S>,
    deadline: Instant,
) -> bool {
    let mut polls = 0u32;
    loop {
        match request.test() {
            Ok(_) => return true,
            Err(r) => request = r,
        }
        if Instant::now() >= deadline {
            // SAFETY: rsmpi asks that the raw request complete while its buffers live; it
            // never completes here (MPI can neither cancel nor free a pending collective),
            // and the caller leaks the buffers instead, so MPI never writes into freed
            // memory. Unregistering it keeps the scope from panicking at its end.
            let _ = unsafe { request.into_raw() };
            return false;
        }
        // MPI progresses the collective inside `test`: poll eagerly at first, then leave
        // the core to the other ranks (oversubscribed jobs) and the computation.
        polls += 1;
        if polls < 1000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// A byte count as an MPI count: the same check on every rank, from gathered counts.
fn count(len: u64, what: &str) -> Result<Count> {
    match Count::try_from(len) {
        Ok(c) => Ok(c),
        Err(_) => bail!("MpiGroup: {what} of {len} bytes exceeds MPI's int counts"),
    }
}

/// `bytes` in a buffer of at least one byte's capacity. An empty `Vec`'s pointer is 1,
/// which OpenMPI reads as `MPI_IN_PLACE`; an allocation gives empty buffers a real one.
fn allocated(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len().max(1));
    v.extend_from_slice(bytes);
    v
}

/// `len` zero bytes, allocated (see [`allocated`]).
fn zeros(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len.max(1));
    v.resize(len, 0);
    v
}

/// What an all-gather of bytes reads and writes, on the heap so that it can be leaked.
struct Gathered {
    send: Vec<u8>,
    recv: Vec<u8>,
    counts: Vec<Count>,
    displs: Vec<Count>,
}

impl ProcessGroup for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let inner = self.lock("all_gather")?;
        let deadline = Instant::now() + self.timeout;
        let mut lengths = Box::new((bytes.len() as u64, vec![0u64; self.world_size]));
        let done = {
            let (mine, all) = &mut *lengths;
            mpi::request::scope(|scope| {
                complete(
                    inner
                        .world
                        .immediate_all_gather_into(scope, &*mine, &mut all[..]),
                    deadline,
                )
            })
        };
        if !done {
            return Err(self.abandon(inner, lengths, "all_gather (the byte counts)"));
        }
        let counts = lengths
            .1
            .iter()
            .map(|&n| count(n, "all_gather: a rank's buffer"))
            .collect::<Result<Vec<Count>>>()?;
        count(lengths.1.iter().sum(), "all_gather: the gathered buffer")?;
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |at, &c| {
                let d = *at;
                *at += c;
                Some(d)
            })
            .collect();
        let total = lengths.1.iter().sum::<u64>() as usize;
        let mut g = Box::new(Gathered {
            send: allocated(bytes),
            recv: zeros(total),
            counts,
            displs,
        });
        let done = {
            let Gathered {
                send,
                recv,
                counts,
                displs,
            } = &mut *g;
            let mut partition = PartitionMut::new(&mut recv[..], &counts[..], &displs[..]);
            mpi::request::scope(|scope| {
                complete(
                    inner.world.immediate_all_gather_varcount_into(
                        scope,
                        &send[..],
                        &mut partition,
                    ),
                    deadline,
                )
            })
        };
        if !done {
            return Err(self.abandon(inner, g, "all_gather (the bytes)"));
        }
        drop(inner);
        Ok(g.counts
            .iter()
            .zip(&g.displs)
            .map(|(&c, &d)| g.recv[d as usize..(d + c) as usize].to_vec())
            .collect())
    }

    fn all_reduce_sum(&self, values: ReduceBuffer<'_>) -> Result<()> {
        all_reduce_by_gather(self, values)
    }

    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.world_size {
            bail!(
                "broadcast: root {root} is not a rank of a group of {}",
                self.world_size
            )
        }
        let inner = self.lock("broadcast")?;
        let deadline = Instant::now() + self.timeout;
        // `root < world_size`, which MPI gave as a Rank.
        let root_process = inner.world.process_at_rank(root as Rank);
        let mut len = Box::new(bytes.len() as u64);
        let done = mpi::request::scope(|scope| {
            complete(
                root_process.immediate_broadcast_into(scope, &mut *len),
                deadline,
            )
        });
        if !done {
            return Err(self.abandon(inner, len, "broadcast (the byte count)"));
        }
        count(*len, "broadcast: the root's buffer")?;
        let mut buf = Box::new(if self.rank == root {
            allocated(bytes)
        } else {
            zeros(*len as usize)
        });
        let done = mpi::request::scope(|scope| {
            complete(
                root_process.immediate_broadcast_into(scope, &mut buf[..]),
                deadline,
            )
        });
        if !done {
            return Err(self.abandon(inner, buf, "broadcast (the bytes)"));
        }
        *bytes = *buf;
        Ok(())
    }
}

impl Drop for MpiGroup {
    fn drop(&mut self) {
        let failed = match self.inner.get_mut() {
            Ok(inner) => inner.failed.is_some(),
            Err(_) => true,
        };
        if let Some(universe) = self.universe.take() {
            if failed {
                // MPI_Finalize would wait for the pending collective.
                mem::forget(universe);
            } else {
                drop(universe);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // MPI can be initialised once per process: every check that needs it is in this test.
    #[test]
    fn a_world_of_one_gathers_reduces_and_broadcasts_its_own_bytes() {
        let g = MpiGroup::init().unwrap().timeout(Duration::from_secs(60));
        let err = MpiGroup::init().unwrap_err().to_string();
        assert!(err.contains("already initialised"), "{err}");
        assert_eq!((g.rank(), g.world_size()), (0, 1));

        assert_eq!(g.all_gather(&[1, 2, 3]).unwrap(), [vec![1u8, 2, 3]]);
        assert_eq!(g.all_gather(&[]).unwrap(), [Vec::<u8>::new()]);

        let mut v = [1.5f64, -2.25];
        g.all_reduce_sum(ReduceBuffer::F64(&mut v)).unwrap();
        assert_eq!(v, [1.5, -2.25]);
        let mut u = [7u64];
        g.all_reduce_sum(ReduceBuffer::U64(&mut u)).unwrap();
        assert_eq!(u, [7]);

        let mut b = vec![9u8, 8, 7];
        g.broadcast(&mut b, 0).unwrap();
        assert_eq!(b, [9, 8, 7]);
        let err = g.broadcast(&mut b, 1).unwrap_err().to_string();
        assert!(err.contains("root 1"), "{err}");
        assert_eq!(b, [9, 8, 7]);
        let mut empty = Vec::new();
        g.broadcast(&mut empty, 0).unwrap();
        assert!(empty.is_empty());

        // A distributed loss on a world of one is the single-process loss.
        let dev = candle::Device::Cpu;
        let probas = candle::Tensor::new(
            &[[[0.6f32, 0.3], [0.1, 0.8]], [[0.4, 0.7], [0.9, 0.2]]],
            &dev,
        )
        .unwrap()
        .unsqueeze(0)
        .unwrap();
        let labels = candle::Tensor::new(&[[[0u32, 1], [1, 0]]], &dev).unwrap();
        let cfg = crate::LovaszSoftmaxConfig {
            per_image: false,
            ..Default::default()
        };
        let one = crate::lovasz_softmax(&probas, &labels, &cfg)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let dist = crate::distributed::lovasz_softmax(&probas, &labels, &cfg, &g)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(one, dist);

        drop(g);
        let err = MpiGroup::init().unwrap_err().to_string();
        assert!(err.contains("finalised"), "{err}");
    }
}
