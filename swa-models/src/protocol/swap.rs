//! SWAP, Stochastic Weight Averaging in Parallel (Gupta, Serrano and DeCoste, ICLR 2020), over the ranks
//! of a [`Communicator`]: SWA's average over time replaced by an average over ranks.
//!
//! 1. **Synchronous phase**: data-parallel training on the global batch (each rank a shard), with the SWA
//!    run's schedule until `swa_start`, where it reaches the SWA learning rate.
//! 2. **Independent phase**: every rank trains alone from those weights, on the whole training set in an
//!    order of its own, at the constant SWA learning rate until the SWA run's last epoch.
//! 3. **Averaging**: the ranks' final weights are averaged ([`merge_averages_across_ranks`]) and BatchNorm
//!    recomputed over all ranks' shards ([`update_bn_across_ranks`]); every rank holds the result.
//!
//! Each phase checkpoints every epoch and resumes: the synchronous one in `<dir>/synchronous` (rank 0
//! writes), the independent one in `<dir>/independent-rank<r>` (each rank its own).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use swa_core::averaging::{BufferPolicy, WeightAverage, WeightAveraging};
use swa_core::backend::Backend;
use swa_core::schedule::Schedule;

use crate::batch::{until_error, BatchSource};
use crate::checkpoint::StateDict;
use crate::distributed::{
    evaluate_across_ranks, merge_averages_across_ranks, update_bn_across_ranks, BatchNormMode,
    Communicator, SingleProcess,
};
use crate::error::TrainError;
use crate::evaluate::Metrics;
use crate::module::Module;
use crate::train::{RunConfig, TrainObserver, Trainer};

use super::{schedule_error, Recipe, RunKind};

/// The two training phases of SWAP for a recipe.
#[derive(Clone, Debug, PartialEq)]
pub struct SwapConfig {
    /// The synchronous phase: the SWA run's schedule and settings until `swa_start`, without snapshots.
    pub synchronous: RunConfig,
    /// The independent phase: the SWA learning rate, constant, from `swa_start` to the SWA run's end.
    pub independent: RunConfig,
    /// How BatchNorm normalises the synchronous phase's batches (per rank by default).
    pub batch_norm: BatchNormMode,
}

impl Recipe {
    /// SWAP's phases for this recipe, with `seed` for dropout masks (each rank's independent phase mixes
    /// in its rank).
    pub fn swap_config(&self, seed: u64) -> Result<SwapConfig, TrainError> {
        let swa = self.run_config(RunKind::Swa, seed)?;
        let synchronous = RunConfig {
            epochs: self.swa_start,
            snapshots: None,
            swa_eval_epochs: Vec::new(),
            swa_eval_every: 0,
            swag: None,
            ..swa.clone()
        };
        let independent = RunConfig {
            epochs: self.swa_epochs - self.swa_start,
            schedule: Schedule::constant(self.swa_lr).map_err(schedule_error("SWAP schedule"))?,
            ..synchronous.clone()
        };
        Ok(SwapConfig {
            synchronous,
            independent,
            batch_norm: BatchNormMode::PerRank,
        })
    }
}

/// What a SWAP run reached, the same on every rank.
#[derive(Clone, Debug, PartialEq)]
pub struct SwapOutcome {
    /// Test metrics of the synchronous phase's final weights.
    pub synchronous_test: Metrics,
    /// Test metrics of this rank's final weights after the independent phase.
    pub independent_test: Metrics,
    /// Test metrics of the averaged weights, BatchNorm recomputed.
    pub swap_test: Metrics,
}

/// The data of each phase, for this rank.
pub struct SwapData<'a> {
    /// The synchronous phase's global batches, sharded for this rank
    /// ([`crate::distributed::ShardedBatches`]); its training batches are also those BatchNorm is
    /// recomputed on.
    pub synchronous: &'a dyn BatchSource,
    /// This rank's independent phase: the training set in an order of its own.
    pub independent: &'a dyn BatchSource,
}

/// Runs SWAP's three phases (see the module's documentation) with `config`, networks from `build`
/// (identical on every rank, as every rank's weights are set to rank 0's), checkpoints under `dir`, and
/// returns the test metrics; `model` receives the averaged weights with their BatchNorm statistics.
#[allow(clippy::too_many_arguments)]
pub fn run_swap<B: Backend>(
    communicator: Arc<dyn Communicator>,
    backend: &B,
    config: &SwapConfig,
    build: &dyn Fn() -> Result<Box<dyn Module<B>>, TrainError>,
    data: SwapData<'_>,
    dir: &Path,
    observer: &mut dyn TrainObserver,
    model: &mut dyn Module<B>,
) -> Result<SwapOutcome, TrainError> {
    let rank = communicator.rank();
    let mut synchronous = Trainer::new(
        backend.clone(),
        config.synchronous.clone(),
        build()?,
        build()?,
    )?;
    synchronous.with_communicator(Arc::clone(&communicator))?;
    synchronous.with_batch_norm_mode(config.batch_norm);
    synchronous.with_checkpoints(dir.join("synchronous"))?;
    synchronous.run(data.synchronous, observer)?;
    let synchronous_test = test_metrics(
        communicator.as_ref(),
        backend,
        synchronous.model(),
        data.synchronous,
    )?;

    let mut independent = Trainer::new(
        backend.clone(),
        RunConfig {
            seed: crate::distributed::rank_seed(config.independent.seed, rank),
            ..config.independent.clone()
        },
        build()?,
        build()?,
    )?;
    StateDict::from_module(backend, synchronous.model())?
        .copy_into_module(backend, independent.model())?;
    // A checkpoint of this phase, when there is one, replaces the synchronous phase's weights.
    independent.with_checkpoints(independent_dir(dir, rank))?;
    independent.run(data.independent, observer)?;
    // Each rank's own weights: evaluated by that rank alone.
    let independent_test = test_metrics(
        &SingleProcess,
        backend,
        independent.model(),
        data.independent,
    )?;

    let mut average =
        WeightAverage::swa(backend, independent.model(), BufferPolicy::RecomputeLater)?;
    merge_averages_across_ranks(communicator.as_ref(), backend, &mut average)?;
    average.copy_into(backend, model)?;
    let bn_epoch = config.synchronous.epochs.saturating_sub(1);
    until_error(data.synchronous.train_epoch(bn_epoch), |batches| {
        update_bn_across_ranks(
            communicator.as_ref(),
            backend,
            model,
            batches,
            config.synchronous.seed,
        )
    })?;
    let swap_test = test_metrics(communicator.as_ref(), backend, model, data.synchronous)?;
    Ok(SwapOutcome {
        synchronous_test,
        independent_test,
        swap_test,
    })
}

/// The checkpoint folder of rank `rank`'s independent phase.
pub fn independent_dir(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("independent-rank{rank}"))
}

/// The test metrics of `model`, the same on every rank of `communicator`, which share the test set out.
fn test_metrics<B: Backend>(
    communicator: &dyn Communicator,
    backend: &B,
    model: &mut dyn Module<B>,
    data: &dyn BatchSource,
) -> Result<Metrics, TrainError> {
    until_error(data.test(), |batches| {
        evaluate_across_ranks(communicator, backend, model, batches)
    })
}
