//! The networks compute what the PyTorch reference computes on the same weights.
//!
//! The fixtures come from `tools/make_golden.py` (torch_ref.py's networks with a fixed torch seed and
//! randomised BatchNorm parameters and statistics): each network's `state_dict` as safetensors, loaded here
//! through the checkpoint loader, and a batch of two images with PyTorch's eval-mode logits, train-mode
//! logits (batch statistics) and the running statistics after that train-mode pass.
//!
//! The paper's own networks (VGG-16 with and without BatchNorm, PreResNet-164, WRN-16-4, WRN-28-10) have too
//! many weights to store: for them the script and this test both compute the weights from the same integer
//! hash formula, and only the input, PyTorch's eval-mode logits and its running statistics after a
//! train-mode pass are stored.

use std::path::PathBuf;

use swa_core::backend::{Backend, HasShape};
use swa_core::params::NamedTensors;
use swa_core::CpuBackend;
use swa_models::checkpoint::{load_module, StateDict, StoredTensor};
use swa_models::{Architecture, ForwardMode, Module, Network, NetworkConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn f32_tensor<'a>(dict: &'a StateDict, name: &str) -> (&'a [usize], &'a [f32]) {
    match dict.get(name) {
        Some(StoredTensor::F32 { shape, values }) => (shape, values),
        other => panic!("{}: {name} is {other:?}", dict.origin()),
    }
}

/// Largest element-wise difference, relative to the largest magnitude of the expected values.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn check_network(name: &str) {
    let backend = CpuBackend::with_threads(2);
    let architecture: Architecture = name.parse().unwrap();
    let io = StateDict::load(&fixture(&format!("golden_{name}_io.safetensors"))).unwrap();
    let (input_shape, input) = f32_tensor(&io, "input");
    let (logits_shape, logits_eval) = f32_tensor(&io, "logits_eval");
    let (_, logits_train) = f32_tensor(&io, "logits_train");

    let config = NetworkConfig {
        architecture,
        classes: logits_shape[1],
    };
    // A different seed from PyTorch's: every value must come from the checkpoint.
    let mut net = Network::new(&backend, &config, 99).unwrap();
    load_module(
        &backend,
        &mut net,
        &fixture(&format!("golden_{name}.safetensors")),
    )
    .unwrap();
    let mut counters = Vec::new();
    net.visit_batch_counters(&mut |n, c| counters.push((n.to_string(), c)));
    assert!(
        !counters.is_empty() && counters.iter().all(|(_, c)| *c == 7),
        "{counters:?}"
    );

    let x = backend.from_host(input, input_shape).unwrap();
    let y = net.forward(&backend, &x, ForwardMode::Eval).unwrap();
    assert_eq!(y.dims(), logits_shape);
    let err = relative_error(&backend.to_host(&y).unwrap(), logits_eval);
    eprintln!("{name}: eval-mode logits, relative error {err:.2e}");
    assert!(
        err < 1e-4,
        "{name}: eval-mode logits differ by {err} (relative)"
    );

    let y = net
        .forward(&backend, &x, ForwardMode::Train { seed: 0 })
        .unwrap();
    let err = relative_error(&backend.to_host(&y).unwrap(), logits_train);
    eprintln!("{name}: train-mode logits, relative error {err:.2e}");
    assert!(
        err < 1e-4,
        "{name}: train-mode logits differ by {err} (relative)"
    );

    // The running statistics moved as PyTorch's did (WideResNet's final BatchNorm with momentum 0.9).
    let mut checked = 0;
    net.visit_tensors(&mut |n, _, t| {
        if n.ends_with("running_mean") || n.ends_with("running_var") {
            let (_, want) = f32_tensor(&io, &format!("after_train.{n}"));
            let err = relative_error(&backend.to_host(t).unwrap(), want);
            assert!(
                err < 1e-4,
                "{name}: {n} after a training pass differs by {err}"
            );
            checked += 1;
        }
    });
    assert_eq!(checked + 3, io.len(), "{name}: statistics compared");
}

#[test]
fn preresnet20_matches_pytorch() {
    check_network("preresnet20");
}

#[test]
fn preresnet47_bottleneck_matches_pytorch() {
    check_network("preresnet47");
}

#[test]
fn wide_resnet_10x1_matches_pytorch() {
    check_network("wrn10x1");
}

/// `make_golden.py`'s `formula_uniform`: values in [-0.5, 0.5) from an integer hash of the tensor's index
/// in state_dict order and the element's index, exact in any language.
fn formula_uniform(tensor_index: u64, numel: usize) -> Vec<f64> {
    const MASK: u64 = 0xFFFF_FFFF;
    (0..numel as u64)
        .map(|i| {
            let mut h = (i.wrapping_mul(2_654_435_761) + (tensor_index + 1) * 40_503) & MASK;
            h ^= h >> 15;
            h = h.wrapping_mul(2_246_822_519) & MASK;
            h ^= h >> 13;
            h as f64 / 4_294_967_296.0 - 0.5
        })
        .collect()
}

/// `make_golden.py`'s `formula_weights` for `net`, with zero batch counters.
fn formula_weights<M: Module<CpuBackend> + ?Sized>(net: &M) -> StateDict {
    let mut dict = StateDict::new();
    let mut index = 0;
    net.visit_tensors(&mut |name, _, t| {
        let shape = t.dims().to_vec();
        let numel: usize = shape.iter().product();
        let u = formula_uniform(index, numel);
        index += 1;
        let values = u
            .iter()
            .map(|&u| {
                let v = if name.ends_with("running_var")
                    || (name.ends_with("weight") && shape.len() == 1)
                {
                    1.0 + 0.5 * u
                } else if name.ends_with("running_mean") || name.ends_with("bias") {
                    0.2 * u
                } else {
                    let fan_in = numel / shape[0];
                    u * (24.0 / fan_in as f64).sqrt()
                };
                v as f32
            })
            .collect();
        dict.insert(name, StoredTensor::F32 { shape, values });
    });
    net.visit_batch_counters(&mut |name, _| dict.insert_counter(name, 0));
    dict
}

fn check_formula_network(name: &str) {
    let backend = CpuBackend::with_threads(2);
    let io = StateDict::load(&fixture(&format!("golden_{name}_formula_io.safetensors"))).unwrap();
    let (input_shape, input) = f32_tensor(&io, "input");
    let (logits_shape, logits_eval) = f32_tensor(&io, "logits_eval");
    let architecture: Architecture = name.parse().unwrap();
    let mut net = architecture.build(&backend, logits_shape[1], 0).unwrap();
    formula_weights(net.as_ref())
        .copy_into_module(&backend, net.as_mut())
        .unwrap();

    let x = backend.from_host(input, input_shape).unwrap();
    let y = net.forward(&backend, &x, ForwardMode::Eval).unwrap();
    let err = relative_error(&backend.to_host(&y).unwrap(), logits_eval);
    eprintln!("{name}: eval-mode logits, relative error {err:.2e}");
    assert!(
        err < 1e-4,
        "{name}: eval-mode logits differ by {err} (relative)"
    );

    // VGG's dropout acts only after its last BatchNorm (the others have none), so dropout masks do not
    // touch the running statistics; the train-mode logits are stored for the networks without dropout.
    let y = net
        .forward(&backend, &x, ForwardMode::Train { seed: 0 })
        .unwrap();
    let mut outputs = 2;
    if io.get("logits_train").is_some() {
        let (_, logits_train) = f32_tensor(&io, "logits_train");
        let err = relative_error(&backend.to_host(&y).unwrap(), logits_train);
        eprintln!("{name}: train-mode logits, relative error {err:.2e}");
        assert!(
            err < 1e-4,
            "{name}: train-mode logits differ by {err} (relative)"
        );
        outputs += 1;
    } else {
        assert!(
            name.starts_with("vgg"),
            "{name}: no train-mode logits stored"
        );
    }
    let mut checked = 0;
    net.visit_tensors(&mut |n, _, t| {
        if n.ends_with("running_mean") || n.ends_with("running_var") {
            let (_, want) = f32_tensor(&io, &format!("after_train.{n}"));
            let err = relative_error(&backend.to_host(t).unwrap(), want);
            assert!(
                err < 1e-4,
                "{name}: {n} after a training pass differs by {err}"
            );
            checked += 1;
        }
    });
    assert_eq!(checked + outputs, io.len(), "{name}: statistics compared");
}

#[test]
fn vgg16_matches_pytorch() {
    check_formula_network("vgg16");
}

#[test]
fn vgg16_bn_matches_pytorch() {
    check_formula_network("vgg16bn");
}

#[test]
fn preresnet164_matches_pytorch() {
    check_formula_network("preresnet164");
}

#[test]
fn wrn16x4_matches_pytorch() {
    check_formula_network("wrn16x4");
}

#[test]
fn wrn28x10_matches_pytorch() {
    check_formula_network("wrn28x10");
}

/// Shake-Shake at reduced depth and width (`xtask/torch/cifar_networks.py`): both shortcut kinds, the
/// even mix in evaluation, and in training the coefficients of `shake_coefficients` for seed 0, which
/// the fixture script reimplements.
#[test]
fn shake_shake_14_2x4d_matches_pytorch() {
    check_network("shakeshake14-2x4d");
}

/// PyramidNet with basic blocks at reduced depth, its widths growing by half a channel per block: every
/// shortcut kind but pooling with padding (the identity, padding alone, pooling alone).
#[test]
fn pyramidnet_14_alpha_3_matches_pytorch() {
    check_network("pyramidnet14a3");
}

/// PyramidNet with bottleneck blocks at reduced depth: shortcuts padded, and pooled then padded.
#[test]
fn pyramidnet_20_alpha_8_bottleneck_matches_pytorch() {
    check_network("pyramidnet20a8-bottleneck");
}

/// The gradient of every parameter of `name` after one training-mode pass (seed 0) against PyTorch's
/// autograd on the same pass: for Shake-Shake, back-propagated through its independent backward
/// coefficients.
fn check_gradients_against_pytorch(name: &str) {
    use swa_core::backend::LossOps;
    let backend = CpuBackend::with_threads(2);
    let io = StateDict::load(&fixture(&format!("golden_{name}_io.safetensors"))).unwrap();
    let grads = StateDict::load(&fixture(&format!("golden_{name}_grads.safetensors"))).unwrap();
    let (input_shape, input) = f32_tensor(&io, "input");
    let (logits_shape, _) = f32_tensor(&io, "logits_eval");
    let labels: Vec<u32> = match grads.get("labels") {
        Some(StoredTensor::I64 { values, .. }) => values.iter().map(|&v| v as u32).collect(),
        other => panic!("labels: {other:?}"),
    };
    let (_, want_loss) = f32_tensor(&grads, "loss");
    let architecture: Architecture = name.parse().unwrap();
    let config = NetworkConfig {
        architecture,
        classes: logits_shape[1],
    };
    let mut net = Network::new(&backend, &config, 99).unwrap();
    load_module(
        &backend,
        &mut net,
        &fixture(&format!("golden_{name}.safetensors")),
    )
    .unwrap();
    let x = backend.from_host(input, input_shape).unwrap();
    let logits = net
        .forward(&backend, &x, ForwardMode::Train { seed: 0 })
        .unwrap();
    let loss = backend.softmax_cross_entropy(&logits, &labels).unwrap();
    let got_loss = backend.to_host(&loss.loss).unwrap()[0];
    assert!(
        (got_loss - want_loss[0]).abs() <= 1e-4 * want_loss[0].abs(),
        "{name}: loss {got_loss}, PyTorch {}",
        want_loss[0]
    );
    net.backward(&backend, &loss.grad).unwrap();
    // Some gradients vanish in exact arithmetic (PyramidNet's stem BatchNorm shift: every path from it
    // reaches a training-mode BatchNorm through shortcuts that keep per-channel sums, so its gradient
    // sums to zero); both sides are then rounding noise, and must both be negligible instead.
    let largest = |values: &[f32]| values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut scale = 0.0f32;
    net.visit_params_mut(&mut |n, _| {
        scale = scale.max(largest(f32_tensor(&grads, &format!("grad.{n}")).1));
    });
    let negligible = 1e-5 * scale;
    // A gradient that is mostly cancelled is only as accurate as float32 allows: where the fixture says
    // how far PyTorch's own float32 gradient is from its float64 one, the bound is four times that
    // distance when it exceeds the usual 1e-4 (DenseNet's stem BatchNorm: 2.6e-4).
    let bound = |n: &str| match grads.get(&format!("f32_error.{n}")) {
        Some(StoredTensor::F32 { values, .. }) => {
            values.iter().fold(1e-4f32, |b, e| b.max(4.0 * e))
        }
        _ => 1e-4,
    };
    let float32_errors = grads
        .iter()
        .filter(|(n, _)| n.starts_with("f32_error."))
        .count();
    let mut checked = 0;
    let mut worst = 0.0f32;
    net.visit_params_mut(&mut |n, p| {
        let (_, want) = f32_tensor(&grads, &format!("grad.{n}"));
        let grad = p
            .grad
            .as_ref()
            .unwrap_or_else(|| panic!("{n}: no gradient"));
        let got = backend.to_host(grad).unwrap();
        if largest(want) < negligible {
            assert!(
                largest(&got) < negligible,
                "{name}: gradient of {n} is {} where PyTorch's vanishes",
                largest(&got)
            );
        } else {
            let err = relative_error(&got, want);
            worst = worst.max(err);
            let bound = bound(n);
            assert!(
                err < bound,
                "{name}: gradient of {n} differs by {err} (bound {bound})"
            );
        }
        checked += 1;
    });
    eprintln!("{name}: {checked} parameter gradients, largest relative error {worst:.2e}");
    assert_eq!(
        checked + 2 + float32_errors,
        grads.len(),
        "{name}: gradients compared"
    );
}

#[test]
fn shake_shake_14_2x4d_gradients_match_pytorch() {
    check_gradients_against_pytorch("shakeshake14-2x4d");
}

/// torchvision's ResNet layout with one `Bottleneck` a stage, 8 wide, on two 64×64 images: the stem's
/// padded max pooling, strided 3×3 convolutions, projection shortcuts with their BatchNorm, the ReLU after
/// each sum and the global average pooling, forward and backward.
#[test]
fn resnet_14_w8_matches_torchvision() {
    check_network("resnet14-w8");
    check_gradients_against_pytorch("resnet14-w8");
}

/// torchvision's own `DenseNet` class with three dense layers a block, growth 8 and a 16-wide stem, on two
/// 64×64 images: dense layers reading their input piece by piece, transitions that halve odd channel
/// counts, `norm5`, the final ReLU and global average pooling, forward (the running statistics of every
/// `norm1`, updated slice by slice) and backward (every piece's gradient gathered over the layers that
/// read it, `norm1` and `conv1` gradients assembled from slices).
#[test]
fn densenet_29_k8_matches_torchvision() {
    check_network("densenet29-k8");
    check_gradients_against_pytorch("densenet29-k8");
}

#[test]
fn pyramidnet_gradients_match_pytorch() {
    check_gradients_against_pytorch("pyramidnet14a3");
    check_gradients_against_pytorch("pyramidnet20a8-bottleneck");
}
