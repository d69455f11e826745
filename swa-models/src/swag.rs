//! Bayesian model averaging with SWAG: networks drawn from the Gaussian that
//! [`SwagMoments`] fits to an SWA run's snapshots, each with its BatchNorm statistics recomputed, their
//! predicted probabilities averaged (Maddox et al., 2019, *A Simple Baseline for Bayesian Uncertainty in
//! Deep Learning*, Algorithm 1).
//!
//! The moments come from a trainer configured with [`RunConfig::swag`](crate::train::RunConfig::swag)
//! ([`Trainer::swag`](crate::train::Trainer::swag), or a checkpoint through
//! [`load_swag_moments`](crate::train::load_swag_moments)). [`bayesian_model_average`] returns an
//! [`Ensemble`] of the samples' predictions, whose probabilities [`crate::calibration`] scores.
//!
//! # Scale
//!
//! [`SwagMoments::sample_into`]'s `scale` multiplies the covariance. The SWAG authors' experiments sample
//! with their `scale = 0.5`, which is the paper's sampling identity for SWAG (this crate's scale 1 with
//! [`Covariance::LowRankPlusDiagonal`]) and half the diagonal covariance for SWAG-Diagonal (this crate's
//! scale 0.5 with [`Covariance::Diagonal`]); [`BmaConfig::paper`] sets these.

use swa_core::backend::Backend;
use swa_core::seed::splitmix64_mix;
use swa_core::swag::{Covariance, SwagMoments};

use crate::batch::HostBatch;
use crate::bn::update_bn;
use crate::error::TrainError;
use crate::evaluate::{Ensemble, Metrics};
use crate::module::Module;

/// The number of networks the SWAG paper draws for a Bayesian model average (`S = 30`).
pub const PAPER_SAMPLES: usize = 30;

/// How a Bayesian model average draws its networks.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BmaConfig {
    /// Networks drawn (the paper's `S`, 30).
    pub samples: usize,
    /// The factor on the covariance ([`SwagMoments::sample_into`]).
    pub scale: f32,
    /// SWAG or SWAG-Diagonal.
    pub covariance: Covariance,
    /// Seed of the draws: sample `i` is drawn with a seed mixed from this and `i`.
    pub seed: u64,
}

impl BmaConfig {
    /// The SWAG authors' setting for `covariance`: 30 samples at their scale 0.5 (see the
    /// [module documentation](self)).
    pub fn paper(covariance: Covariance, seed: u64) -> Self {
        let scale = match covariance {
            Covariance::LowRankPlusDiagonal => 1.0,
            Covariance::Diagonal => 0.5,
        };
        BmaConfig {
            samples: PAPER_SAMPLES,
            scale,
            covariance,
            seed,
        }
    }

    /// The seed of sample `index`.
    pub fn sample_seed(&self, index: usize) -> u64 {
        splitmix64_mix(splitmix64_mix(self.seed ^ 0x5357_4147) ^ index as u64)
    }
}

/// Draws `config.samples` networks from `moments` into `model`, recomputes each one's BatchNorm
/// statistics on `bn_batches` ([`update_bn`]), and averages their predicted probabilities on
/// `test_batches`. `on_sample(i, metrics)` is called after sample `i` with that network's own test
/// metrics. `model` is left holding the last sample.
///
/// Fails with [`TrainError::InvalidConfig`] for zero samples or a scale that is negative or not finite,
/// and with [`TrainError::Swag`] when the moments do not fit the model or hold too few columns for the
/// covariance.
pub fn bayesian_model_average<B: Backend>(
    backend: &B,
    moments: &SwagMoments<B>,
    model: &mut dyn Module<B>,
    bn_batches: &[HostBatch],
    test_batches: &[HostBatch],
    config: &BmaConfig,
    on_sample: &mut dyn FnMut(usize, &Metrics),
) -> Result<Ensemble, TrainError> {
    if config.samples == 0 {
        return Err(TrainError::InvalidConfig(
            "Bayesian model averaging needs at least one sample (the paper draws 30)".into(),
        ));
    }
    if !(config.scale.is_finite() && config.scale >= 0.0) {
        return Err(TrainError::InvalidConfig(format!(
            "SWAG scale {} must be finite and at least 0",
            config.scale
        )));
    }
    let mut ensemble = Ensemble::new();
    for index in 0..config.samples {
        let seed = config.sample_seed(index);
        moments.sample_into(backend, model, config.scale, config.covariance, seed)?;
        update_bn(backend, model, bn_batches, seed)?;
        let metrics = ensemble.add_member(backend, model, test_batches)?;
        on_sample(index, &metrics);
    }
    Ok(ensemble)
}
