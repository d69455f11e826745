//! Shake-Shake (and its shake mixing) and PyramidNet against the PyTorch definitions of
//! `xtask/torch/cifar_networks.py`: tensor names, shapes and parameter counts, the published sizes, the
//! coefficient draws, and finite-difference gradients. The golden forward and gradient tests against PyTorch are in
//! `golden_forward.rs`.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swa_core::backend::HasShape;
use swa_core::CpuBackend;
use swa_models::layers::gradcheck::{check_gradients, GradCheckConfig};
use swa_models::layers::{
    shake_coefficients, AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, Flatten, Linear, ReLU,
    Sequential, ShakeBackward, ShakeBlock, ShakeForward, ShakeMix,
};
use swa_models::module::parameter_count;
use swa_models::{Architecture, ForwardMode, Module, Network, NetworkConfig};

/// One network of `tests/fixtures/cifar_networks_shapes.json`.
#[derive(serde::Deserialize)]
struct TorchNetwork {
    /// For 10 and 100 classes.
    parameters: [usize; 2],
    /// For 10 classes: name, shape, dtype.
    state_dict: Vec<(String, Vec<usize>, String)>,
}

fn torch_networks() -> BTreeMap<String, TorchNetwork> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cifar_networks_shapes.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn build(name: &str, classes: usize) -> Box<dyn Module<CpuBackend>> {
    let backend = CpuBackend::with_threads(2);
    let architecture: Architecture = name.parse().unwrap_or_else(|e| panic!("{e}"));
    architecture
        .build(&backend, classes, 0)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn tensors_and_counts_equal_the_pytorch_definition() {
    let table = torch_networks();
    assert_eq!(table.len(), 5, "networks in the table");
    for (name, torch) in &table {
        let net = build(name, 10);
        let mut ours = Vec::new();
        net.visit_tensors(&mut |n, _, t| ours.push((n.to_string(), t.dims().to_vec())));
        let float: Vec<(String, Vec<usize>)> = torch
            .state_dict
            .iter()
            .filter(|(_, _, dtype)| dtype == "float32")
            .map(|(n, s, _)| (n.clone(), s.clone()))
            .collect();
        assert_eq!(ours, float, "{name}: tensors in state_dict order");
        let mut counters = Vec::new();
        net.visit_batch_counters(&mut |n, _| counters.push(n.to_string()));
        let torch_counters: Vec<String> = torch
            .state_dict
            .iter()
            .filter(|(_, _, dtype)| dtype == "int64")
            .map(|(n, _, _)| n.clone())
            .collect();
        assert_eq!(counters, torch_counters, "{name}: batch counters");
        for (classes, want) in [10, 100].into_iter().zip(torch.parameters) {
            assert_eq!(
                parameter_count(build(name, classes).as_ref()),
                want,
                "{name} with {classes} classes"
            );
        }
    }
}

/// The sizes the papers publish, in millions, rounded as published: Shake-Shake (Gastaldi 2017, Table 1)
/// and PyramidNet (Han et al. 2017, Table 4, CIFAR-10).
#[test]
fn sizes_are_the_published_ones() {
    for (name, millions) in [
        ("shakeshake26-2x32d", 2.9),
        ("shakeshake26-2x64d", 11.7),
        ("shakeshake26-2x96d", 26.2),
        ("pyramidnet110a48", 1.7),
        ("pyramidnet272a200-bottleneck", 26.0),
    ] {
        let count = parameter_count(build(name, 10).as_ref());
        let rounded = (count as f64 / 1e5).round() / 10.0;
        assert_eq!(rounded, millions, "{name}: {count} parameters");
    }
}

#[test]
fn shake_coefficients_are_uniform_independent_and_reproducible() {
    let (alpha, beta) = shake_coefficients(3, 5, 4096);
    assert_eq!((alpha.len(), beta.len()), (4096, 4096));
    assert_eq!(
        shake_coefficients(3, 5, 4096),
        (alpha.clone(), beta.clone())
    );
    // The first images of a larger batch draw what a smaller batch draws.
    assert_eq!(shake_coefficients(3, 5, 3).0, alpha[..3]);
    assert_ne!(shake_coefficients(4, 5, 4096).0, alpha, "another step");
    assert_ne!(shake_coefficients(3, 6, 4096).0, alpha, "another block");
    for values in [&alpha, &beta] {
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }
    let correlation = alpha
        .iter()
        .zip(&beta)
        .map(|(a, b)| (a - 0.5) * (b - 0.5))
        .sum::<f32>()
        / alpha.len() as f32
        * 12.0;
    assert!(correlation.abs() < 0.05, "α and β correlate: {correlation}");
}

#[test]
fn each_mixing_rule_picks_its_coefficients() {
    let backend = CpuBackend::with_threads(1);
    let mut rng = StdRng::seed_from_u64(1);
    let train = ForwardMode::Train { seed: 9 };
    let (alpha, beta) = shake_coefficients(9, 2, 3);
    let even = vec![0.5; 3];
    for (forward, backward, want) in [
        (ShakeForward::Shake, ShakeBackward::Shake, (&alpha, &beta)),
        (ShakeForward::Shake, ShakeBackward::Keep, (&alpha, &alpha)),
        (ShakeForward::Shake, ShakeBackward::Even, (&alpha, &even)),
        (ShakeForward::Even, ShakeBackward::Keep, (&even, &even)),
    ] {
        let mix = ShakeMix { forward, backward };
        let block = ShakeBlock::new(&backend, 2, 2, 1, mix, 2, &mut rng).unwrap();
        assert_eq!(
            block.coefficients(train, 3),
            (want.0.clone(), want.1.clone())
        );
        // Evaluation mixes evenly whatever the rule.
        assert_eq!(block.coefficients(ForwardMode::Eval, 3).0, even);
    }
}

fn random_input(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// Shake-Keep blocks (the backward pass the exact gradient of the forward pass) with both shortcuts: the
/// two-path projection with a stride (and with stride 1 and a change of width), and the identity.
#[test]
fn shake_blocks_have_correct_gradients_with_the_coefficients_kept() {
    let backend = CpuBackend::with_threads(2);
    let mut rng = StdRng::seed_from_u64(31);
    let keep = ShakeMix::SHAKE_KEEP;
    let stem = Conv2dConfig::new(3, 4, 3).padding(1).bias(false);
    let mut net = Sequential::new();
    net.push_named("conv1", Conv2d::new(&backend, stem, &mut rng).unwrap());
    net.push_named("bn1", BatchNorm2d::new(&backend, 4).unwrap());
    let widen = ShakeBlock::new(&backend, 4, 6, 1, keep, 0, &mut rng).unwrap();
    let down = ShakeBlock::new(&backend, 6, 8, 2, keep, 1, &mut rng).unwrap();
    let same = ShakeBlock::new(&backend, 8, 8, 1, keep, 2, &mut rng).unwrap();
    assert!(widen.has_projection() && down.has_projection() && !same.has_projection());
    net.push_named("widen", widen);
    net.push_named("down", down);
    net.push_named("same", same);
    net.push_named("relu", ReLU::new());
    net.push_named("avgpool", AvgPool2d::new(4).unwrap());
    net.push_named("flatten", Flatten::new());
    net.push_named("fc", Linear::new(&backend, 8, 3, &mut rng).unwrap());

    let shape = [3, 3, 8, 8];
    let x = random_input(32, 3 * 3 * 64);
    let config = GradCheckConfig {
        input_samples: 32,
        param_samples: 2,
        ..Default::default()
    };
    let report = check_gradients(&backend, &mut net, &x, &shape, true, &config).unwrap();
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "{} of {} gradients disagree: {failures:#?}",
        failures.len(),
        report.entries.len()
    );
    assert!(
        report.refined() * 4 <= report.entries.len(),
        "{} of {} gradients only agreed with a smaller step",
        report.refined(),
        report.entries.len()
    );
    eprintln!(
        "Shake-Keep blocks: {} gradients, largest difference {:.2e}, {} refined",
        report.entries.len(),
        report.max_abs_error(),
        report.refined()
    );
    let mut names = Vec::new();
    net.visit_params_mut(&mut |name, _| names.push(name.to_string()));
    for name in &names {
        assert!(report.count(name) > 0, "{name} was not checked");
    }
    for name in [
        "widen.shortcut.conv1.weight",
        "down.shortcut.conv2.weight",
        "down.shortcut.bn.weight",
        "same.branch2.4.weight",
    ] {
        assert!(names.iter().any(|n| n == name), "no {name}");
    }
    assert!(report.entries.iter().any(|e| e.analytic.abs() > 1e-3));
}

/// PyramidNet at its smallest, back to the input: zero-padded, pooled and identity shortcuts.
#[test]
fn pyramidnets_have_correct_gradients() {
    let backend = CpuBackend::with_threads(2);
    let shape = [2, 3, 32, 32];
    let x = random_input(33, 2 * 3 * 32 * 32);
    for name in ["pyramidnet8a3", "pyramidnet11a8-bottleneck"] {
        let config = NetworkConfig {
            architecture: name.parse().unwrap(),
            classes: 4,
        };
        let mut net = Network::new(&backend, &config, 5).unwrap();
        net.require_input_grad(true);
        let check = GradCheckConfig {
            input_samples: 12,
            param_samples: 1,
            ..Default::default()
        };
        let report = check_gradients(&backend, &mut net, &x, &shape, true, &check).unwrap();
        let failures = report.failures();
        assert!(
            failures.is_empty(),
            "{name}: {} of {} gradients disagree: {failures:#?}",
            failures.len(),
            report.entries.len()
        );
        assert!(report.entries.len() >= 20, "{name}: too few gradients");
        assert!(
            report.refined() * 4 <= report.entries.len(),
            "{name}: refined"
        );
        assert!(report.entries.iter().any(|e| e.analytic.abs() > 1e-3));
        eprintln!(
            "{name}: {} gradients, largest difference {:.2e}",
            report.entries.len(),
            report.max_abs_error()
        );
    }
}
