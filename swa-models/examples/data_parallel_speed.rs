//! Measures data-parallel training throughput: PreResNet-20 at a global batch of 128 on random CIFAR-sized
//! data, split over the ranks `mpirun` starts, each step the trainer's own (`sgd_step_synchronized` with
//! `DataParallel`: the loss and gradient all-reduce included).
//!
//! ```sh
//! cargo build --release -p swa-models --features mpi --example data_parallel_speed
//! mpirun -np 2 target/release/examples/data_parallel_speed 20 1   # 2 ranks × 1 thread
//! mpirun -np 1 target/release/examples/data_parallel_speed 20 2   # 1 process × 2 threads
//! mpirun -np 2 target/release/examples/data_parallel_speed 20 1 sync-bn   # synchronised BatchNorm
//! ```
//!
//! The arguments are the timed steps (after two warm-up steps), each rank's threads and, optionally,
//! `sync-bn` for synchronised BatchNorm; rank 0 prints the images of all ranks per second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{rngs::StdRng, Rng, SeedableRng};
use swa_core::CpuBackend;
use swa_models::distributed::mpi::MpiCommunicator;
use swa_models::distributed::{shard, BatchNormMode, Communicator, DataParallel};
use swa_models::evaluate::MetricsAccumulator;
use swa_models::optim::{Sgd, SgdConfig};
use swa_models::{sgd_step_synchronized, Architecture, HostBatch};

// The training binaries' allocator and setting (`swa_core::allocator`); measuring with another would time
// page faults.
#[global_allocator]
static GLOBAL: swa_core::allocator::MiMalloc = swa_core::allocator::MiMalloc;

const GLOBAL_BATCH: usize = 128;
const CLASSES: usize = 10;
const WARM_UP_STEPS: usize = 2;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    swa_core::allocator::keep_freed_memory();
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let threads: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let batch_norm = match args.next().as_deref() {
        None => BatchNormMode::PerRank,
        Some("sync-bn") => BatchNormMode::Synchronized,
        Some(other) => return Err(format!("unknown option {other:?}; expected sync-bn").into()),
    };

    let communicator = Arc::new(MpiCommunicator::initialize(Duration::from_secs(300))?);
    let backend = CpuBackend::with_threads(threads);
    let mut model = Architecture::PreResNet { depth: 20 }.build(&backend, CLASSES, 0)?;
    let mut optimiser = Sgd::new(SgdConfig::momentum(3e-4));

    let mut rng = StdRng::seed_from_u64(1);
    let global = HostBatch {
        images: (0..GLOBAL_BATCH * 3 * 32 * 32)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect(),
        shape: [GLOBAL_BATCH, 3, 32, 32],
        labels: (0..GLOBAL_BATCH)
            .map(|_| rng.random_range(0..CLASSES as u32))
            .collect(),
    };
    let batch = shard(&global, communicator.rank(), communicator.size())?;
    let mut sync = DataParallel::new(communicator.clone()).with_batch_norm(batch_norm);
    let mut metrics = MetricsAccumulator::default();
    let mut started = Instant::now();
    let mut last_loss = f32::NAN;
    for step in 0..WARM_UP_STEPS + steps {
        if step == WARM_UP_STEPS {
            communicator.barrier("the start of the timed steps")?;
            started = Instant::now();
        }
        last_loss = sgd_step_synchronized(
            &backend,
            model.as_mut(),
            &mut optimiser,
            &batch,
            0.05,
            step as u64,
            &mut metrics,
            &mut sync,
        )?;
    }
    communicator.barrier("the end of the timed steps")?;
    let elapsed = started.elapsed().as_secs_f64();
    if communicator.rank() == 0 {
        println!(
            "preresnet20 global batch {GLOBAL_BATCH}, {} ranks × {threads} threads, BatchNorm \
             {batch_norm:?}, {steps} steps: {:.1} img/s ({:.1} ms/step); final loss {last_loss:.4}",
            communicator.size(),
            (steps * GLOBAL_BATCH) as f64 / elapsed,
            elapsed * 1e3 / steps.max(1) as f64,
        );
    }
    Ok(())
}
