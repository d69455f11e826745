//! The ranks of `cargo xtask reproduce` started under `mpirun` (xtask built with the feature `mpi`): every
//! run trains data parallel, each rank on its shard of every batch, and rank 0 alone writes what is
//! written once (run files, reports). Outside `mpirun`, one process is the only rank.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use swa_models::distributed::{Communicator, SingleProcess};

/// The environment variables by which OpenMPI's and MPICH's launchers give a process its job's size.
const LAUNCHER_SIZE_VARIABLES: [&str; 2] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"];

/// How many processes the launcher started, when this process was started by one.
fn launched_ranks() -> Option<usize> {
    LAUNCHER_SIZE_VARIABLES
        .iter()
        .find_map(|name| std::env::var(name).ok()?.parse().ok())
}

/// This process's place among the ranks.
pub struct Ranks {
    communicator: Arc<dyn Communicator>,
    #[cfg(feature = "mpi")]
    mpi: Option<Arc<swa_models::distributed::mpi::MpiCommunicator>>,
}

impl Ranks {
    /// Joins the MPI job this process was started in, if any; collectives that wait longer than
    /// `timeout` abort the run.
    #[cfg(feature = "mpi")]
    pub fn join(timeout: Duration) -> Result<Self> {
        if launched_ranks().is_none() {
            return Ok(Self::alone());
        }
        let mpi = Arc::new(swa_models::distributed::mpi::MpiCommunicator::initialize(
            timeout,
        )?);
        Ok(Self {
            communicator: Arc::clone(&mpi) as Arc<dyn Communicator>,
            mpi: Some(mpi),
        })
    }

    /// One process; refused under a launcher that started several, which would all write the same files.
    #[cfg(not(feature = "mpi"))]
    pub fn join(_timeout: Duration) -> Result<Self> {
        if let Some(ranks) = launched_ranks().filter(|&ranks| ranks > 1) {
            anyhow::bail!(
                "started as one of {ranks} MPI processes, but this xtask was built without MPI, so each \
                 would train alone into the same files: cargo build --release -p xtask --features mpi"
            );
        }
        Ok(Self::alone())
    }

    fn alone() -> Self {
        Self {
            communicator: Arc::new(SingleProcess),
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// The communicator the trainers share.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.communicator
    }

    /// Whether this process writes what is written once: rank 0.
    pub fn writes(&self) -> bool {
        self.communicator.rank() == 0
    }

    /// `outcome`, after ending every rank of the job when it is an error: the others would wait for this
    /// rank in their next collective until the timeout.
    pub fn end_all_on_error<T>(&self, outcome: Result<T>) -> Result<T> {
        #[cfg(feature = "mpi")]
        if let (Err(error), Some(mpi)) = (&outcome, &self.mpi) {
            if self.communicator.size() > 1 {
                mpi.abort(&format!("{error:#}"), 1);
            }
        }
        outcome
    }
}
