//! SWAG against the paper's formulas computed elsewhere: the moments collected from a trajectory, one
//! sample of each covariance from given noise, and the Bayesian model average with BatchNorm recomputed
//! per sample, all equal what NumPy (float64) and PyTorch (`swa_utils.update_bn`, softmax of the
//! eval-mode logits) compute for the same snapshots, noise and batches.
//!
//! The fixture comes from `tools/golden_swag.py`; regenerate it with
//!
//! ```text
//! /tmp/ref/bin/python swa-models/tools/make_golden.py --only swag
//! ```
//!
//! It holds five snapshots of a PyramidNet-8 (α = 3) on a random walk, the moments with a maximum rank of
//! three (so the ring of deviation columns has wrapped), three draws of standard normal noise, and
//! PyTorch's averaged probabilities on eight test images.
//!
//! Tolerances: the moments, differences of `f32` running means against float64 sums, agree to
//! [`MOMENT_TOLERANCE`] of each tensor's largest value. A sample agrees to [`SAMPLE_TOLERANCE`]: its
//! diagonal term goes through the variance `θ²‾ − θ̄²` of single-precision moments, which loses relative
//! precision where the variance is small against `θ̄²` (here the walk's steps are 2% of the weights, so
//! `σ` carries a relative error of a few 10⁻⁴, and the sample about 2·10⁻⁵ of the weights). A sample
//! without the paper's `1/√2` is off by at least 0.4% of every tensor's largest weight, forty times the
//! tolerance. Probabilities agree to
//! [`PROBABILITY_TOLERANCE`], the tolerance of the other golden tests against PyTorch.

mod common;

use std::path::PathBuf;

use swa_core::backend::Backend;
use swa_core::params::TensorRole;
use swa_core::swag::{Covariance, SwagMoments};
use swa_core::CpuBackend;
use swa_models::checkpoint::{StateDict, StoredTensor};
use swa_models::swag::bayesian_model_average_of_noise;
use swa_models::{Architecture, HostBatch, Module};

const NETWORK: &str = "pyramidnet8a3";
const CLASSES: usize = 10;
/// `SNAPSHOTS`, `MAX_RANK` and `SAMPLES` of golden_swag.py.
const SNAPSHOTS: usize = 5;
const MAX_RANK: usize = 3;
const SAMPLES: usize = 3;
/// `LOW_RANK_SCALE` and `DIAGONAL_SCALE` of golden_swag.py.
const LOW_RANK_SCALE: f32 = 1.0;
const DIAGONAL_SCALE: f32 = 0.5;
const BN_BATCHES: usize = 2;

const MOMENT_TOLERANCE: f64 = 2e-6;
const SAMPLE_TOLERANCE: f64 = 1e-4;
const PROBABILITY_TOLERANCE: f64 = 1e-4;

fn fixture() -> StateDict {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/golden_swag_{NETWORK}.safetensors"));
    StateDict::load(&path).expect("the SWAG fixture (see make_golden.py --only swag)")
}

fn floats<'a>(io: &'a StateDict, name: &str) -> &'a [f32] {
    match io.get(name) {
        Some(StoredTensor::F32 { values, .. }) => values,
        other => panic!("{}: `{name}` is {other:?}, expected f32", io.origin()),
    }
}

fn batch(io: &StateDict, prefix: &str, labels: Option<&str>) -> HostBatch {
    let (shape, images) = match io.get(&format!("{prefix}.input")) {
        Some(StoredTensor::F32 { shape, values }) => (shape, values),
        other => panic!("{prefix}.input is {other:?}"),
    };
    let count = shape[0];
    let labels = match labels.map(|name| io.get(name)) {
        Some(Some(StoredTensor::I64 { values, .. })) => values
            .iter()
            .map(|&l| u32::try_from(l).expect("labels are class indices"))
            .collect(),
        Some(other) => panic!("{prefix} labels are {other:?}"),
        // BatchNorm's batches need no labels; any will do.
        None => vec![0; count],
    };
    HostBatch {
        images: images.clone(),
        shape: shape
            .as_slice()
            .try_into()
            .expect("images are [n, c, h, w]"),
        labels,
    }
}

/// The largest absolute difference of two slices, and the largest magnitude of the wanted one.
fn worst_difference(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let difference = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - f64::from(w)).abs())
        .fold(0.0, f64::max);
    let magnitude = want.iter().map(|&w| f64::from(w).abs()).fold(0.0, f64::max);
    (difference, magnitude)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f64) {
    let (difference, magnitude) = worst_difference(got, want);
    assert!(
        difference <= tolerance * magnitude.max(1e-3),
        "{what}: differs by {difference:.3e}, more than {tolerance:e} of its largest value {magnitude:.3e}"
    );
}

/// The network and its SWAG moments collected from the fixture's snapshots, in order.
fn collected<B: Backend>(backend: &B, io: &StateDict) -> (Box<dyn Module<B>>, SwagMoments<B>) {
    let architecture: Architecture = NETWORK.parse().expect("architecture");
    // Another seed than PyTorch's: every parameter must come from the snapshots.
    let mut model = architecture.build(backend, CLASSES, 4321).expect("network");
    common::prefixed(io, "snapshot0")
        .copy_into_module(backend, model.as_mut())
        .expect("snapshot 0 loads");
    let mut moments = SwagMoments::new(backend, model.as_ref(), MAX_RANK).expect("moments");
    for i in 1..SNAPSHOTS {
        common::prefixed(io, &format!("snapshot{i}"))
            .copy_into_module(backend, model.as_mut())
            .expect("a snapshot loads");
        moments.update(backend, model.as_ref()).expect("update");
    }
    (model, moments)
}

/// The fixture's noise of sample `s` in the moments' order: `z₁` over the parameters in visiting order,
/// `z₂` over the columns, oldest first.
fn noise<B: Backend>(io: &StateDict, moments: &SwagMoments<B>, s: usize) -> (Vec<f32>, Vec<f32>) {
    let z1 = moments
        .names()
        .iter()
        .flat_map(|name| floats(io, &format!("z1.{s}.{name}")).iter().copied())
        .collect();
    (z1, floats(io, &format!("z2.{s}")).to_vec())
}

fn parameters<B: Backend>(backend: &B, model: &dyn Module<B>) -> Vec<(String, Vec<f32>)> {
    let mut values = Vec::new();
    model.visit_tensors(&mut |name, role, tensor| {
        if role == TensorRole::Parameter {
            values.push((name.to_owned(), backend.to_host(tensor).expect("read back")));
        }
    });
    values
}

#[test]
fn the_moments_are_the_papers_over_the_snapshots() {
    let backend = CpuBackend::with_threads(2);
    let io = fixture();
    let (_, moments) = collected(&backend, &io);
    assert_eq!(moments.count(), SNAPSHOTS as u64);
    assert_eq!(moments.rank(), MAX_RANK);
    let names = moments.names();
    assert!(names.len() > 20, "only {} parameter tensors", names.len());
    for name in names {
        let mean = backend
            .to_host(moments.mean(name).expect("mean"))
            .expect("read");
        assert_close(
            &format!("mean of {name}"),
            &mean,
            floats(&io, &format!("mean.{name}")),
            MOMENT_TOLERANCE,
        );
        let second = backend
            .to_host(moments.second_moment(name).expect("second moment"))
            .expect("read");
        assert_close(
            &format!("second moment of {name}"),
            &second,
            floats(&io, &format!("sq_mean.{name}")),
            MOMENT_TOLERANCE,
        );
        let want = floats(&io, &format!("deviations.{name}"));
        let columns = moments.deviations(name).expect("columns");
        assert_eq!(columns.len(), MAX_RANK);
        let numel = want.len() / MAX_RANK;
        for (j, column) in columns.into_iter().enumerate() {
            let got = backend.to_host(column).expect("read");
            // Compared with the snapshots' scale: a deviation is small against the weights it is the
            // difference of, and carries their rounding.
            let (difference, _) = worst_difference(&got, &want[j * numel..(j + 1) * numel]);
            let weights = mean.iter().map(|&v| f64::from(v).abs()).fold(0.0, f64::max);
            assert!(
                difference <= MOMENT_TOLERANCE * weights.max(1e-3),
                "column {j} of {name} differs by {difference:.3e} (weights up to {weights:.3e})"
            );
        }
    }
}

#[test]
fn a_sample_of_given_noise_is_the_papers_draw() {
    let backend = CpuBackend::with_threads(2);
    let io = fixture();
    let (mut model, moments) = collected(&backend, &io);
    for (key, scale, covariance) in [
        (
            "sample_low_rank",
            LOW_RANK_SCALE,
            Covariance::LowRankPlusDiagonal,
        ),
        ("sample_diagonal", DIAGONAL_SCALE, Covariance::Diagonal),
    ] {
        let (z1, mut z2) = noise(&io, &moments, 0);
        if covariance == Covariance::Diagonal {
            z2.clear();
        }
        moments
            .sample_with_noise(&backend, model.as_mut(), scale, covariance, &z1, &z2)
            .expect("sample");
        let mut moved = 0.0_f64;
        for (name, got) in parameters(&backend, model.as_ref()) {
            let want = floats(&io, &format!("{key}.{name}"));
            assert_close(&format!("{key} of {name}"), &got, want, SAMPLE_TOLERANCE);
            let (distance, _) = worst_difference(floats(&io, &format!("mean.{name}")), want);
            moved = moved.max(distance);
        }
        // The sample is not the mean: the comparison above saw the noise's term.
        assert!(
            moved > 1e-3,
            "{key}: moves no parameter by more than {moved:.2e}"
        );
    }
}

#[test]
fn the_bayesian_model_average_equals_pytorchs() {
    let backend = CpuBackend::with_threads(2);
    let io = fixture();
    let (mut model, moments) = collected(&backend, &io);
    let bn: Vec<HostBatch> = (0..BN_BATCHES)
        .map(|j| batch(&io, &format!("bn{j}"), None))
        .collect();
    let test = vec![batch(&io, "test", Some("test.labels"))];
    let noise: Vec<_> = (0..SAMPLES).map(|s| noise(&io, &moments, s)).collect();
    let mut members = Vec::new();
    let ensemble = bayesian_model_average_of_noise(
        &backend,
        &moments,
        model.as_mut(),
        &bn,
        &test,
        LOW_RANK_SCALE,
        Covariance::LowRankPlusDiagonal,
        &noise,
        &mut |index, metrics| members.push((index, metrics.accuracy)),
    )
    .expect("the average");
    assert_eq!(members.len(), SAMPLES);
    assert_eq!(ensemble.members(), SAMPLES);
    assert_eq!(ensemble.classes(), CLASSES);
    let got: Vec<f32> = ensemble.probabilities().iter().map(|&p| p as f32).collect();
    let want = floats(&io, "bma.probabilities");
    let (difference, _) = worst_difference(&got, want);
    eprintln!(
        "Bayesian model average: largest difference from PyTorch's probabilities {difference:.2e}"
    );
    assert!(
        difference <= PROBABILITY_TOLERANCE,
        "averaged probabilities differ from PyTorch's by {difference:.3e}"
    );
    // The average is of different networks: a member alone is not it.
    let (spread, _) = worst_difference(floats(&io, "bma.member0.probabilities"), want);
    assert!(
        spread > 10.0 * PROBABILITY_TOLERANCE,
        "members barely differ ({spread:.2e})"
    );
}
