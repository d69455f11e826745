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
use swa_core::swag::{Covariance, SwagError, SwagMoments};

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
/// Sample `i` is [`SwagMoments::sample_into`] with the seed [`BmaConfig::sample_seed`]`(i)`.
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
    check_scale(config.scale)?;
    average_samples(
        backend,
        model,
        bn_batches,
        test_batches,
        config.samples,
        &mut |index, model| {
            let seed = config.sample_seed(index);
            moments.sample_into(backend, model, config.scale, config.covariance, seed)?;
            Ok(seed)
        },
        on_sample,
    )
}

/// [`bayesian_model_average`] over samples of given noise: sample `i` is
/// [`SwagMoments::sample_with_noise`] with `noise[i] = (z₁, z₂)` (the layout of
/// [`SwagMoments::draw_noise`]), so that the average can be checked against another implementation of
/// the paper's formulas, or drawn from a generator of the caller's. BatchNorm's recomputation for sample
/// `i` gets the seed `i`.
///
/// Fails as [`bayesian_model_average`] does, and with [`TrainError::Swag`] for noise of the wrong
/// length.
#[allow(clippy::too_many_arguments)]
pub fn bayesian_model_average_of_noise<B: Backend>(
    backend: &B,
    moments: &SwagMoments<B>,
    model: &mut dyn Module<B>,
    bn_batches: &[HostBatch],
    test_batches: &[HostBatch],
    scale: f32,
    covariance: Covariance,
    noise: &[(Vec<f32>, Vec<f32>)],
    on_sample: &mut dyn FnMut(usize, &Metrics),
) -> Result<Ensemble, TrainError> {
    check_scale(scale)?;
    average_samples(
        backend,
        model,
        bn_batches,
        test_batches,
        noise.len(),
        &mut |index, model| {
            let (z1, z2) = &noise[index];
            moments.sample_with_noise(backend, model, scale, covariance, z1, z2)?;
            Ok(index as u64)
        },
        on_sample,
    )
}

fn check_scale(scale: f32) -> Result<(), TrainError> {
    if scale.is_finite() && scale >= 0.0 {
        Ok(())
    } else {
        Err(TrainError::InvalidConfig(format!(
            "SWAG scale {scale} must be finite and at least 0"
        )))
    }
}

/// Writes sample `i` into the model and returns the seed of its BatchNorm pass.
type DrawSample<'a, B> = dyn FnMut(usize, &mut dyn Module<B>) -> Result<u64, SwagError> + 'a;

/// The loop of Algorithm 1: `draw(i, model)` writes sample `i` into the model and returns the seed of its
/// BatchNorm pass; the statistics are recomputed and the sample's predictions join the ensemble.
fn average_samples<B: Backend>(
    backend: &B,
    model: &mut dyn Module<B>,
    bn_batches: &[HostBatch],
    test_batches: &[HostBatch],
    samples: usize,
    draw: &mut DrawSample<'_, B>,
    on_sample: &mut dyn FnMut(usize, &Metrics),
) -> Result<Ensemble, TrainError> {
    if samples == 0 {
        return Err(TrainError::InvalidConfig(
            "Bayesian model averaging needs at least one sample (the paper draws 30)".into(),
        ));
    }
    let mut ensemble = Ensemble::new();
    for index in 0..samples {
        let seed = draw(index, model)?;
        update_bn(backend, model, bn_batches, seed)?;
        let metrics = ensemble.add_member(backend, model, test_batches)?;
        on_sample(index, &metrics);
    }
    Ok(ensemble)
}
