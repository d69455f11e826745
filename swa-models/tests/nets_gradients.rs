//! Finite-difference checks of whole networks in training mode: BatchNorm with batch statistics, both kinds
//! of residual block, dropout with a fixed seed, pooling and the classifier, back to the input.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swa_core::CpuBackend;
use swa_models::layers::gradcheck::{check_gradients, GradCheckConfig, GradCheckReport};
use swa_models::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, Dropout, Flatten, Linear, MaxPool2d,
    ReLU, Residual, Sequential,
};
use swa_models::{Architecture, Module, Network, NetworkConfig};

fn random_input(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

fn assert_agrees(what: &str, report: &GradCheckReport, min_entries: usize) {
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "{what}: {} of {} gradients disagree: {failures:#?}",
        failures.len(),
        report.entries.len()
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
    assert!(report.entries.iter().any(|e| e.analytic.abs() > 1e-3));
}

/// A small network on 8×8 images with every layer kind of the paper's networks.
fn small_network(backend: &CpuBackend) -> Sequential<CpuBackend> {
    let mut rng = StdRng::seed_from_u64(21);
    let conv = Conv2dConfig::new(3, 4, 3)
        .padding(1)
        .bias(false)
        .init(ConvInit::HeNormalFanOut);
    let mut net = Sequential::new();
    net.push_named("conv1", Conv2d::new(backend, conv, &mut rng).unwrap());
    net.push_named("bn0", BatchNorm2d::new(backend, 4).unwrap());
    net.push_named("relu0", ReLU::new());
    let basic = Residual::preact_basic(backend, 4, 4, 1, &mut rng).unwrap();
    net.push_named("basic", basic);
    let bottleneck = Residual::preact_bottleneck(backend, 4, 2, 2, &mut rng).unwrap();
    net.push_named("bottleneck", bottleneck);
    let wide = Residual::wide_basic(backend, 8, 6, 1, 0.25, 0, &mut rng).unwrap();
    net.push_named("wide", wide);
    net.push_named("pool", MaxPool2d::new(2, 2).unwrap());
    net.push_named("bn", BatchNorm2d::new(backend, 6).unwrap());
    net.push_named("relu", ReLU::new());
    net.push_named("avgpool", AvgPool2d::new(2).unwrap());
    net.push_named("flatten", Flatten::new());
    net.push_named("dropout", Dropout::new(0.2, 1).unwrap());
    net.push_named("fc", Linear::new(backend, 6, 3, &mut rng).unwrap());
    net
}

#[test]
fn a_small_network_with_every_layer_kind_has_correct_gradients() {
    let backend = CpuBackend::with_threads(2);
    let mut net = small_network(&backend);
    let shape = [3, 3, 8, 8];
    let x = random_input(22, 3 * 3 * 64);
    let config = GradCheckConfig {
        input_samples: 32,
        param_samples: 2,
        ..Default::default()
    };
    let report = check_gradients(&backend, &mut net, &x, &shape, true, &config).unwrap();
    assert_agrees("small network", &report, 32 + 2 * 20);
    // Every trainable tensor took part, down to the first convolution.
    let mut names = Vec::new();
    net.visit_params_mut(&mut |name, _| names.push(name.to_string()));
    for name in &names {
        assert!(report.count(name) > 0, "{name} was not checked");
    }
    assert!(names.contains(&"bottleneck.downsample.0.weight".to_string()));
    assert!(names.contains(&"wide.shortcut.0.bias".to_string()));
}

#[test]
fn the_paper_networks_have_correct_gradients_at_their_smallest() {
    let backend = CpuBackend::with_threads(2);
    let shape = [2, 3, 32, 32];
    let x = random_input(23, 2 * 3 * 32 * 32);
    for (architecture, dropout) in [
        (Architecture::PreResNet { depth: 8 }, 0.0),
        (
            Architecture::WideResNet {
                depth: 10,
                widen_factor: 1,
                dropout_rate: 0.3,
            },
            0.3,
        ),
    ] {
        let config = NetworkConfig {
            architecture,
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
        assert_agrees(&format!("{architecture} (dropout {dropout})"), &report, 20);
    }
}
