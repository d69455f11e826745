//! The training loop: SGD under any schedule, with SWA weight averaging or FGE prediction ensembling, per-epoch
//! metrics, and checkpoints that make an interrupted run resume to the same result.
//!
//! One [`Trainer`] runs one trajectory. What the paper compares are three kinds of run:
//! - **SGD**: a schedule and nothing else ([`Snapshots`] absent);
//! - **SWA**: the SWA schedule, the average of the weights taken by the [`SwaPolicy`] (the running mean, or
//!   another [`WeightRule`] such as EMA), evaluated after its BatchNorm statistics are recomputed
//!   ([`crate::bn::update_bn`]);
//! - **FGE**: a cyclical schedule, the predictions of the snapshots at the cycles' low points ensembled.
//!
//! Every epoch ends with a checkpoint written atomically (a directory renamed into place): the weights, the
//! momentum buffers, the average's tensors and the ensemble's probabilities in safetensors files, and in
//! `state.json` the configuration, the history and the small part of the optimiser, average and ensemble
//! (names, shapes, the count, the rule); dropout masks and data order are pure functions of (seed, epoch,
//! step), so a resumed run repeats the uninterrupted one bit for bit on the CPU. For the same reason two runs that train their first epochs identically
//! ([`RunConfig::shared_epochs`]: the SGD and SWA runs before their schedules' first decay) need not train
//! them twice: [`Trainer::branch_from`] starts one from the other's checkpoint, kept with
//! [`Trainer::keep_checkpoints`].
//!
//! With a [`Communicator`] of several ranks ([`Trainer::with_communicator`]), the same loop trains data
//! parallel: each rank steps on its shard of every batch ([`crate::distributed::ShardedBatches`]) with the
//! gradients all-reduced, recomputes BatchNorm over all ranks' shards, keeps the same weights and average
//! as every other rank, and only rank 0 writes checkpoints; every rank resumes from the one rank 0 finds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use swa_core::averaging::{AverageState, BufferPolicy, WeightAverage, WeightAveraging, WeightRule};
use swa_core::backend::Backend;
use swa_core::params::TensorRole;
use swa_core::policy::SwaPolicy;
use swa_core::schedule::{LrSchedule, Period, Schedule};
use swa_core::seed::splitmix64_mix;
use swa_core::swag::{SwagMoments, SwagState};

use crate::batch::{until_error, BatchSource};
use crate::checkpoint::{load_module, save_module, write_atomically, StateDict};
use crate::distributed::{
    add_ensemble_member_across_ranks, broadcast_tensors, combine_metrics, evaluate_across_ranks,
    rank_seed, update_bn_across_ranks, BatchNormMode, Communicator, DataParallel, DistributedError,
    SingleProcess,
};
use crate::error::TrainError;
use crate::evaluate::{Ensemble, Metrics, MetricsAccumulator};
use crate::module::{parameter_count, Module};
use crate::optim::{Sgd, SgdConfig, SgdState};
use crate::step::sgd_step_synchronized;

/// What a run does with the snapshots its policy takes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "use", rename_all = "snake_case")]
pub enum SnapshotUse {
    /// SWA: the average of the weights, BatchNorm statistics treated by `buffers`.
    AverageWeights {
        /// How BatchNorm statistics enter the average (the paper recomputes them: `RecomputeLater`).
        buffers: BufferPolicy,
        /// The weight of each snapshot: equal weights (SWA's running mean, the default when a
        /// configuration names none), EMA, or a custom rule (which a checkpoint cannot hold).
        #[serde(default)]
        rule: WeightRule,
    },
    /// FGE: the mean of the snapshots' predicted probabilities on the test set.
    EnsemblePredictions,
}

/// When snapshots are taken and what they are for.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshots {
    /// Completed epochs before the first snapshot (`swa_start`).
    pub start_epoch: usize,
    /// How often a snapshot is taken from then on.
    pub every: Period,
    /// What the snapshots are for.
    pub usage: SnapshotUse,
}

/// SWA-Gaussian moments collected from an SWA run's snapshots ([`SwagMoments`]), beside the average.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwagCollection {
    /// The number of deviation columns kept (the paper's `K`,
    /// [`DEFAULT_MAX_RANK`](swa_core::swag::DEFAULT_MAX_RANK) = 20): the moments take `K + 2` copies of the
    /// parameters.
    pub max_rank: usize,
}

/// Everything that defines a run; a checkpoint only resumes a run with the same configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Epochs to train in all.
    pub epochs: usize,
    /// The learning rate of every step.
    pub schedule: Schedule,
    /// Snapshots for SWA or FGE; `None` for plain SGD.
    pub snapshots: Option<Snapshots>,
    /// SGD hyper-parameters.
    pub sgd: SgdConfig,
    /// Seed of dropout masks (the data's order has its own seed, in the batch source).
    pub seed: u64,
    /// Completed epoch counts after which the SWA average is evaluated (its BN recomputed first), besides
    /// every `swa_eval_every` epochs and the last epoch.
    pub swa_eval_epochs: Vec<usize>,
    /// Evaluate the SWA average every this many epochs of the SWA phase (0: only at `swa_eval_epochs` and at
    /// the end).
    pub swa_eval_every: usize,
    /// Evaluate the current weights on the test set every this many optimiser steps as well as at epoch
    /// ends (0: at epoch ends only), for the paper's figure of test error against iteration under a
    /// cyclical learning rate. A multiple that falls on an epoch's last step is the epoch's own test
    /// evaluation ([`EpochRecord::test`]). Evaluation changes no state, so the trajectory is the same
    /// either way.
    #[serde(default)]
    pub test_every_iterations: usize,
    /// Also collect SWAG moments from the snapshots (runs that average weights only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swag: Option<SwagCollection>,
    /// Images at the end of the training split held out of training (0: none), on which a temperature
    /// can be fitted to images the network never saw, as the SWAG authors hold out CIFAR's last 5,000.
    /// The trainer does not pick its data (the [`BatchSource`] does, and must leave these out); the
    /// count is recorded so that a checkpoint resumes, and a run branches from, only a run that trained
    /// on the same images, and so that calibration finds the held-out images again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub holdout: usize,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

impl RunConfig {
    /// The averaging policy of this run (the schedule with the snapshot times), if it takes snapshots.
    pub fn policy(&self) -> Option<SwaPolicy> {
        self.snapshots.map(|s| SwaPolicy {
            schedule: self.schedule.clone(),
            swa_start_epoch: s.start_epoch,
            every: s.every,
        })
    }

    /// The completed-epoch counts after which the run takes a snapshot, in order: its checkpoint after that
    /// many epochs holds the snapshot's weights. Snapshots taken within epochs (a period in iterations) have
    /// no checkpoint and are not listed.
    pub fn snapshot_epochs(&self) -> Vec<usize> {
        match self.policy() {
            Some(policy) => (0..self.epochs)
                .filter(|&epoch| policy.average_after_epoch(epoch))
                .map(|epoch| epoch + 1)
                .collect(),
            None => Vec::new(),
        }
    }

    /// How many leading epochs this run and `other` train identically, given the same data: the same seed
    /// and SGD settings, the same learning rate at every step (bit for bit), and no snapshot taken by
    /// either. Up to that many epochs, a checkpoint of one is a checkpoint of the other
    /// ([`Trainer::branch_from`]). The SGD and SWA runs of the paper's protocol share the epochs before
    /// their schedules' first decay; an FGE run shares the SWA run's epochs before its cycles begin.
    pub fn shared_epochs(&self, other: &RunConfig, steps_per_epoch: usize) -> usize {
        if self.seed != other.seed || self.sgd != other.sgd || self.holdout != other.holdout {
            return 0;
        }
        // A snapshot at the end of epoch `start − 1` (by epoch or by iteration) is in the checkpoint
        // after `start` epochs, and the average or ensemble differs from then on.
        let no_snapshot_before = |c: &RunConfig| {
            c.snapshots
                .map_or(usize::MAX, |s| s.start_epoch.saturating_sub(1))
        };
        let limit = self
            .epochs
            .min(other.epochs)
            .min(no_snapshot_before(self))
            .min(no_snapshot_before(other));
        let steps = steps_per_epoch.max(1);
        (0..limit)
            .find(|&epoch| {
                (0..steps).any(|step| {
                    self.schedule.lr(epoch, step, steps).to_bits()
                        != other.schedule.lr(epoch, step, steps).to_bits()
                })
            })
            .unwrap_or(limit)
    }
}

/// Metrics of one epoch. Fields that were not measured that epoch are `None`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Completed epochs (1-based epoch number).
    pub epoch: usize,
    /// Learning rate of the epoch's first and last step.
    pub lr_first: f32,
    /// Learning rate of the epoch's last step.
    pub lr_last: f32,
    /// Training loss and accuracy, measured on the fly during the epoch.
    pub train: Metrics,
    /// Test metrics of the SGD weights.
    pub test: Metrics,
    /// Test metrics of the SWA average (after BN recomputation), when evaluated this epoch.
    pub swa_test: Option<Metrics>,
    /// Snapshots averaged or ensembled so far.
    pub snapshots: u64,
    /// Test metrics of the FGE ensemble, when it has members.
    pub ensemble_test: Option<Metrics>,
    /// Wall time of the epoch's training steps, in seconds.
    pub train_seconds: f64,
    /// Wall time of the epoch including evaluations and the checkpoint, in seconds.
    pub epoch_seconds: f64,
    /// Optimiser steps of the epoch (0 in records written before it was kept).
    #[serde(default)]
    pub steps: usize,
    /// Test metrics within the epoch, every [`RunConfig::test_every_iterations`] steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iteration_tests: Vec<IterationTest>,
}

/// The test metrics of the weights after one optimiser step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct IterationTest {
    /// Optimiser steps done since the start of the run (1-based: the first step is iteration 1).
    pub iteration: usize,
    /// The learning rate of that step.
    pub lr: f32,
    /// Test metrics of the weights after it.
    pub test: Metrics,
}

/// Callbacks for progress display and logging.
pub trait TrainObserver {
    /// After each optimiser step: epoch (0-based), step (0-based), steps per epoch, the step's loss.
    fn on_step(&mut self, _epoch: usize, _step: usize, _steps_per_epoch: usize, _loss: f32) {}
    /// After each epoch, once its checkpoint is written.
    fn on_epoch(&mut self, _record: &EpochRecord) {}
}

/// An observer that does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;
impl TrainObserver for Silent {}

/// What `state.json` records besides the tensors, which lie in safetensors files beside it.
#[derive(Debug, Serialize, Deserialize)]
struct TrainerMeta {
    /// The layout of the checkpoint, [`CHECKPOINT_FORMAT`].
    format: u32,
    config: RunConfig,
    epochs_done: usize,
    /// Leading epochs taken from another run's checkpoint rather than trained by this one.
    branched_epochs: usize,
    history: Vec<EpochRecord>,
    /// The optimiser's parameters in visiting order and whether each has a momentum buffer (in
    /// [`MOMENTUM_FILE`]).
    momentum: Vec<(String, bool)>,
    /// The average without its values (in [`AVERAGE_FILE`]).
    average: Option<AverageState>,
    /// The ensemble's sizes; its probabilities and labels are in [`ENSEMBLE_FILE`].
    ensemble: Option<Ensemble>,
    /// The SWAG moments without their values (in [`SWAG_FILE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    swag: Option<SwagState>,
}

/// Reads only the format of a `state.json`, so that a checkpoint of another layout is recognised before
/// its fields are parsed.
#[derive(Deserialize)]
struct FormatProbe {
    format: Option<u32>,
}

/// One training run of a network on a backend.
pub struct Trainer<B: Backend> {
    backend: B,
    config: RunConfig,
    policy: Option<SwaPolicy>,
    model: Box<dyn Module<B>>,
    /// A second instance of the network that receives the average's weights for evaluation.
    eval_model: Box<dyn Module<B>>,
    optimizer: Sgd<B>,
    average: Option<WeightAverage<B>>,
    swag: Option<SwagMoments<B>>,
    ensemble: Option<Ensemble>,
    epochs_done: usize,
    branched_epochs: usize,
    history: Vec<EpochRecord>,
    checkpoint_dir: Option<PathBuf>,
    /// Epoch counts whose checkpoints survive newer ones, for other runs to branch from.
    kept_checkpoints: Vec<usize>,
    /// The ranks of a data-parallel run ([`SingleProcess`] by default).
    communicator: Arc<dyn Communicator>,
    /// How BatchNorm normalises the training batches of a data-parallel run.
    batch_norm: BatchNormMode,
}

impl<B: Backend> std::fmt::Debug for Trainer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("backend", &self.backend)
            .field("config", &self.config)
            .field("epochs_done", &self.epochs_done)
            .finish_non_exhaustive()
    }
}

/// The checkpoint layout this version writes and reads: tensors in safetensors files, metadata in
/// `state.json`. The unversioned layout before it kept every tensor inside `state.json`.
const CHECKPOINT_FORMAT: u32 = 2;
const STATE_FILE: &str = "state.json";
/// The file of a checkpoint that holds the network's weights and BatchNorm statistics.
pub const MODEL_FILE: &str = "model.safetensors";
const MOMENTUM_FILE: &str = "momentum.safetensors";
const AVERAGE_FILE: &str = "average.safetensors";
const ENSEMBLE_FILE: &str = "ensemble.safetensors";
/// The file of a checkpoint that holds the SWAG moments (the authors' `<name>_mean`, `<name>_sq_mean` and
/// `<name>_cov_mat_sqrt` keys).
pub const SWAG_FILE: &str = "swag.safetensors";

impl<B: Backend> Trainer<B> {
    /// A trainer for `model`; `eval_model` must be another instance of the same network (its weights are
    /// overwritten by the average's before each SWA evaluation).
    pub fn new(
        backend: B,
        config: RunConfig,
        model: Box<dyn Module<B>>,
        eval_model: Box<dyn Module<B>>,
    ) -> Result<Self, TrainError> {
        let policy = config.policy();
        if let Some(policy) = &policy {
            policy
                .validate()
                .map_err(|e| TrainError::InvalidConfig(format!("SWA policy: {e}")))?;
        } else {
            config
                .schedule
                .validate()
                .map_err(|e| TrainError::InvalidConfig(format!("schedule: {e}")))?;
        }
        config.sgd.validate()?;
        if let Some(swag) = config.swag {
            let averages = matches!(
                config.snapshots,
                Some(Snapshots {
                    usage: SnapshotUse::AverageWeights { .. },
                    ..
                })
            );
            if !averages {
                return Err(TrainError::InvalidConfig(
                    "SWAG moments are collected from the snapshots of a run that averages weights; \
                     this run takes none"
                        .into(),
                ));
            }
            if swag.max_rank == 0 {
                return Err(TrainError::InvalidConfig(
                    "SWAG needs at least one deviation column (max_rank 0 given; the paper keeps 20)"
                        .into(),
                ));
            }
            // Refused now rather than at `swa_start`, after hours of training.
            SwagMoments::check_fits(&backend, parameter_count(model.as_ref()), swag.max_rank)?;
        }
        let ensemble = matches!(
            config.snapshots,
            Some(Snapshots {
                usage: SnapshotUse::EnsemblePredictions,
                ..
            })
        )
        .then(Ensemble::new);
        Ok(Self {
            optimizer: Sgd::new(config.sgd),
            backend,
            config,
            policy,
            model,
            eval_model,
            average: None,
            swag: None,
            ensemble,
            epochs_done: 0,
            branched_epochs: 0,
            history: Vec::new(),
            checkpoint_dir: None,
            kept_checkpoints: Vec::new(),
            communicator: Arc::new(SingleProcess),
            batch_norm: BatchNormMode::PerRank,
        })
    }

    /// Trains data parallel over `communicator`'s ranks: every rank must run the same configuration on
    /// its shard of the same batches ([`crate::distributed::ShardedBatches`]). The weights and BatchNorm
    /// statistics are set to rank 0's now, as PyTorch's DDP does, so that the ranks start alike.
    ///
    /// Call it before [`Trainer::with_checkpoints`] and before training; refused afterwards with
    /// [`TrainError::InvalidConfig`].
    pub fn with_communicator(
        &mut self,
        communicator: Arc<dyn Communicator>,
    ) -> Result<(), TrainError> {
        if self.checkpoint_dir.is_some() || self.epochs_done > 0 || self.average.is_some() {
            return Err(TrainError::InvalidConfig(
                "the communicator is set before checkpoints are turned on and before training"
                    .into(),
            ));
        }
        for role in [TensorRole::Parameter, TensorRole::BatchNormStatistic] {
            broadcast_tensors(
                communicator.as_ref(),
                &self.backend,
                self.model.as_mut(),
                role,
            )?;
        }
        self.communicator = communicator;
        Ok(())
    }

    /// Normalises the training batches of a data-parallel run as `mode` says (by default
    /// [`BatchNormMode::PerRank`]); one process trains the same either way. Every rank must set the same
    /// mode, and a resumed run should keep the mode it started with.
    pub fn with_batch_norm_mode(&mut self, mode: BatchNormMode) {
        self.batch_norm = mode;
    }

    /// How BatchNorm normalises the training batches of a data-parallel run.
    pub fn batch_norm_mode(&self) -> BatchNormMode {
        self.batch_norm
    }

    /// The communicator of the run's ranks.
    pub fn communicator(&self) -> &dyn Communicator {
        self.communicator.as_ref()
    }

    /// Writes a checkpoint into `dir` after every epoch, and resumes from the latest one found there.
    /// Returns the number of epochs already done.
    ///
    /// Fails with [`TrainError::InvalidConfig`] when the run averages with a [`WeightRule::Custom`] rule, a
    /// function that a checkpoint cannot hold.
    pub fn with_checkpoints(&mut self, dir: impl Into<PathBuf>) -> Result<usize, TrainError> {
        if let Some(Snapshots {
            usage:
                SnapshotUse::AverageWeights {
                    rule: WeightRule::Custom(custom),
                    ..
                },
            ..
        }) = self.config.snapshots
        {
            return Err(TrainError::InvalidConfig(format!(
                "checkpoints: the custom weight rule `{}` is a function, which a checkpoint cannot \
                 hold; train without checkpoints, or average with the `equal` or `ema` rule",
                custom.name
            )));
        }
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| TrainError::Io {
            path: dir.clone(),
            source,
        })?;
        if let Some(latest) = self.checkpoint_to_resume(&dir)? {
            self.restore(&latest)?;
        }
        self.checkpoint_dir = Some(dir);
        Ok(self.epochs_done)
    }

    /// The latest checkpoint in `dir`, as rank 0 finds it: every rank resumes from the same epoch, even one
    /// that a rank saw being written. A rank that cannot see that checkpoint fails with
    /// [`DistributedError::Mismatch`].
    fn checkpoint_to_resume(&self, dir: &Path) -> Result<Option<PathBuf>, TrainError> {
        let communicator = self.communicator.as_ref();
        let latest = find_checkpoints(dir)?.pop();
        if communicator.size() == 1 {
            return Ok(latest.map(|(_, path)| path));
        }
        // u64::MAX: rank 0 found none.
        let mut chosen = [latest.as_ref().map_or(u64::MAX, |(epoch, _)| *epoch as u64)];
        communicator.broadcast_u64("choosing the checkpoint to resume from", &mut chosen)?;
        if chosen[0] == u64::MAX {
            return Ok(None);
        }
        let path = dir.join(checkpoint_name(chosen[0] as usize));
        if !path.join(STATE_FILE).is_file() {
            return Err(DistributedError::Mismatch {
                rank: communicator.rank(),
                ranks: communicator.size(),
                operation: "resuming".into(),
                detail: format!(
                    "rank 0 resumes from {}, which this rank cannot read; the ranks must share the \
                     checkpoint folder",
                    path.display()
                ),
            }
            .into());
        }
        Ok(Some(path))
    }

    /// Keeps the checkpoints written after these epoch counts when newer ones are written (by default only
    /// the latest is kept), so that other runs can branch from them.
    pub fn keep_checkpoints(&mut self, epochs: impl IntoIterator<Item = usize>) {
        self.kept_checkpoints.extend(epochs);
    }

    /// Starts this run from `checkpoint`, a checkpoint directory written by another run, instead of
    /// training its epochs again. Allowed when the two runs train identically up to that checkpoint
    /// ([`RunConfig::shared_epochs`]) on the same data, which the caller guarantees; the result is then
    /// bit-identical to training from scratch (on the CPU). The weights, momentum and history are taken
    /// over, and a checkpoint of this run is written at once when checkpoints are on. Fails with
    /// [`TrainError::StateMismatch`] when this run has already trained or the runs differ before that epoch.
    /// Returns the epochs taken over.
    pub fn branch_from(
        &mut self,
        checkpoint: &Path,
        steps_per_epoch: usize,
    ) -> Result<usize, TrainError> {
        if self.epochs_done > 0 {
            return Err(TrainError::StateMismatch(format!(
                "cannot branch from {}: this run has already trained {} epochs",
                checkpoint.display(),
                self.epochs_done
            )));
        }
        let meta = read_meta(checkpoint)?;
        let shared = self.config.shared_epochs(&meta.config, steps_per_epoch);
        if meta.epochs_done > shared || meta.average.is_some() || meta.swag.is_some() {
            return Err(TrainError::StateMismatch(format!(
                "cannot branch from {} after {} epochs: the runs train identically for only {shared}",
                checkpoint.display(),
                meta.epochs_done
            )));
        }
        self.load_tensors(checkpoint, &meta)?;
        // This run's own (empty) ensemble stays: the other run's has no members before the shared end.
        self.epochs_done = meta.epochs_done;
        self.branched_epochs = meta.epochs_done;
        self.history = meta.history;
        if let Some(dir) = self.checkpoint_dir.clone() {
            self.save_checkpoint(&dir)?;
        }
        Ok(self.epochs_done)
    }

    /// Leading epochs taken over from another run by [`Trainer::branch_from`] (their records in
    /// [`Trainer::history`] are that run's, timings included).
    pub fn branched_epochs(&self) -> usize {
        self.branched_epochs
    }

    /// The configuration.
    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// Epochs completed.
    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// Per-epoch metrics so far.
    pub fn history(&self) -> &[EpochRecord] {
        &self.history
    }

    /// The trained (SGD) network.
    pub fn model(&mut self) -> &mut dyn Module<B> {
        self.model.as_mut()
    }

    /// The weight average, once the first snapshot is taken.
    pub fn average(&self) -> Option<&WeightAverage<B>> {
        self.average.as_ref()
    }

    /// The SWAG moments, once the first snapshot is taken by a run configured to collect them.
    pub fn swag(&self) -> Option<&SwagMoments<B>> {
        self.swag.as_ref()
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The network holding the SWA average's weights with recomputed BatchNorm statistics, ready for
    /// evaluation or saving. `None` before the first snapshot.
    pub fn swa_model(
        &mut self,
        data: &dyn BatchSource,
    ) -> Result<Option<&mut dyn Module<B>>, TrainError> {
        let Some(average) = &self.average else {
            return Ok(None);
        };
        average.copy_into(&self.backend, self.eval_model.as_mut())?;
        let bn_epoch = self.epochs_done.saturating_sub(1);
        let seed = bn_seed(self.config.seed, bn_epoch);
        until_error(data.train_epoch(bn_epoch), |batches| {
            update_bn_across_ranks(
                self.communicator.as_ref(),
                &self.backend,
                self.eval_model.as_mut(),
                batches,
                seed,
            )
        })?;
        Ok(Some(self.eval_model.as_mut()))
    }

    /// Starts the SWA average (and the SWAG moments) from the current weights, before any training: the
    /// paper's Algorithm 1 sets `w_SWA ← ŵ` from the weights SWA starts from and averages the cycles'
    /// end points into it, so a run from pretrained weights counts them as its first snapshot. Refused
    /// after the first epoch, when an average exists already, and in runs that do not average weights.
    pub fn average_current_weights(&mut self) -> Result<(), TrainError> {
        let averages = matches!(
            self.config.snapshots,
            Some(Snapshots {
                usage: SnapshotUse::AverageWeights { .. },
                ..
            })
        );
        if !averages || self.epochs_done > 0 || self.average.is_some() {
            return Err(TrainError::InvalidConfig(format!(
                "the average can start from the current weights only in a run that averages weights, \
                 before its first epoch and first snapshot (epochs done: {}, snapshots: {})",
                self.epochs_done,
                self.average.as_ref().map_or(0, WeightAverage::count)
            )));
        }
        self.take_snapshot_of_weights()
    }

    /// Trains until the configured number of epochs, calling `observer` along the way.
    pub fn run(
        &mut self,
        data: &dyn BatchSource,
        observer: &mut dyn TrainObserver,
    ) -> Result<(), TrainError> {
        while self.epochs_done < self.config.epochs {
            self.run_epoch(data, observer)?;
        }
        Ok(())
    }

    /// Trains one epoch, evaluates, takes snapshots and writes the checkpoint.
    pub fn run_epoch(
        &mut self,
        data: &dyn BatchSource,
        observer: &mut dyn TrainObserver,
    ) -> Result<EpochRecord, TrainError> {
        let epoch = self.epochs_done;
        let started = Instant::now();
        let steps = data.train_batches_per_epoch();
        let mut train = MetricsAccumulator::default();
        let (mut lr_first, mut lr_last) = (f32::NAN, f32::NAN);
        let mut iteration_tests = Vec::new();
        let mut test_seconds = 0.0;
        let communicator = Arc::clone(&self.communicator);
        let mut data_parallel =
            DataParallel::new(Arc::clone(&communicator)).with_batch_norm(self.batch_norm);
        for (step, batch) in data.train_epoch(epoch).enumerate() {
            let batch = batch?;
            let lr = self.lr(epoch, step, steps);
            if step == 0 {
                lr_first = lr;
            }
            lr_last = lr;
            let loss = sgd_step_synchronized(
                &self.backend,
                self.model.as_mut(),
                &mut self.optimizer,
                &batch,
                lr,
                rank_seed(
                    step_seed(self.config.seed, epoch, step),
                    communicator.rank(),
                ),
                &mut train,
                &mut data_parallel,
            )?;
            if !loss.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    epoch,
                    step,
                    loss,
                    lr,
                });
            }
            observer.on_step(epoch, step, steps, loss);
            let iteration = epoch * steps + step + 1;
            let every = self.config.test_every_iterations;
            if every > 0 && iteration.is_multiple_of(every) && step + 1 < steps {
                let evaluating = Instant::now();
                let test = self.evaluate_current(data)?;
                iteration_tests.push(IterationTest {
                    iteration,
                    lr,
                    test,
                });
                test_seconds += evaluating.elapsed().as_secs_f64();
            }
            if self
                .policy
                .as_ref()
                .is_some_and(|p| p.average_after_step(epoch, step, steps))
            {
                self.take_snapshot(data)?;
            }
        }
        // The epoch's training time, without the evaluations within it.
        let train_seconds = started.elapsed().as_secs_f64() - test_seconds;
        combine_metrics(communicator.as_ref(), &mut train)?;
        if self
            .policy
            .as_ref()
            .is_some_and(|p| p.average_after_epoch(epoch))
        {
            self.take_snapshot(data)?;
        }
        self.epochs_done = epoch + 1;

        let test = self.evaluate_current(data)?;
        let swa_test = if self.average.is_some() && self.evaluate_swa_now() {
            let backend = self.backend.clone();
            match self.swa_model(data)? {
                Some(model) => Some(until_error(data.test(), |batches| {
                    evaluate_across_ranks(communicator.as_ref(), &backend, model, batches)
                })?),
                None => None,
            }
        } else {
            None
        };
        let snapshots = match (&self.average, &self.ensemble) {
            (Some(a), _) => a.count(),
            (None, Some(e)) => e.members() as u64,
            _ => 0,
        };
        let ensemble_test = self
            .ensemble
            .as_ref()
            .filter(|e| e.members() > 0)
            .map(Ensemble::metrics);
        let mut record = EpochRecord {
            epoch: self.epochs_done,
            lr_first,
            lr_last,
            train: train.finish(),
            test,
            swa_test,
            snapshots,
            ensemble_test,
            train_seconds,
            epoch_seconds: 0.0,
            steps,
            iteration_tests,
        };
        record.epoch_seconds = started.elapsed().as_secs_f64();
        self.history.push(record.clone());
        if let Some(dir) = self.checkpoint_dir.clone() {
            self.save_checkpoint(&dir)?;
        }
        observer.on_epoch(&record);
        Ok(record)
    }

    fn lr(&self, epoch: usize, step: usize, steps: usize) -> f32 {
        match &self.policy {
            Some(policy) => policy.lr(epoch, step, steps),
            None => self.config.schedule.lr(epoch, step, steps),
        }
    }

    fn evaluate_swa_now(&self) -> bool {
        let done = self.epochs_done;
        let every = self.config.swa_eval_every;
        let start = self.config.snapshots.map_or(0, |s| s.start_epoch);
        done == self.config.epochs
            || self.config.swa_eval_epochs.contains(&done)
            || (every > 0 && done >= start && (done - start).is_multiple_of(every))
    }

    /// The current weights' metrics on the test set.
    fn evaluate_current(&mut self, data: &dyn BatchSource) -> Result<Metrics, TrainError> {
        until_error(data.test(), |batches| {
            evaluate_across_ranks(
                self.communicator.as_ref(),
                &self.backend,
                self.model.as_mut(),
                batches,
            )
        })
    }

    fn take_snapshot(&mut self, data: &dyn BatchSource) -> Result<(), TrainError> {
        let Some(snapshots) = self.config.snapshots else {
            return Ok(());
        };
        match snapshots.usage {
            SnapshotUse::AverageWeights { .. } => self.take_snapshot_of_weights()?,
            SnapshotUse::EnsemblePredictions => {
                let ensemble = self.ensemble.get_or_insert_with(Ensemble::new);
                until_error(data.test(), |batches| {
                    add_ensemble_member_across_ranks(
                        self.communicator.as_ref(),
                        ensemble,
                        &self.backend,
                        self.model.as_mut(),
                        batches,
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Blends the current weights into the average and the SWAG moments, creating them at the first
    /// snapshot.
    fn take_snapshot_of_weights(&mut self) -> Result<(), TrainError> {
        let Some(Snapshots {
            usage: SnapshotUse::AverageWeights { buffers, rule },
            ..
        }) = self.config.snapshots
        else {
            return Ok(());
        };
        match &mut self.average {
            Some(average) => average.update(&self.backend, self.model.as_ref())?,
            None => {
                self.average = Some(WeightAverage::new(
                    &self.backend,
                    self.model.as_ref(),
                    rule,
                    buffers,
                )?)
            }
        }
        if let Some(collection) = self.config.swag {
            match &mut self.swag {
                Some(moments) => moments.update(&self.backend, self.model.as_ref())?,
                None => {
                    self.swag = Some(SwagMoments::new(
                        &self.backend,
                        self.model.as_ref(),
                        collection.max_rank,
                    )?)
                }
            }
        }
        Ok(())
    }

    /// Writes the checkpoint of the epochs done so far into `dir/epoch-NNNN`, atomically, and removes older
    /// ones.
    /// Only rank 0 of a data-parallel run writes: every rank holds the same state.
    fn save_checkpoint(&self, dir: &Path) -> Result<(), TrainError> {
        if self.communicator.rank() != 0 {
            return Ok(());
        }
        let name = checkpoint_name(self.epochs_done);
        let staging = dir.join(format!(".{name}.partial"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        save_module(
            &self.backend,
            self.model.as_ref(),
            &staging.join(MODEL_FILE),
        )?;
        let SgdState {
            parameters: momentum,
            buffers,
        } = self.optimizer.state(&self.backend)?;
        buffers.save(&staging.join(MOMENTUM_FILE))?;
        let average = match &self.average {
            Some(a) => {
                let mut state = a.to_state(&self.backend)?;
                StateDict::take_average_values(&mut state).save(&staging.join(AVERAGE_FILE))?;
                Some(state)
            }
            None => None,
        };
        if let Some(ensemble) = self.ensemble.as_ref().filter(|e| e.members() > 0) {
            ensemble.tensors().save(&staging.join(ENSEMBLE_FILE))?;
        }
        let swag = match &self.swag {
            Some(moments) => {
                let mut state = moments.to_state(&self.backend)?;
                StateDict::take_swag_values(&mut state).save(&staging.join(SWAG_FILE))?;
                Some(state)
            }
            None => None,
        };
        let meta = TrainerMeta {
            format: CHECKPOINT_FORMAT,
            config: self.config.clone(),
            epochs_done: self.epochs_done,
            branched_epochs: self.branched_epochs,
            history: self.history.clone(),
            momentum,
            average,
            ensemble: self.ensemble.clone(),
            swag,
        };
        let state_path = staging.join(STATE_FILE);
        let json = serde_json::to_vec(&meta).map_err(|source| TrainError::Json {
            path: state_path.clone(),
            source,
        })?;
        write_atomically(&state_path, &json)?;
        let final_dir = dir.join(&name);
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
        }
        std::fs::rename(&staging, &final_dir).map_err(io(&final_dir))?;
        for old in find_checkpoints(dir)? {
            if old.1 != final_dir && !self.kept_checkpoints.contains(&old.0) {
                std::fs::remove_dir_all(&old.1).map_err(io(&old.1))?;
            }
        }
        Ok(())
    }

    fn restore(&mut self, dir: &Path) -> Result<(), TrainError> {
        let meta = read_meta(dir)?;
        if meta.config != self.config {
            return Err(TrainError::StateMismatch(format!(
                "{} was written by a run with another configuration; use another output folder or remove it",
                dir.join(STATE_FILE).display()
            )));
        }
        self.load_tensors(dir, &meta)?;
        self.ensemble = match meta.ensemble {
            Some(mut ensemble) if ensemble.members() > 0 => {
                ensemble.restore_tensors(&StateDict::load(&dir.join(ENSEMBLE_FILE))?)?;
                Some(ensemble)
            }
            other => other,
        };
        self.epochs_done = meta.epochs_done;
        self.branched_epochs = meta.branched_epochs;
        self.history = meta.history;
        Ok(())
    }

    /// Loads the weights, momentum buffers and average of the checkpoint in `dir`.
    fn load_tensors(&mut self, dir: &Path, meta: &TrainerMeta) -> Result<(), TrainError> {
        load_module(&self.backend, self.model.as_mut(), &dir.join(MODEL_FILE))?;
        let momentum = SgdState {
            parameters: meta.momentum.clone(),
            buffers: StateDict::load(&dir.join(MOMENTUM_FILE))?,
        };
        self.optimizer.load_state(&self.backend, &momentum)?;
        self.average = match &meta.average {
            Some(state) => {
                let mut state = state.clone();
                StateDict::load(&dir.join(AVERAGE_FILE))?.restore_average_values(&mut state)?;
                Some(WeightAverage::from_state(&self.backend, &state)?)
            }
            None => None,
        };
        self.swag = match &meta.swag {
            Some(state) => Some(load_swag_values(&self.backend, dir, state)?),
            None => None,
        };
        Ok(())
    }
}

/// The SWAG moments of the checkpoint in `dir`, from its metadata `state` and [`SWAG_FILE`].
fn load_swag_values<B: Backend>(
    backend: &B,
    dir: &Path,
    state: &SwagState,
) -> Result<SwagMoments<B>, TrainError> {
    let mut state = state.clone();
    StateDict::load(&dir.join(SWAG_FILE))?.restore_swag_values(&mut state)?;
    Ok(SwagMoments::from_state(backend, &state)?)
}

/// The SWAG moments a run's checkpoint in `dir` holds, on `backend`; `None` for a run that collected none
/// or had taken no snapshot yet.
pub fn load_swag_moments<B: Backend>(
    backend: &B,
    dir: &Path,
) -> Result<Option<SwagMoments<B>>, TrainError> {
    let meta = read_meta(dir)?;
    match &meta.swag {
        Some(state) => Ok(Some(load_swag_values(backend, dir, state)?)),
        None => Ok(None),
    }
}

/// The FGE ensemble a run's checkpoint in `dir` holds (its members' mean probabilities on the test set);
/// `None` for a run that ensembles nothing or had no member yet.
pub fn load_ensemble(dir: &Path) -> Result<Option<Ensemble>, TrainError> {
    let meta = read_meta(dir)?;
    match meta.ensemble {
        Some(mut ensemble) if ensemble.members() > 0 => {
            ensemble.restore_tensors(&StateDict::load(&dir.join(ENSEMBLE_FILE))?)?;
            Ok(Some(ensemble))
        }
        _ => Ok(None),
    }
}

/// Reads a checkpoint's `state.json`, refusing one of another layout with
/// [`TrainError::CheckpointFormat`].
fn read_meta(dir: &Path) -> Result<TrainerMeta, TrainError> {
    let state_path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&state_path).map_err(|source| TrainError::Io {
        path: state_path.clone(),
        source,
    })?;
    let json = |source| TrainError::Json {
        path: state_path.clone(),
        source,
    };
    let probe: FormatProbe = serde_json::from_slice(&bytes).map_err(json)?;
    if probe.format != Some(CHECKPOINT_FORMAT) {
        return Err(TrainError::CheckpointFormat {
            path: state_path,
            found: probe.format,
            expected: CHECKPOINT_FORMAT,
        });
    }
    serde_json::from_slice(&bytes).map_err(json)
}

/// What a checkpoint records about its run, without reading its tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointInfo {
    /// The run's configuration.
    pub config: RunConfig,
    /// Epochs done when the checkpoint was written.
    pub epochs_done: usize,
    /// Leading epochs the run took from another run's checkpoint ([`Trainer::branch_from`]).
    pub branched_epochs: usize,
    /// The run's per-epoch metrics so far.
    pub history: Vec<EpochRecord>,
}

/// Reads the `state.json` of the checkpoint in `dir`.
pub fn checkpoint_info(dir: &Path) -> Result<CheckpointInfo, TrainError> {
    let meta = read_meta(dir)?;
    Ok(CheckpointInfo {
        config: meta.config,
        epochs_done: meta.epochs_done,
        branched_epochs: meta.branched_epochs,
        history: meta.history,
    })
}

/// Saves the SWA average's weights (with BN statistics recomputed by [`Trainer::swa_model`]) or any model
/// to a PyTorch-loadable safetensors file.
pub fn save_weights<B: Backend>(
    backend: &B,
    model: &dyn Module<B>,
    path: &Path,
) -> Result<(), TrainError> {
    Ok(save_module(backend, model, path)?)
}

/// The complete checkpoints in `dir` (as written by a [`Trainer`] with checkpoints on), as (epochs done,
/// directory) sorted by epoch.
/// A folder that does not exist holds none.
pub fn find_checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>, TrainError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(dir).map_err(|source| TrainError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(epoch) = name
            .to_str()
            .and_then(|n| n.strip_prefix("epoch-"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() {
            found.push((epoch, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The folder of the checkpoint after `epochs_done` epochs.
fn checkpoint_name(epochs_done: usize) -> String {
    format!("epoch-{epochs_done:04}")
}

fn step_seed(seed: u64, epoch: usize, step: usize) -> u64 {
    splitmix64_mix(splitmix64_mix(seed ^ 0x5157_4153) ^ ((epoch as u64) << 32 | step as u64))
}

fn bn_seed(seed: u64, epoch: usize) -> u64 {
    splitmix64_mix(splitmix64_mix(seed ^ 0x424e) ^ epoch as u64)
}
