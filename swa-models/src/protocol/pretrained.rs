//! SWA from pretrained weights: the paper's ImageNet protocol (Izmailov et al. 2018, Section 5.2).
//!
//! Starting from a network trained conventionally (torchvision's ResNet-50, ResNet-152 and DenseNet-161),
//! SWA runs a few more epochs under the cyclical learning rate of the paper's eq. (1), one cycle per epoch
//! from `α1 = 10⁻³` down to `α2 = 10⁻⁵`, and averages the weights at the end of every cycle, where the
//! learning rate is lowest. The paper uses the same hyper-parameters for all three networks, runs SWA
//! for 10 epochs and reports the average after 5 and after 10, with BatchNorm statistics recomputed.
//!
//! As in the paper's Algorithm 1 (`w_SWA ← ŵ`, then `w_SWA ← (n·w_SWA + w)/(n + 1)` at each cycle's end),
//! the pretrained weights are the average's first member:
//! [`Trainer::average_current_weights`](crate::train::Trainer::average_current_weights) takes them
//! before the first epoch. Weight decay, momentum and batch size are not stated for this experiment;
//! the recipe takes torchvision's ImageNet training values (weight decay 10⁻⁴, momentum 0.9, batch 256).

use std::path::Path;

use swa_core::averaging::{BufferPolicy, WeightRule};
use swa_core::backend::Backend;
use swa_core::schedule::{Period, Schedule};

use crate::checkpoint::load_module;
use crate::error::TrainError;
use crate::module::Module;
use crate::nets::Architecture;
use crate::optim::SgdConfig;
use crate::train::{RunConfig, SnapshotUse, Snapshots, Trainer};

/// SWA from pretrained weights: how long, how fast, and when the average is reported.
#[derive(Clone, Debug, PartialEq)]
pub struct PretrainedSwa {
    /// The network the weights are for.
    pub architecture: Architecture,
    /// Epochs of SWA (10 in the paper).
    pub epochs: usize,
    /// The learning rate each one-epoch cycle starts from (`α1`).
    pub alpha1: f32,
    /// The learning rate of each cycle's last step, where the weights are averaged (`α2`).
    pub alpha2: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// Batch size.
    pub batch_size: usize,
    /// Epoch counts after which the average is evaluated, BatchNorm recomputed (5 and 10 in the paper);
    /// the last epoch is always evaluated.
    pub report_epochs: Vec<usize>,
}

impl PretrainedSwa {
    /// The paper's ImageNet protocol for `architecture`.
    pub fn paper(architecture: Architecture) -> Self {
        PretrainedSwa {
            architecture,
            epochs: 10,
            alpha1: 1e-3,
            alpha2: 1e-5,
            weight_decay: 1e-4,
            batch_size: 256,
            report_epochs: vec![5, 10],
        }
    }

    /// Checks the recipe: at least one epoch and one image per batch, learning rates that a cyclical
    /// schedule accepts, report epochs within the run.
    pub fn validate(&self) -> Result<(), TrainError> {
        let invalid = |message: String| Err(TrainError::InvalidConfig(message));
        if self.epochs == 0 || self.batch_size == 0 {
            return invalid(format!(
                "SWA from pretrained {}: {} epochs and batch size {} must be positive",
                self.architecture, self.epochs, self.batch_size
            ));
        }
        if let Some(&late) = self
            .report_epochs
            .iter()
            .find(|&&e| e == 0 || e > self.epochs)
        {
            return invalid(format!(
                "report epoch {late} lies outside the run's epochs 1..={}",
                self.epochs
            ));
        }
        self.schedule()?;
        Ok(())
    }

    /// The cyclical schedule: one cycle per epoch from `α1` to `α2`.
    pub fn schedule(&self) -> Result<Schedule, TrainError> {
        Schedule::cyclic(self.alpha1, self.alpha2, Period::Epochs(1))
            .map_err(|e| TrainError::InvalidConfig(format!("SWA cycles: {e}")))
    }

    /// The run: the cyclical schedule, a snapshot at the end of every epoch blended into an equal-weight
    /// average whose BatchNorm statistics are recomputed before it is evaluated at `report_epochs`.
    /// `seed` draws the dropout masks, if the network has any.
    pub fn run_config(&self, seed: u64) -> Result<RunConfig, TrainError> {
        self.validate()?;
        Ok(RunConfig {
            epochs: self.epochs,
            schedule: self.schedule()?,
            snapshots: Some(Snapshots {
                start_epoch: 0,
                every: Period::Epochs(1),
                usage: SnapshotUse::AverageWeights {
                    buffers: BufferPolicy::RecomputeLater,
                    rule: WeightRule::Equal,
                },
            }),
            sgd: SgdConfig::momentum(self.weight_decay),
            seed,
            swa_eval_epochs: self.report_epochs.clone(),
            swa_eval_every: 0,
            test_every_iterations: 0,
            swag: None,
            holdout: 0,
        })
    }

    /// The network of this recipe for `classes` classes with the pretrained `weights` loaded
    /// (safetensors, or PyTorch's `.pth` as torchvision ships them). A file of another network, or for
    /// another number of classes, is refused with the missing, unexpected or mis-shaped tensors named.
    pub fn pretrained_network<B: Backend>(
        &self,
        backend: &B,
        weights: &Path,
        classes: usize,
    ) -> Result<Box<dyn Module<B>>, TrainError> {
        let mut network = self.architecture.build(backend, classes, 0)?;
        load_module(backend, network.as_mut(), weights)?;
        Ok(network)
    }

    /// The SWA run from `weights`: a [`Trainer`] of [`PretrainedSwa::run_config`] writing its checkpoints
    /// into `checkpoints`, resumed from the latest one there; a run that starts afresh starts its average
    /// from the pretrained weights (Algorithm 1). Returns the trainer and the epochs already done.
    pub fn trainer<B: Backend>(
        &self,
        backend: &B,
        weights: &Path,
        classes: usize,
        seed: u64,
        checkpoints: &Path,
    ) -> Result<(Trainer<B>, usize), TrainError> {
        let model = self.pretrained_network(backend, weights, classes)?;
        let eval_model = self.architecture.build(backend, classes, 0)?;
        let mut trainer = Trainer::new(backend.clone(), self.run_config(seed)?, model, eval_model)?;
        let done = trainer.with_checkpoints(checkpoints)?;
        if done == 0 {
            trainer.average_current_weights()?;
        }
        Ok((trainer, done))
    }
}
