//! `cargo xtask reproduce --method swap`: SWAP (Gupta et al., 2020) over the ranks `mpirun` starts, with
//! xtask built with the feature `mpi`:
//!
//! ```sh
//! cargo build --release -p xtask --features mpi
//! mpirun -np 2 target/release/xtask reproduce cifar10 --method swap --preset quick
//! ```
//!
//! Each seed's SWAP run lies in `OUT/<data>/<model>/seed-<s>/swap/`: the synchronous phase's checkpoints
//! (global batches of ranks × the recipe's batch size, each rank a shard), each rank's independent phase,
//! and from rank 0 the averaged weights (`swap.safetensors`) and their test metrics (`swap.json`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use swa_data::Dataset;

use super::presets::Recipe;
use super::ranks::Ranks;
use super::ReproduceArgs;

/// Trains SWAP for every recipe and seed over the ranks of this MPI job.
#[cfg(feature = "mpi")]
pub fn run(
    args: &ReproduceArgs,
    ranks: &Ranks,
    recipes: &[Recipe],
    train: &Arc<Dataset>,
    test: &Arc<Dataset>,
    classes: usize,
    data_dir: &Path,
) -> Result<()> {
    let communicator = ranks.communicator();
    if communicator.size() < 2 {
        anyhow::bail!(
            "--method swap averages the weights of ranks that trained apart: start it with \
             mpirun -np N (N ≥ 2)"
        );
    }
    match super::choose_device(args.device, args.threads)? {
        super::Device::Cpu(backend) => swap_ranks::run_all(
            &backend,
            communicator,
            args,
            recipes,
            train,
            test,
            classes,
            data_dir,
        ),
        super::Device::Gpu(backend) => swap_ranks::run_all(
            &backend,
            communicator,
            args,
            recipes,
            train,
            test,
            classes,
            data_dir,
        ),
    }
}

/// Without MPI there are no ranks to average over.
#[cfg(not(feature = "mpi"))]
pub fn run(
    _args: &ReproduceArgs,
    _ranks: &Ranks,
    _recipes: &[Recipe],
    _train: &Arc<Dataset>,
    _test: &Arc<Dataset>,
    _classes: usize,
    _data_dir: &Path,
) -> Result<()> {
    anyhow::bail!(
        "--method swap trains over the ranks of an MPI job, and this xtask was built without MPI: \
         cargo build --release -p xtask --features mpi, then \
         mpirun -np 2 target/release/xtask reproduce ... --method swap"
    )
}

#[cfg(feature = "mpi")]
mod swap_ranks {
    use super::*;

    use anyhow::Context;
    use swa_core::backend::Backend;
    use swa_models::distributed::{rank_seed, Communicator, ShardedBatches};
    use swa_models::protocol::{run_swap, SwapConfig, SwapData, SwapOutcome};
    use swa_models::train::{save_weights, Silent, TrainObserver};
    use swa_models::Module;

    use crate::reproduce::source::CifarSource;
    use crate::reproduce::Progress;

    /// The file of a seed's SWAP folder with the averaged weights, BatchNorm recomputed.
    const SWAP_WEIGHTS_FILE: &str = "swap.safetensors";

    #[allow(clippy::too_many_arguments)]
    pub fn run_all<B: Backend>(
        backend: &B,
        communicator: &Arc<dyn Communicator>,
        args: &ReproduceArgs,
        recipes: &[Recipe],
        train: &Arc<Dataset>,
        test: &Arc<Dataset>,
        classes: usize,
        data_dir: &Path,
    ) -> Result<()> {
        let (rank, ranks) = (communicator.rank(), communicator.size());
        for recipe in recipes {
            for seed in 1..=args.seeds {
                let label = format!("{} seed {seed} swap", recipe.architecture);
                let dir = data_dir
                    .join(recipe.architecture.to_string())
                    .join(format!("seed-{seed}"))
                    .join("swap");
                // Global batches of ranks × the recipe's batch, each rank's shard the recipe's batch.
                let global = Recipe {
                    batch_size: recipe.batch_size * ranks,
                    ..recipe.clone()
                };
                let synchronous = ShardedBatches::new(
                    CifarSource::new(train, test, &global, seed)?,
                    communicator.as_ref(),
                );
                let independent = CifarSource::new(train, test, recipe, rank_seed(seed, rank))?;
                let config = SwapConfig {
                    batch_norm: args.batch_norm_mode(),
                    ..recipe.swap_config(seed)?
                };
                if rank == 0 {
                    println!(
                        "{label} over {ranks} ranks: {} synchronous epochs at a global batch of {}, \
                         then {} independent epochs at lr {}",
                        config.synchronous.epochs,
                        global.batch_size,
                        config.independent.epochs,
                        recipe.swa_lr
                    );
                }
                let build = || -> Result<Box<dyn Module<B>>, swa_models::TrainError> {
                    Ok(recipe.architecture.build(backend, classes, seed)?)
                };
                let steps = synchronous.inner().steps_per_epoch();
                let mut progress;
                let mut silent = Silent;
                let observer: &mut dyn TrainObserver = if rank == 0 {
                    let epochs = config.synchronous.epochs + config.independent.epochs;
                    progress = Progress::new(&label, epochs, 0, steps);
                    &mut progress
                } else {
                    &mut silent
                };
                let mut model = build()?;
                let outcome = run_swap(
                    Arc::clone(communicator),
                    backend,
                    &config,
                    &build,
                    SwapData {
                        synchronous: &synchronous,
                        independent: &independent,
                    },
                    &dir,
                    observer,
                    model.as_mut(),
                )
                .with_context(|| format!("{label} (checkpoints in {})", dir.display()))?;
                if rank == 0 {
                    save_weights(backend, model.as_ref(), &dir.join(SWAP_WEIGHTS_FILE))?;
                    write_outcome(&dir, ranks, &outcome)?;
                    println!(
                        "{label}: test accuracy {:.2}% after the synchronous phase, {:.2}% for rank \
                         0 alone, {:.2}% for the average of {ranks} ranks",
                        outcome.synchronous_test.accuracy,
                        outcome.independent_test.accuracy,
                        outcome.swap_test.accuracy
                    );
                }
            }
        }
        Ok(())
    }

    fn write_outcome(dir: &Path, ranks: usize, outcome: &SwapOutcome) -> Result<()> {
        let json = serde_json::json!({
            "ranks": ranks,
            "synchronous_test": outcome.synchronous_test,
            "rank0_independent_test": outcome.independent_test,
            "swap_test": outcome.swap_test,
        });
        swa_models::checkpoint::write_atomically(
            &dir.join("swap.json"),
            &serde_json::to_vec_pretty(&json)?,
        )?;
        Ok(())
    }
}
