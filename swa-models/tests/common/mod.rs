//! What several test files share: building a named network, random inputs, fixtures stored under a
//! prefix, and the assertions on a finite-difference report.

#![allow(dead_code)] // each test file uses its own part

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swa_core::CpuBackend;
use swa_models::checkpoint::StateDict;
use swa_models::layers::gradcheck::GradCheckReport;
use swa_models::{Architecture, Module};

/// A named network of `Architecture::NAMED` (or any spelling it parses) on a 2-thread CPU backend.
pub fn build(name: &str, classes: usize) -> Box<dyn Module<CpuBackend>> {
    let backend = CpuBackend::with_threads(2);
    let architecture: Architecture = name.parse().unwrap_or_else(|e| panic!("{e}"));
    architecture
        .build(&backend, classes, 0)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `len` values uniform in [−1, 1), reproducible from `seed`.
pub fn random_input(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// Every gradient agrees with its finite difference; at least `min_entries` were compared; at most a
/// quarter needed a smaller step to agree (elements measured again with a smaller step sit on a ReLU or
/// max-pool kink; a wrong gradient would need the smaller step everywhere); and some gradient is large
/// enough that agreement means something (a check of all-zero gradients proves nothing).
pub fn assert_agrees(what: &str, report: &GradCheckReport, min_entries: usize) {
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "{what}: {} of {} gradients disagree (rtol {}, atol {}): {failures:#?}",
        failures.len(),
        report.entries.len(),
        report.rtol,
        report.atol
    );
    assert!(
        report.entries.len() >= min_entries,
        "{what}: only {} gradients compared",
        report.entries.len()
    );
    assert!(
        report.refined() * 4 <= report.entries.len(),
        "{what}: {} of {} gradients only agreed with a smaller step",
        report.refined(),
        report.entries.len()
    );
    assert!(
        report.entries.iter().any(|e| e.analytic.abs() > 1e-3),
        "{what}: every gradient is below 1e-3"
    );
    eprintln!(
        "{what}: {} gradients, largest difference {:.2e}, {} refined",
        report.entries.len(),
        report.max_abs_error(),
        report.refined()
    );
}

/// The entries `<prefix>.<key>` of a fixture as a state dict of `<key>`s (a PyTorch `state_dict` stored
/// under a prefix, BatchNorm statistics and batch counters included).
pub fn prefixed(io: &StateDict, prefix: &str) -> StateDict {
    let mut dict = StateDict::new();
    for (name, tensor) in io.iter() {
        if let Some(key) = name.strip_prefix(prefix).and_then(|k| k.strip_prefix('.')) {
            dict.insert(key, tensor.clone());
        }
    }
    assert!(!dict.is_empty(), "the fixture holds no `{prefix}.` entries");
    dict
}
