//! The [`Communicator`] of a run started with `mpirun`, over the system's MPI (OpenMPI) through the `mpi`
//! crate.
//!
//! ```sh
//! mpirun -np 2 target/release/my-trainer   # each process creates one MpiCommunicator
//! ```
//!
//! Sums are not left to `MPI_Allreduce`, whose algorithm (and so the order of additions) MPI chooses by
//! message size and may give different ranks different roundings: rank 0 gathers each chunk, adds the
//! ranks' values in rank order and broadcasts the sums. For the data-parallel step's buffers (a copy of the
//! gradients) this costs one gather and one broadcast, what a reduce-and-broadcast costs.
//!
//! A rank that dies, or stops calling collectives, leaves the others blocked inside MPI. `mpirun` ends a
//! job whose process died; for a rank that stalls instead, a watchdog thread of every rank aborts the
//! whole run (`MPI_Abort`) once a collective has waited longer than the timeout, after printing which rank
//! waited in what ([`DistributedError::Stalled`]). A rank that panics aborts the run as the communicator
//! is dropped. A rank whose training returns an error must end the run itself with
//! [`MpiCommunicator::abort`]: finalising MPI instead would wait for the other ranks, which wait for it.

use std::ops::AddAssign;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};
use mpi::Threading;

use super::{Communicator, DistributedError};

/// The exit status of a run that a watchdog aborted.
pub const STALLED_EXIT_CODE: i32 = 75;

/// The exit status of a run that a rank's panic aborted.
pub const PANIC_EXIT_CODE: i32 = 101;

/// The values of one gather and broadcast: bounds the memory rank 0 needs to ranks × this.
const CHUNK: usize = 1 << 20;

/// How long the watchdog sleeps between looks at the collective in progress, at most.
const WATCHDOG_POLL: Duration = Duration::from_millis(100);

/// MPI's world communicator, with a watchdog over its collectives. MPI is finalised when it is dropped.
pub struct MpiCommunicator {
    rank: usize,
    size: usize,
    watchdog: Watchdog,
    /// Finalises MPI when dropped, after the watchdog has stopped (fields drop in declaration order).
    _universe: Universe,
}

impl std::fmt::Debug for MpiCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCommunicator")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("timeout", &self.watchdog.state.timeout)
            .finish_non_exhaustive()
    }
}

impl MpiCommunicator {
    /// Initialises MPI for this process (once per process) and starts the watchdog, which aborts the run
    /// when one collective waits longer than `timeout`. The timeout must exceed the longest time one rank
    /// can work while another waits for it: rank 0 writing a checkpoint while the others start the next
    /// epoch.
    pub fn initialize(timeout: Duration) -> Result<Self, DistributedError> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| {
                DistributedError::Initialisation(
                    "MPI is already initialised in this process".into(),
                )
            })?;
        let world = universe.world();
        let rank = usize::try_from(world.rank()).map_err(|_| {
            DistributedError::Initialisation(format!("negative rank {}", world.rank()))
        })?;
        let size = usize::try_from(world.size()).map_err(|_| {
            DistributedError::Initialisation(format!("negative size {}", world.size()))
        })?;
        let watchdog = Watchdog::start(rank, size, timeout, threading == Threading::Multiple)?;
        Ok(Self {
            rank,
            size,
            watchdog,
            _universe: universe,
        })
    }

    /// Prints `message` as this rank's error and ends every rank of the run (`MPI_Abort`) with `code`: what a
    /// rank whose training failed does, so that the others do not wait for it until the timeout.
    pub fn abort(&self, message: &str, code: i32) -> ! {
        eprintln!("rank {} of {}: {message}", self.rank, self.size);
        SimpleCommunicator::world().abort(code)
    }

    /// Sums `values` over the ranks in rank order (see the module's documentation).
    fn all_reduce_sum<T>(&self, operation: &str, values: &mut [T]) -> Result<(), DistributedError>
    where
        T: Equivalence + Copy + Default + AddAssign,
    {
        if self.size == 1 {
            return Ok(());
        }
        let _watch = self.watchdog.watch(operation);
        let world = SimpleCommunicator::world();
        let root = world.process_at_rank(0);
        let mut gathered = Vec::new();
        for chunk in values.chunks_mut(CHUNK) {
            let len = chunk.len();
            if self.rank == 0 {
                gathered.clear();
                gathered.resize(len * self.size, T::default());
                root.gather_into_root(&*chunk, &mut gathered[..]);
                for (index, sum) in chunk.iter_mut().enumerate() {
                    let mut total = gathered[index];
                    for rank in 1..self.size {
                        total += gathered[rank * len + index];
                    }
                    *sum = total;
                }
            } else {
                root.gather_into(&*chunk);
            }
            root.broadcast_into(chunk);
        }
        Ok(())
    }

    /// Every rank's `values` on rank 0, in rank order.
    fn gather<T>(&self, operation: &str, values: &[T]) -> Result<Option<Vec<T>>, DistributedError>
    where
        T: Equivalence + Copy + Default,
    {
        if self.size == 1 {
            return Ok(Some(values.to_vec()));
        }
        let _watch = self.watchdog.watch(operation);
        let world = SimpleCommunicator::world();
        let root = world.process_at_rank(0);
        let mut all = (self.rank == 0).then(|| vec![T::default(); values.len() * self.size]);
        let mut gathered = Vec::new();
        for (index, chunk) in values.chunks(CHUNK).enumerate() {
            match &mut all {
                Some(all) => {
                    gathered.clear();
                    gathered.resize(chunk.len() * self.size, T::default());
                    root.gather_into_root(chunk, &mut gathered[..]);
                    for (rank, part) in gathered.chunks_exact(chunk.len()).enumerate() {
                        let start = rank * values.len() + index * CHUNK;
                        all[start..start + chunk.len()].copy_from_slice(part);
                    }
                }
                None => root.gather_into(chunk),
            }
        }
        Ok(all)
    }

    fn broadcast<T: Equivalence>(
        &self,
        operation: &str,
        values: &mut [T],
    ) -> Result<(), DistributedError> {
        if self.size == 1 {
            return Ok(());
        }
        let _watch = self.watchdog.watch(operation);
        let world = SimpleCommunicator::world();
        let root = world.process_at_rank(0);
        for chunk in values.chunks_mut(CHUNK) {
            root.broadcast_into(chunk);
        }
        Ok(())
    }
}

impl Drop for MpiCommunicator {
    /// Ends every rank when this one is unwinding from a panic: the others would otherwise wait in their
    /// next collective until the timeout.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort(
                "a panic ended this rank, and with it the run",
                PANIC_EXIT_CODE,
            );
        }
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum_f32(
        &self,
        operation: &str,
        values: &mut [f32],
    ) -> Result<(), DistributedError> {
        self.all_reduce_sum(operation, values)
    }

    fn all_reduce_sum_f64(
        &self,
        operation: &str,
        values: &mut [f64],
    ) -> Result<(), DistributedError> {
        self.all_reduce_sum(operation, values)
    }

    fn gather_f32(
        &self,
        operation: &str,
        values: &[f32],
    ) -> Result<Option<Vec<f32>>, DistributedError> {
        self.gather(operation, values)
    }

    fn broadcast_f32(&self, operation: &str, values: &mut [f32]) -> Result<(), DistributedError> {
        self.broadcast(operation, values)
    }

    fn broadcast_u64(&self, operation: &str, values: &mut [u64]) -> Result<(), DistributedError> {
        self.broadcast(operation, values)
    }

    fn barrier(&self, operation: &str) -> Result<(), DistributedError> {
        if self.size > 1 {
            let _watch = self.watchdog.watch(operation);
            SimpleCommunicator::world().barrier();
        }
        Ok(())
    }
}

/// What the watchdog thread and the collectives share.
struct WatchState {
    rank: usize,
    ranks: usize,
    timeout: Duration,
    /// The collective in progress and when it started.
    pending: Mutex<Option<(String, Instant)>>,
    stop: AtomicBool,
}

/// A thread that aborts the run when a collective waits longer than the timeout.
struct Watchdog {
    state: Arc<WatchState>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread. Without MPI's full thread support (`MPI_THREAD_MULTIPLE`) it cannot call
    /// `MPI_Abort` beside a blocked collective, and aborts its own process instead, which `mpirun` turns
    /// into the end of the job.
    fn start(
        rank: usize,
        ranks: usize,
        timeout: Duration,
        may_call_mpi: bool,
    ) -> Result<Self, DistributedError> {
        let state = Arc::new(WatchState {
            rank,
            ranks,
            timeout,
            pending: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let watched = Arc::clone(&state);
        let poll = WATCHDOG_POLL.min(timeout / 4).max(Duration::from_millis(1));
        let thread = std::thread::Builder::new()
            .name("mpi-watchdog".into())
            .spawn(move || watch_until_stopped(&watched, poll, may_call_mpi))
            .map_err(|e| {
                DistributedError::Initialisation(format!("starting the watchdog thread: {e}"))
            })?;
        Ok(Self {
            state,
            thread: Some(thread),
        })
    }

    /// Marks `operation` as in progress until the returned guard is dropped.
    fn watch(&self, operation: &str) -> WatchGuard<'_> {
        *lock(&self.state.pending) = Some((operation.to_owned(), Instant::now()));
        WatchGuard { state: &self.state }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The thread only sleeps and reads; it cannot panic but through a poisoned lock, which
            // `lock` tolerates.
            let _ = thread.join();
        }
    }
}

struct WatchGuard<'a> {
    state: &'a WatchState,
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.state.pending) = None;
    }
}

/// The lock, also when a panicking thread held it: the state is one plain value, never half-written.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn watch_until_stopped(state: &WatchState, poll: Duration, may_call_mpi: bool) {
    while !state.stop.load(Ordering::Relaxed) {
        std::thread::sleep(poll);
        let stalled = lock(&state.pending)
            .as_ref()
            .filter(|(_, since)| since.elapsed() >= state.timeout)
            .map(|(operation, since)| DistributedError::Stalled {
                rank: state.rank,
                ranks: state.ranks,
                operation: operation.clone(),
                waited: since.elapsed(),
                timeout: state.timeout,
            });
        if let Some(stalled) = stalled {
            eprintln!("error: {stalled}");
            if may_call_mpi {
                SimpleCommunicator::world().abort(STALLED_EXIT_CODE);
            }
            std::process::abort();
        }
    }
}
