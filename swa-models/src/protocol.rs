//! The paper's experimental protocol: from one network's recipe to the runs SGD, SWA and FGE, and which
//! of a seed's runs start from another's checkpoint.
//!
//! A [`Recipe`] holds what the original code's command line sets for a network (budget, learning rates,
//! `swa_start`, weight decay, batch size, FGE cycle). [`Recipe::run_config`] turns it into the
//! [`RunConfig`] of each [`RunKind`], exactly as the paper compares them:
//! - **SGD** trains one budget with the original code's schedule, decayed to 1% of the initial rate;
//! - **SWA** trains 1.5 budgets with the SWA schedule and averages after every epoch from `swa_start` on,
//!   evaluated at 1, 1.25 and 1.5 budgets ([`Recipe::swa_report_epochs`]);
//! - **FGE** follows the SWA schedule until `swa_start − 1`, then triangular cycles to one budget,
//!   ensembling the predictions at each cycle's lowest learning rate.
//!
//! [`plan_seed`] orders a seed's runs and lets each start from the checkpoint of the earlier run that
//! trains the most leading epochs identically ([`RunConfig::shared_epochs`]), and [`PlannedRun::start`]
//! resumes or branches a [`Trainer`] accordingly. `cargo xtask reproduce` is these functions, a table of
//! recipes and a report.
//!
//! [`PretrainedSwa`] is the paper's other protocol, on ImageNet: SWA for a few epochs from pretrained
//! weights under one-epoch cycles.
//!
//! [`run_swap`] is SWAP (Gupta et al., 2020) over the ranks of a data-parallel run: synchronous training
//! until `swa_start`, the ranks independent at the SWA learning rate, their weights averaged
//! ([`Recipe::swap_config`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use swa_core::averaging::{BufferPolicy, WeightRule};
use swa_core::backend::Backend;
use swa_core::schedule::{Period, Schedule, ScheduleError};

use crate::error::TrainError;
use crate::module::Module;
use crate::nets::Architecture;
use crate::optim::SgdConfig;
use crate::train::{find_checkpoints, RunConfig, SnapshotUse, Snapshots, SwagCollection, Trainer};

mod pretrained;
mod swap;
pub use pretrained::PretrainedSwa;
pub use swap::{independent_dir, run_swap, SwapConfig, SwapData, SwapOutcome};

/// One network's training recipe, as the original code's command line sets it.
///
/// Serialises to JSON (the network by its name), so that a run's folder can record the recipe it was
/// trained with and a reference implementation elsewhere can follow the same one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// The network.
    #[serde(with = "architecture_name")]
    pub architecture: Architecture,
    /// SGD epochs of one budget.
    pub budget: usize,
    /// Epochs of the SWA run (1.5 budgets in the paper).
    pub swa_epochs: usize,
    /// Initial learning rate.
    pub lr_init: f32,
    /// Completed epochs before the first average (`--swa_start`).
    pub swa_start: usize,
    /// The SWA learning rate.
    pub swa_lr: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// Batch size.
    pub batch_size: usize,
    /// FGE cycle length in epochs.
    pub fge_cycle: usize,
    /// Evaluate the FGE run's weights on the test set every this many steps (0: at epoch ends only), for
    /// the figure of test error against iteration under its cyclical learning rate.
    pub fge_test_every: usize,
    /// Evaluate the average every this many epochs of the SWA phase.
    pub swa_eval_every: usize,
    /// Train on only the first this many training images (`None`: all).
    pub train_limit: Option<usize>,
    /// Evaluate on only the first this many test images (`None`: all).
    pub test_limit: Option<usize>,
    /// Collect SWAG moments with this many deviation columns from the SWA run's snapshots (`None`: SWA
    /// alone).
    pub swag_max_rank: Option<usize>,
    /// Training images held out at the end of the (limited) training split, for fitting the temperature
    /// of temperature scaling ([`RunConfig::holdout`]; 0: none, the paper's protocol).
    pub holdout: usize,
}

/// The three kinds of run the paper compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// Conventional SGD over one budget, learning rate decayed to 1% of its initial value.
    Sgd,
    /// SWA: the SWA schedule over 1.5 budgets, averages evaluated at 1, 1.25 and 1.5 budgets.
    Swa,
    /// FGE: the SWA schedule until `swa_start − 1`, then triangular cycles to one budget, ensembling the
    /// predictions at each cycle's low point.
    Fge,
}

impl RunKind {
    /// Every kind, in the order a seed's runs are planned.
    pub const ALL: [RunKind; 3] = [RunKind::Sgd, RunKind::Swa, RunKind::Fge];

    /// The name used on command lines and in output folders.
    pub fn name(self) -> &'static str {
        match self {
            RunKind::Sgd => "sgd",
            RunKind::Swa => "swa",
            RunKind::Fge => "fge",
        }
    }
}

impl fmt::Display for RunKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RunKind {
    type Err = TrainError;

    fn from_str(name: &str) -> Result<Self, TrainError> {
        let lower = name.trim().to_ascii_lowercase();
        RunKind::ALL
            .into_iter()
            .find(|kind| kind.name() == lower)
            .ok_or_else(|| {
                TrainError::InvalidConfig(format!(
                    "unknown run {name:?}: expected one of sgd, swa, fge"
                ))
            })
    }
}

/// The epochs at which an SWA run is reported, one table column each: 1 and 1.25 budgets, and the end of
/// the run (1.5 budgets in the paper).
pub fn report_points(budget: usize, swa_epochs: usize) -> [usize; 3] {
    [budget, (budget * 5).div_ceil(4), swa_epochs]
}

fn schedule_error(what: &'static str) -> impl Fn(ScheduleError) -> TrainError {
    move |e| TrainError::InvalidConfig(format!("{what}: {e}"))
}

/// Serialises an [`Architecture`] as the name it parses from.
mod architecture_name {
    use super::Architecture;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(architecture: &Architecture, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(architecture)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Architecture, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl Recipe {
    /// The recipe over a budget of `budget` epochs instead: the SWA run and `swa_start` keep their
    /// proportions to the budget (the paper's 1.5 budgets; `swa_start` rounded, at least 1), as the
    /// original code's `--epochs` and `--swa_start` would be set together for a shorter run.
    pub fn with_budget(&self, budget: usize) -> Result<Recipe, TrainError> {
        if budget == 0 {
            return Err(TrainError::InvalidConfig(
                "a budget of 0 epochs trains nothing".into(),
            ));
        }
        let scaled = |epochs: usize| -> usize {
            ((epochs as f64) * (budget as f64) / (self.budget as f64)).round() as usize
        };
        let recipe = Recipe {
            budget,
            swa_epochs: scaled(self.swa_epochs).max(budget),
            swa_start: scaled(self.swa_start).clamp(1, budget),
            ..self.clone()
        };
        recipe.validate()?;
        Ok(recipe)
    }

    /// The settings in which `self` and `other` would train different weights, as `name: ours vs theirs`
    /// (empty when a run of one can be resumed as a run of the other). Evaluation-only settings (test
    /// limit, how often the average or the FGE run is evaluated) may differ.
    pub fn training_differences(&self, other: &Recipe) -> Vec<String> {
        let mut differences = Vec::new();
        let mut compare = |name: &str, ours: String, theirs: String| {
            if ours != theirs {
                differences.push(format!("{name}: {ours} vs {theirs}"));
            }
        };
        compare(
            "architecture",
            self.architecture.to_string(),
            other.architecture.to_string(),
        );
        compare("budget", self.budget.to_string(), other.budget.to_string());
        compare(
            "swa_epochs",
            self.swa_epochs.to_string(),
            other.swa_epochs.to_string(),
        );
        compare(
            "lr_init",
            self.lr_init.to_string(),
            other.lr_init.to_string(),
        );
        compare(
            "swa_start",
            self.swa_start.to_string(),
            other.swa_start.to_string(),
        );
        compare("swa_lr", self.swa_lr.to_string(), other.swa_lr.to_string());
        compare(
            "weight_decay",
            self.weight_decay.to_string(),
            other.weight_decay.to_string(),
        );
        compare(
            "batch_size",
            self.batch_size.to_string(),
            other.batch_size.to_string(),
        );
        compare(
            "fge_cycle",
            self.fge_cycle.to_string(),
            other.fge_cycle.to_string(),
        );
        compare(
            "train_limit",
            format!("{:?}", self.train_limit),
            format!("{:?}", other.train_limit),
        );
        compare(
            "holdout",
            self.holdout.to_string(),
            other.holdout.to_string(),
        );
        differences
    }

    /// Checks what the runs need of the recipe: `swa_start` within the budget, the SWA run at least one
    /// budget long, a batch size and a budget above zero.
    pub fn validate(&self) -> Result<(), TrainError> {
        let invalid = |message: String| Err(TrainError::InvalidConfig(message));
        if self.budget == 0 || self.batch_size == 0 {
            return invalid(format!(
                "{}: budget {} and batch size {} must be positive",
                self.architecture, self.budget, self.batch_size
            ));
        }
        if self.swa_start == 0 || self.swa_start > self.budget {
            return invalid(format!(
                "swa_start {} must lie within the budget of {} epochs",
                self.swa_start, self.budget
            ));
        }
        if self.swa_epochs < self.budget {
            return invalid(format!(
                "the SWA run's {} epochs must be at least the budget of {}",
                self.swa_epochs, self.budget
            ));
        }
        Ok(())
    }

    /// The epochs at which the SWA run is evaluated for the table.
    pub fn swa_report_epochs(&self) -> Vec<usize> {
        let mut epochs = report_points(self.budget, self.swa_epochs).to_vec();
        epochs.dedup();
        epochs
    }

    /// The run configuration of one kind of run, with `seed` for its dropout masks.
    pub fn run_config(&self, kind: RunKind, seed: u64) -> Result<RunConfig, TrainError> {
        self.validate()?;
        let sgd = SgdConfig::momentum(self.weight_decay);
        let swa_schedule = Schedule::original_swa(self.lr_init, self.swa_lr, self.swa_start)
            .map_err(schedule_error("SWA schedule"))?;
        let config = match kind {
            RunKind::Sgd => RunConfig {
                epochs: self.budget,
                schedule: Schedule::original_sgd(self.lr_init, self.budget)
                    .map_err(schedule_error("SGD schedule"))?,
                snapshots: None,
                sgd,
                seed,
                swa_eval_epochs: Vec::new(),
                swa_eval_every: 0,
                test_every_iterations: 0,
                swag: None,
                holdout: self.holdout,
            },
            RunKind::Swa => RunConfig {
                epochs: self.swa_epochs,
                schedule: swa_schedule,
                snapshots: Some(Snapshots {
                    start_epoch: self.swa_start,
                    every: Period::Epochs(1),
                    usage: SnapshotUse::AverageWeights {
                        buffers: BufferPolicy::RecomputeLater,
                        rule: WeightRule::Equal,
                    },
                }),
                sgd,
                seed,
                swa_eval_epochs: self.swa_report_epochs(),
                swa_eval_every: self.swa_eval_every,
                test_every_iterations: 0,
                swag: self
                    .swag_max_rank
                    .map(|max_rank| SwagCollection { max_rank }),
                holdout: self.holdout,
            },
            RunKind::Fge => {
                let cycle = self.fge_cycle.max(2);
                let cycles_from = self.swa_start - 1;
                // Garipov et al. (2018) cycle between α1 and α2 = α1/100; α1 is half the initial rate.
                let alpha1 = 0.5 * self.lr_init;
                let triangular =
                    Schedule::triangular(alpha1, alpha1 / 100.0, Period::Epochs(cycle))
                        .map_err(schedule_error("FGE cycles"))?;
                RunConfig {
                    epochs: self.budget,
                    schedule: swa_schedule.then(cycles_from, triangular),
                    // The triangular cycle is lowest at its middle, after cycle/2 of its epochs.
                    snapshots: Some(Snapshots {
                        start_epoch: cycles_from + cycle / 2,
                        every: Period::Epochs(cycle),
                        usage: SnapshotUse::EnsemblePredictions,
                    }),
                    sgd,
                    seed,
                    swa_eval_epochs: Vec::new(),
                    swa_eval_every: 0,
                    test_every_iterations: self.fge_test_every,
                    swag: None,
                    holdout: self.holdout,
                }
            }
        };
        Ok(config)
    }
}

/// The file in a run's folder with its weights after the last epoch (PyTorch-loadable).
pub const FINAL_WEIGHTS_FILE: &str = "final.safetensors";
/// The file in an SWA run's folder with the average's weights, BatchNorm statistics recomputed.
pub const SWA_WEIGHTS_FILE: &str = "swa.safetensors";

/// The snapshot epochs of a run whose checkpoints are kept for the loss-surface figures
/// ([`crate::geometry`]): the first, the middle and the last three snapshots, which give the planes through
/// the first, middle and last points of a trajectory and through three consecutive FGE snapshots.
pub fn trajectory_epochs(config: &RunConfig) -> Vec<usize> {
    let snapshots = config.snapshot_epochs();
    let n = snapshots.len();
    let mut picked: Vec<usize> = [0, n / 2]
        .into_iter()
        .chain(n.saturating_sub(3)..n)
        .filter_map(|i| snapshots.get(i).copied())
        .collect();
    picked.sort_unstable();
    picked.dedup();
    picked
}

/// Where a run takes its first epochs from.
#[derive(Clone, Debug, PartialEq)]
pub struct Branch {
    /// The earlier run.
    pub from: RunKind,
    /// Its checkpoint folder.
    pub checkpoints: PathBuf,
    /// The leading epochs both train identically.
    pub epochs: usize,
}

/// One run of a seed, with what it shares with the seed's other runs.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedRun {
    /// Which run.
    pub kind: RunKind,
    /// Its configuration.
    pub config: RunConfig,
    /// Its folder: checkpoints in `checkpoints/` below it.
    pub dir: PathBuf,
    /// Epoch counts whose checkpoints are kept when newer ones are written: those later runs start from,
    /// and the snapshots of [`trajectory_epochs`].
    pub keep: Vec<usize>,
    /// An earlier run that trains this one's first epochs identically.
    pub branch: Option<Branch>,
}

/// How [`PlannedRun::start`] found a run.
#[derive(Clone, Debug, PartialEq)]
pub enum RunStart {
    /// Nothing to resume or branch from: training starts at epoch 0.
    Fresh,
    /// The run's own checkpoints hold this many epochs.
    Resumed {
        /// Epochs done.
        epochs: usize,
    },
    /// The run's first epochs were taken from an earlier run's checkpoint.
    Branched {
        /// The earlier run.
        from: RunKind,
        /// Epochs taken.
        epochs: usize,
        /// The checkpoint they came from.
        checkpoint: PathBuf,
    },
}

impl PlannedRun {
    /// Epochs this run takes from an earlier one instead of training them.
    pub fn taken_epochs(&self) -> usize {
        self.branch.as_ref().map_or(0, |b| b.epochs)
    }

    /// The folder of the run's checkpoints.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    /// A trainer for this run of `architecture` with `classes` classes, weights initialised from `seed`.
    pub fn trainer<B: Backend>(
        &self,
        backend: &B,
        architecture: Architecture,
        classes: usize,
        seed: u64,
    ) -> Result<Trainer<B>, TrainError> {
        let build = || -> Result<Box<dyn Module<B>>, TrainError> {
            Ok(architecture.build(backend, classes, seed)?)
        };
        Trainer::new(backend.clone(), self.config.clone(), build()?, build()?)
    }

    /// Points `trainer` at the run's checkpoints, keeping those later runs start from, and resumes from
    /// the latest; a run with none starts from its branch's checkpoint when that run has written it.
    /// `steps_per_epoch` is the data's, to check that the branch trains the same steps.
    pub fn start<B: Backend>(
        &self,
        trainer: &mut Trainer<B>,
        steps_per_epoch: usize,
    ) -> Result<RunStart, TrainError> {
        trainer.keep_checkpoints(self.keep.iter().copied());
        let done = trainer.with_checkpoints(self.checkpoint_dir())?;
        if done > 0 {
            return Ok(RunStart::Resumed { epochs: done });
        }
        let Some(branch) = &self.branch else {
            return Ok(RunStart::Fresh);
        };
        let found = find_checkpoints(&branch.checkpoints)?
            .into_iter()
            .find(|(epochs, _)| *epochs == branch.epochs);
        match found {
            Some((_, checkpoint)) => {
                let epochs = trainer.branch_from(&checkpoint, steps_per_epoch)?;
                Ok(RunStart::Branched {
                    from: branch.from,
                    epochs,
                    checkpoint,
                })
            }
            None => Ok(RunStart::Fresh),
        }
    }
}

/// The runs of one seed in the order given, under `seed_dir/<run>/`. Each run starts from the checkpoint
/// of the earlier run that shares the most leading epochs with it (SGD and SWA share the epochs before
/// their schedules' first decay; FGE shares the SWA run's epochs before its cycles), since training those
/// epochs again would give the same weights bit for bit.
pub fn plan_seed(
    recipe: &Recipe,
    runs: &[RunKind],
    seed: u64,
    steps_per_epoch: usize,
    seed_dir: &Path,
) -> Result<Vec<PlannedRun>, TrainError> {
    let mut plans: Vec<PlannedRun> = Vec::new();
    for &kind in runs {
        let config = recipe.run_config(kind, seed)?;
        let donor = plans
            .iter()
            .enumerate()
            .map(|(i, p)| (i, config.shared_epochs(&p.config, steps_per_epoch)))
            .filter(|&(_, shared)| shared > 0)
            .max_by_key(|&(i, shared)| (shared, std::cmp::Reverse(i)));
        let branch = donor.map(|(i, epochs)| {
            plans[i].keep.push(epochs);
            Branch {
                from: plans[i].kind,
                checkpoints: plans[i].checkpoint_dir(),
                epochs,
            }
        });
        plans.push(PlannedRun {
            kind,
            keep: trajectory_epochs(&config),
            config,
            dir: seed_dir.join(kind.name()),
            branch,
        });
    }
    Ok(plans)
}
