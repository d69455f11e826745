//! Bayesian model averaging over SWAG samples: at scale 0 every sample is the SWA mean and the average is
//! that one network's predictions exactly; a seed gives the same ensemble again; the samples differ
//! from each other; bad settings are refused with what was expected.

mod common;

use swa_core::swag::{Covariance, SwagMoments};
use swa_core::CpuBackend;
use swa_models::bn::update_bn;
use swa_models::evaluate::Ensemble;
use swa_models::swag::{bayesian_model_average, BmaConfig};
use swa_models::{HostBatch, Module, TrainError};

fn batches(seed: u64, count: usize, size: usize) -> Vec<HostBatch> {
    (0..count)
        .map(|b| HostBatch {
            images: common::random_input(seed + b as u64, size * 3 * 32 * 32),
            shape: [size, 3, 32, 32],
            labels: (0..size).map(|i| ((i + b) % 10) as u32).collect(),
        })
        .collect()
}

/// PreResNet-8's SWAG moments from three perturbed copies of its initial weights.
fn moments(backend: &CpuBackend, model: &mut dyn Module<CpuBackend>) -> SwagMoments<CpuBackend> {
    let perturb = |model: &mut dyn Module<CpuBackend>, seed: u64| {
        model.visit_tensors_mut(&mut |_, role, t| {
            if role == swa_core::params::TensorRole::Parameter {
                let noise = common::random_input(seed, t.iter().count());
                for (v, n) in t.iter_mut().zip(noise) {
                    *v += 0.05 * n;
                }
            }
        });
    };
    let mut moments = SwagMoments::new(backend, &*model, 20).expect("moments");
    for seed in [1, 2] {
        perturb(model, seed);
        moments.update(backend, &*model).expect("update");
    }
    moments
}

fn probabilities(ensemble: &Ensemble) -> Vec<f64> {
    ensemble.probabilities().to_vec()
}

#[test]
fn at_scale_zero_the_average_is_the_swa_networks_prediction() {
    let backend = CpuBackend::with_threads(2);
    let mut model = common::build("preresnet8", 10);
    let moments = moments(&backend, model.as_mut());
    let (bn, test) = (batches(100, 2, 8), batches(200, 2, 4));
    let config = BmaConfig {
        samples: 3,
        scale: 0.0,
        covariance: Covariance::LowRankPlusDiagonal,
        seed: 5,
    };
    let mut seen = Vec::new();
    let bma = bayesian_model_average(
        &backend,
        &moments,
        model.as_mut(),
        &bn,
        &test,
        &config,
        &mut |i, m| seen.push((i, m.count)),
    )
    .expect("BMA");
    assert_eq!(seen, vec![(0, 8), (1, 8), (2, 8)]);
    assert_eq!(bma.members(), 3);

    let mut swa = common::build("preresnet8", 10);
    moments
        .copy_mean_into(&backend, swa.as_mut())
        .expect("mean");
    update_bn(&backend, swa.as_mut(), &bn, 0).expect("BN");
    let mut single = Ensemble::new();
    single
        .add_member(&backend, swa.as_mut(), &test)
        .expect("evaluate");
    assert_eq!(probabilities(&bma), probabilities(&single));
    assert_eq!(bma.labels(), single.labels());
}

#[test]
fn a_seed_draws_the_same_ensemble_and_samples_differ() {
    let backend = CpuBackend::with_threads(2);
    let mut model = common::build("preresnet8", 10);
    let moments = moments(&backend, model.as_mut());
    let (bn, test) = (batches(100, 2, 8), batches(200, 1, 8));
    for covariance in [Covariance::Diagonal, Covariance::LowRankPlusDiagonal] {
        let config = BmaConfig {
            samples: 2,
            ..BmaConfig::paper(covariance, 9)
        };
        let mut losses = Vec::new();
        let first = bayesian_model_average(
            &backend,
            &moments,
            model.as_mut(),
            &bn,
            &test,
            &config,
            &mut |_, m| losses.push(m.loss),
        )
        .expect("BMA");
        let again = bayesian_model_average(
            &backend,
            &moments,
            model.as_mut(),
            &bn,
            &test,
            &config,
            &mut |_, _| {},
        )
        .expect("BMA");
        assert_eq!(
            probabilities(&first),
            probabilities(&again),
            "{covariance:?}"
        );
        assert_ne!(
            losses[0], losses[1],
            "{covariance:?}: two samples gave the same network"
        );
        let other_seed = BmaConfig { seed: 10, ..config };
        let other = bayesian_model_average(
            &backend,
            &moments,
            model.as_mut(),
            &bn,
            &test,
            &other_seed,
            &mut |_, _| {},
        )
        .expect("BMA");
        assert_ne!(
            probabilities(&first),
            probabilities(&other),
            "{covariance:?}"
        );
    }
}

#[test]
fn zero_samples_a_bad_scale_or_too_few_columns_are_refused() {
    let backend = CpuBackend::with_threads(1);
    let mut model = common::build("preresnet8", 10);
    let moments = moments(&backend, model.as_mut());
    let (bn, test) = (batches(100, 1, 2), batches(200, 1, 2));
    let run = |model: &mut dyn Module<CpuBackend>,
               moments: &SwagMoments<CpuBackend>,
               config: BmaConfig| {
        bayesian_model_average(
            &backend,
            moments,
            model,
            &bn,
            &test,
            &config,
            &mut |_, _| {},
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    let paper = BmaConfig::paper(Covariance::LowRankPlusDiagonal, 1);
    let message = run(
        model.as_mut(),
        &moments,
        BmaConfig {
            samples: 0,
            ..paper
        },
    );
    assert!(message.contains("at least one sample"), "{message}");
    let message = run(
        model.as_mut(),
        &moments,
        BmaConfig {
            scale: f32::NAN,
            ..paper
        },
    );
    assert!(message.contains("scale NaN"), "{message}");
    // One snapshot holds one deviation column: too few for the low-rank part.
    let single = SwagMoments::new(&backend, model.as_ref(), 20).expect("moments");
    let error = bayesian_model_average(
        &backend,
        &single,
        model.as_mut(),
        &bn,
        &test,
        &paper,
        &mut |_, _| {},
    );
    assert!(matches!(error, Err(TrainError::Swag(_))), "{error:?}");
}
