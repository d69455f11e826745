//! SWAG on the GPU equals SWAG on the CPU reference: the moments collected from the same snapshots, the
//! draws of a seed (the noise is drawn on the host, so both backends add the same `z₁, z₂`), a checkpoint
//! of the moments, and a Bayesian model average with BatchNorm recomputed per sample.
//!
//! Tolerance: each op agrees to ~1e-6 relative (see `ops.rs`); the moments are a few such ops per
//! snapshot and agree to `1e-5` of a tensor's largest value, samples to `1e-4` (the variance is a
//! difference of two moments and loses relative precision, on both backends alike), probabilities of
//! the average, through the network's layers, to `1e-4`.

mod common;

use common::*;
use swa_core::backend::prelude::*;
use swa_core::params::{NamedTensors, TensorRole};
use swa_core::swag::{Covariance, SwagMoments, SwagState};
use swa_models::swag::{bayesian_model_average, BmaConfig};
use swa_models::{Architecture, HostBatch, Module};

const NETWORK: &str = "pyramidnet8a3";
const CLASSES: usize = 10;
const SNAPSHOTS: usize = 5;
const MAX_RANK: usize = 3;

fn network<B: Backend>(b: &B) -> Box<dyn Module<B>> {
    let architecture: Architecture = NETWORK.parse().expect("architecture");
    architecture.build(b, CLASSES, 21).expect("network")
}

/// Moves every parameter by 2% of a uniform draw of `seed`, through the host: the same snapshot on
/// both backends.
fn perturb<B: Backend>(b: &B, model: &mut dyn Module<B>, seed: u64) {
    let mut offset = 0u64;
    model.visit_tensors_mut(&mut |_, role, tensor| {
        if role == TensorRole::Parameter {
            let mut values = b.to_host(tensor).expect("read back");
            let steps = random(seed + offset, values.len());
            for (v, r) in values.iter_mut().zip(steps) {
                *v += 0.02 * r;
            }
            offset += 1000;
            *tensor = b.from_host(&values, tensor.dims()).expect("upload");
        }
    });
}

fn collect<B: Backend>(b: &B, model: &mut dyn Module<B>) -> SwagMoments<B> {
    let mut moments = SwagMoments::new(b, &*model, MAX_RANK).expect("moments");
    for i in 1..SNAPSHOTS {
        perturb(b, model, 100 * i as u64);
        moments.update(b, &*model).expect("update");
    }
    moments
}

fn parameters<B: Backend>(b: &B, model: &dyn NamedTensors<B>) -> Vec<(String, Vec<f32>)> {
    let mut values = Vec::new();
    model.visit_tensors(&mut |name, role, tensor| {
        if role == TensorRole::Parameter {
            values.push((name.to_owned(), b.to_host(tensor).expect("read back")));
        }
    });
    values
}

fn assert_agrees(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tolerance * scale,
        "{what}: GPU and CPU differ by {worst:.3e} (largest value {scale:.3e})"
    );
}

fn assert_states_agree(got: &SwagState, want: &SwagState) {
    assert_eq!(got.n_models, want.n_models);
    assert_eq!(got.max_rank, want.max_rank);
    assert_eq!(got.next_column, want.next_column);
    assert_eq!(got.tensors.len(), want.tensors.len());
    for (g, w) in got.tensors.iter().zip(&want.tensors) {
        assert_eq!((&g.name, &g.shape), (&w.name, &w.shape));
        assert_agrees(&format!("mean of {}", g.name), &g.mean, &w.mean, 1e-5);
        assert_agrees(
            &format!("second moment of {}", g.name),
            &g.sq_mean,
            &w.sq_mean,
            1e-5,
        );
        assert_eq!(g.columns.len(), w.columns.len());
        for (j, (gc, wc)) in g.columns.iter().zip(&w.columns).enumerate() {
            // A deviation is small against the weights it is the difference of.
            let weights = w.mean.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let worst = gc
                .iter()
                .zip(wc)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst <= 1e-5 * weights,
                "column {j} of {}: differs by {worst:.3e}",
                g.name
            );
        }
    }
}

#[test]
fn moments_samples_and_checkpoints_agree_with_the_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let (mut on_gpu, mut on_cpu) = (network(&g), network(&c));
    let (gpu_moments, cpu_moments) = (collect(&g, on_gpu.as_mut()), collect(&c, on_cpu.as_mut()));
    let cpu_state = cpu_moments.to_state(&c).expect("CPU state");
    assert_eq!(cpu_state.n_models, SNAPSHOTS as u64);
    assert_states_agree(&gpu_moments.to_state(&g).expect("GPU state"), &cpu_state);

    for (covariance, scale) in [
        (Covariance::LowRankPlusDiagonal, 1.0),
        (Covariance::Diagonal, 0.5),
    ] {
        gpu_moments
            .sample_into(&g, on_gpu.as_mut(), scale, covariance, 7)
            .expect("GPU sample");
        cpu_moments
            .sample_into(&c, on_cpu.as_mut(), scale, covariance, 7)
            .expect("CPU sample");
        let want = parameters(&c, on_cpu.as_ref());
        for ((name, got), (_, want)) in parameters(&g, on_gpu.as_ref()).iter().zip(&want) {
            assert_agrees(&format!("{covariance:?} sample of {name}"), got, want, 1e-4);
        }
    }

    // The moments restored on the GPU from the CPU's checkpoint continue as the CPU's do.
    let mut restored = SwagMoments::from_state(&g, &cpu_state).expect("restore on the GPU");
    let mut continued = SwagMoments::from_state(&c, &cpu_state).expect("restore on the CPU");
    perturb(&g, on_gpu.as_mut(), 900);
    perturb(&c, on_cpu.as_mut(), 900);
    restored.update(&g, on_gpu.as_ref()).expect("GPU update");
    continued.update(&c, on_cpu.as_ref()).expect("CPU update");
    assert_states_agree(
        &restored.to_state(&g).expect("GPU state"),
        &continued.to_state(&c).expect("CPU state"),
    );
}

/// The probabilities of a Bayesian model average over the moments [`collect`] gathers.
fn averaged_probabilities<B: Backend>(
    b: &B,
    bn: &[HostBatch],
    test: &[HostBatch],
    config: &BmaConfig,
) -> Vec<f64> {
    let mut model = network(b);
    let moments = collect(b, model.as_mut());
    bayesian_model_average(
        b,
        &moments,
        model.as_mut(),
        bn,
        test,
        config,
        &mut |_, _| {},
    )
    .expect("the average")
    .probabilities()
    .to_vec()
}

#[test]
fn a_bayesian_model_average_agrees_with_the_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let batches = |seed: u64| -> Vec<HostBatch> {
        (0..2)
            .map(|j| HostBatch {
                images: random(seed + j, 4 * 3 * 32 * 32),
                shape: [4, 3, 32, 32],
                labels: (0..4)
                    .map(|i| ((i + j as usize) % CLASSES) as u32)
                    .collect(),
            })
            .collect()
    };
    let (bn, test) = (batches(500), batches(600));
    let config = BmaConfig {
        samples: 2,
        scale: 1.0,
        covariance: Covariance::LowRankPlusDiagonal,
        seed: 3,
    };
    let gpu_probabilities = averaged_probabilities(&g, &bn, &test, &config);
    let cpu_probabilities = averaged_probabilities(&c, &bn, &test, &config);
    let to_f32 = |p: &[f64]| p.iter().map(|&v| v as f32).collect::<Vec<_>>();
    let want = to_f32(&cpu_probabilities);
    assert_eq!(want.len(), 8 * CLASSES);
    let got = to_f32(&gpu_probabilities);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "probabilities differ by {worst:.3e}");
}
