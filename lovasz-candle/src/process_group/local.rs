//! [`LocalGroup`]: the ranks of a process group as threads of one process.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle::{bail, Result};

use super::{all_reduce_by_gather, ProcessGroup, ReduceBuffer};

/// One rank of a group of threads in one process: data-parallel training over several
/// devices of one machine, or tests of the distributed losses without a launcher.
///
/// [`LocalGroup::new`] makes the handles of all ranks; move one into each thread. Every
/// collective waits for all ranks. When a rank's handle is dropped (its thread finished
/// or panicked), a collective that still waits for it fails on every other rank instead
/// of hanging, as does one that waits longer than the timeout ([`LocalGroup::timeout`],
/// 10 minutes by default).
///
/// ```
/// use lovasz_candle::distributed::{LocalGroup, ProcessGroup, ReduceBuffer};
///
/// let handles = LocalGroup::new(2).unwrap();
/// let sums: Vec<f64> = std::thread::scope(|s| {
///     let threads: Vec<_> = handles
///         .into_iter()
///         .map(|g| {
///             s.spawn(move || {
///                 let mut v = [g.rank() as f64 + 1.0];
///                 g.all_reduce_sum(ReduceBuffer::F64(&mut v)).unwrap();
///                 v[0]
///             })
///         })
///         .collect();
///     threads.into_iter().map(|t| t.join().unwrap()).collect()
/// });
/// assert_eq!(sums, [3.0, 3.0]);
/// ```
#[derive(Debug)]
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
    timeout: Duration,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The round being filled.
    round: u64,
    deposited: Vec<Option<Vec<u8>>>,
    filled: usize,
    /// The last completed round and every rank's bytes, until every rank has read it.
    result: Option<(u64, Arc<Vec<Vec<u8>>>)>,
    readers: usize,
    /// The first rank whose handle was dropped.
    left: Option<usize>,
}

impl LocalGroup {
    /// The handles of a group of `world_size` ranks, in rank order.
    pub fn new(world_size: usize) -> Result<Vec<LocalGroup>> {
        if world_size == 0 {
            bail!("LocalGroup: a group needs at least one rank")
        }
        let shared = Arc::new(Shared {
            world: world_size,
            state: Mutex::new(State {
                deposited: vec![None; world_size],
                ..Default::default()
            }),
            changed: Condvar::new(),
        });
        Ok((0..world_size)
            .map(|rank| LocalGroup {
                rank,
                shared: Arc::clone(&shared),
                timeout: Duration::from_secs(600),
            })
            .collect())
    }

    /// This handle with collectives that fail after waiting `timeout` for the other ranks.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        match self.shared.state.lock() {
            Ok(g) => Ok(g),
            Err(_) => bail!("LocalGroup: the group's state was poisoned by a panic"),
        }
    }

    /// Waits on the condition variable until `done` says so, failing when a rank has left
    /// (and `done` is still false) or the timeout passes.
    fn wait_until<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        deadline: Instant,
        what: &str,
        mut done: impl FnMut(&mut State) -> bool,
    ) -> Result<MutexGuard<'a, State>> {
        loop {
            if done(&mut state) {
                return Ok(state);
            }
            if let Some(left) = state.left {
                bail!(
                    "LocalGroup: rank {left} left the group while rank {} waited in {what}",
                    self.rank
                )
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "LocalGroup: rank {} waited more than {:?} for the other ranks in {what}",
                    self.rank,
                    self.timeout
                )
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((g, _)) => g,
                Err(_) => bail!("LocalGroup: the group's state was poisoned by a panic"),
            };
        }
    }
}

impl ProcessGroup for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + self.timeout;
        let world = self.shared.world;
        // The previous round must have been read by every rank before this one is filled.
        let state = self.lock()?;
        let mut state = self.wait_until(state, deadline, "all_gather", |s| s.result.is_none())?;
        let round = state.round;
        state.deposited[self.rank] = Some(bytes.to_vec());
        state.filled += 1;
        if state.filled == world {
            let parts: Vec<Vec<u8>> = state
                .deposited
                .iter_mut()
                .map(|d| d.take().unwrap_or_default())
                .collect();
            state.result = Some((round, Arc::new(parts)));
            state.filled = 0;
            state.readers = 0;
            state.round += 1;
            self.shared.changed.notify_all();
        }
        let mut parts = None;
        let state = self.wait_until(state, deadline, "all_gather", |s| {
            match &s.result {
                Some((r, p)) if *r == round => parts = Some(Arc::clone(p)),
                _ => return false,
            }
            s.readers += 1;
            if s.readers == world {
                s.result = None;
            }
            true
        })?;
        if state.result.is_none() {
            self.shared.changed.notify_all();
        }
        drop(state);
        match parts {
            Some(p) => Ok(p.as_ref().clone()),
            None => bail!("LocalGroup: all_gather ended without a result (internal error)"),
        }
    }

    fn all_reduce_sum(&self, values: ReduceBuffer<'_>) -> Result<()> {
        all_reduce_by_gather(self, values)
    }

    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.shared.world {
            bail!(
                "broadcast: root {root} is not a rank of a group of {}",
                self.shared.world
            )
        }
        let mut parts = self.all_gather(bytes)?;
        *bytes = std::mem::take(&mut parts[root]);
        Ok(())
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.left.get_or_insert(self.rank);
        }
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<R: Send>(
        world: usize,
        f: impl Fn(LocalGroup) -> R + Sync,
    ) -> Vec<std::thread::Result<R>> {
        let handles = LocalGroup::new(world).unwrap();
        std::thread::scope(|s| {
            let threads: Vec<_> = handles
                .into_iter()
                .map(|g| {
                    let f = &f;
                    s.spawn(move || f(g))
                })
                .collect();
            threads.into_iter().map(|t| t.join()).collect()
        })
    }

    #[test]
    fn collectives_give_every_rank_the_same_result() {
        let out = run(3, |g| {
            let mut all = Vec::new();
            for round in 0..50u8 {
                let parts = g.all_gather(&vec![g.rank() as u8; g.rank() + round as usize])?;
                all.push(parts.iter().map(Vec::len).collect::<Vec<_>>());
                let mut v = [g.rank() as u64, round as u64];
                g.all_reduce_sum(ReduceBuffer::U64(&mut v))?;
                assert_eq!(v, [3, 3 * round as u64]);
                let mut b = vec![g.rank() as u8];
                g.broadcast(&mut b, 2)?;
                assert_eq!(b, [2]);
            }
            Ok::<_, candle::Error>(all)
        });
        let out: Vec<_> = out.into_iter().map(|r| r.unwrap().unwrap()).collect();
        assert_eq!(out[0], out[1]);
        assert_eq!(out[0][7], [7, 8, 9]);
    }

    #[test]
    fn a_rank_that_leaves_or_disagrees_is_an_error_not_a_hang() {
        // Rank 1 returns before the second collective: ranks 0 and 2 fail.
        let out = run(3, |g| {
            g.all_gather(&[1])?;
            if g.rank() == 1 {
                return Ok(());
            }
            g.all_gather(&[2]).map(|_| ())
        });
        let errs: Vec<String> = out
            .into_iter()
            .filter_map(|r| r.unwrap().err().map(|e| e.to_string()))
            .collect();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().all(|e| e.contains("rank 1 left")), "{errs:?}");
        // Different lengths in a sum: every rank fails.
        let out = run(2, |g| {
            let mut v = vec![0f64; 1 + g.rank()];
            g.all_reduce_sum(ReduceBuffer::F64(&mut v))
        });
        assert!(out.into_iter().all(|r| r.unwrap().is_err()));
        // A panicking rank: the other fails.
        let out = run(2, |g| {
            if g.rank() == 0 {
                panic!("rank 0 dies");
            }
            g.all_gather(&[0]).map(|_| ())
        });
        assert!(out[0].is_err());
        assert!(out[1].as_ref().unwrap().is_err());
        // A rank that never comes: the timeout.
        let handles = LocalGroup::new(2).unwrap();
        let g = handles.into_iter().next().unwrap();
        let g = g.timeout(Duration::from_millis(50));
        let err = g.all_gather(&[0]).unwrap_err().to_string();
        assert!(err.contains("left") || err.contains("waited"), "{err}");
    }
}
