//! Finite-difference checks of whole networks in training mode: BatchNorm with batch statistics, every
//! kind of residual block (Shake-Shake's with its coefficients kept), dropout with a fixed seed, pooling
//! and the classifier, back to the input.

mod common;

use common::{assert_agrees, random_input};
use rand::rngs::StdRng;
use rand::SeedableRng;
use swa_core::CpuBackend;
use swa_models::layers::gradcheck::{check_gradients, GradCheckConfig};
use swa_models::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, Dropout, Flatten, Linear, MaxPool2d,
    ReLU, Residual, Sequential, ShakeBlock, ShakeMix,
};
use swa_models::{Architecture, Module, Network, NetworkConfig};

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

/// Checks a small network on a batch of three 3×8×8 images: 32 input gradients and two elements of every
/// trainable tensor, down to the first convolution. Returns the names of the tensors checked.
fn check_every_tensor(what: &str, net: &mut Sequential<CpuBackend>, seed: u64) -> Vec<String> {
    let backend = CpuBackend::with_threads(2);
    let shape = [3, 3, 8, 8];
    let x = random_input(seed, 3 * 3 * 64);
    let config = GradCheckConfig {
        input_samples: 32,
        param_samples: 2,
        ..Default::default()
    };
    let report = check_gradients(&backend, net, &x, &shape, true, &config).unwrap();
    assert_agrees(what, &report, 32 + 2 * 20);
    let mut names = Vec::new();
    net.visit_params_mut(&mut |name, _| names.push(name.to_string()));
    for name in &names {
        assert!(report.count(name) > 0, "{what}: {name} was not checked");
    }
    names
}

#[test]
fn a_small_network_with_every_layer_kind_has_correct_gradients() {
    let backend = CpuBackend::with_threads(2);
    let names = check_every_tensor("small network", &mut small_network(&backend), 22);
    assert!(names.contains(&"bottleneck.downsample.0.weight".to_string()));
    assert!(names.contains(&"wide.shortcut.0.bias".to_string()));
}

/// Checks a whole network with four classes on two 32×32 images, back to the input: 12 input gradients
/// and one element of every trainable tensor.
fn check_whole_network(what: &str, architecture: Architecture, seed: u64) {
    let backend = CpuBackend::with_threads(2);
    let shape = [2, 3, 32, 32];
    let x = random_input(seed, 2 * 3 * 32 * 32);
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
    assert_agrees(what, &report, 20);
}

#[test]
fn the_paper_networks_have_correct_gradients_at_their_smallest() {
    check_whole_network("preresnet8", Architecture::PreResNet { depth: 8 }, 23);
    let wide = Architecture::WideResNet {
        depth: 10,
        widen_factor: 1,
        dropout_rate: 0.3,
    };
    check_whole_network("wrn10x1 (dropout 0.3)", wide, 23);
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
    let names = check_every_tensor("Shake-Keep blocks", &mut net, 32);
    for name in [
        "widen.shortcut.conv1.weight",
        "down.shortcut.conv2.weight",
        "down.shortcut.bn.weight",
        "same.branch2.4.weight",
    ] {
        assert!(names.iter().any(|n| n == name), "no {name}");
    }
}

/// PyramidNet at its smallest, back to the input: zero-padded, pooled and identity shortcuts.
#[test]
fn pyramidnets_have_correct_gradients() {
    for name in ["pyramidnet8a3", "pyramidnet11a8-bottleneck"] {
        check_whole_network(name, name.parse().unwrap(), 33);
    }
}

/// A DenseNet takes any square input from 32 pixels on, as torchvision's does: sizes whose planes turn
/// odd before a transition (45: 23, 12, 6, 3, 1) give the same logits shape, and the backward pass
/// reaches the input with its shape. Too small an input is refused with an error, not a panic.
#[test]
fn a_densenet_takes_any_square_input_from_32_pixels() {
    use swa_core::backend::{Backend, HasShape, LossOps};
    use swa_models::ForwardMode;
    let backend = CpuBackend::with_threads(2);
    let config = NetworkConfig {
        architecture: "densenet21-k4".parse().unwrap(),
        classes: 4,
    };
    let mut net = Network::new(&backend, &config, 5).unwrap();
    net.require_input_grad(true);
    for size in [32, 45, 64] {
        let shape = [2, 3, size, size];
        let x = backend
            .from_host(&random_input(3, 2 * 3 * size * size), &shape)
            .unwrap();
        let logits = net.forward(&backend, &x, ForwardMode::Eval).unwrap();
        assert_eq!(logits.dims(), [2, 4], "{size}×{size}");
        let logits = net
            .forward(&backend, &x, ForwardMode::Train { seed: 0 })
            .unwrap();
        let loss = backend.softmax_cross_entropy(&logits, &[1, 3]).unwrap();
        let dx = net.backward(&backend, &loss.grad).unwrap();
        assert_eq!(dx.dims(), shape, "{size}×{size}");
        let dx = backend.to_host(&dx).unwrap();
        assert!(
            dx.iter().all(|v| v.is_finite()) && dx.iter().any(|&v| v != 0.0),
            "{size}×{size}"
        );
        net.zero_grads();
    }
    let x = backend.zeros(&[2, 3, 8, 8]).unwrap();
    assert!(net.forward(&backend, &x, ForwardMode::Eval).is_err());
}
