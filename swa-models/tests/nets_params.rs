//! Every network has exactly the PyTorch reference's tensors: names, order, shapes and parameter counts,
//! for 10 and 100 classes; the networks of other papers also have their published sizes.

mod common;

use std::collections::BTreeMap;

use common::build;
use swa_core::backend::HasShape;
use swa_core::params::TensorRole;
use swa_core::CpuBackend;
use swa_models::module::parameter_count;
use swa_models::{Architecture, Module};

/// Parameter counts printed by `python /work/shared/tools/torch_ref.py params` (name, 10 classes,
/// 100 classes), the PyTorch definitions of the original SWA code's networks.
const TORCH_REF_PARAMS: [(&str, usize, usize); 7] = [
    ("vgg16", 15_245_130, 15_291_300),
    ("vgg16bn", 15_253_578, 15_299_748),
    ("preresnet20", 272_282, 278_132),
    ("preresnet110", 1_146_842, 1_169_972),
    ("preresnet164", 1_703_258, 1_726_388),
    ("wrn28x10", 36_489_290, 36_546_980),
    ("wrn16x4", 2_751_146, 2_774_276),
];

#[test]
fn parameter_counts_equal_torch_ref() {
    for (name, ten, hundred) in TORCH_REF_PARAMS {
        for (classes, expected) in [(10, ten), (100, hundred)] {
            let net = build(name, classes);
            assert_eq!(
                parameter_count(net.as_ref()),
                expected,
                "{name} with {classes} classes"
            );
        }
    }
}

/// One `state_dict` entry as the fixtures list it: name, shape, dtype.
type StateDictEntry = (String, Vec<usize>, String);

/// One network's tensors as PyTorch's `state_dict` lists them.
#[derive(serde::Deserialize)]
struct TorchStateDict {
    parameters: usize,
    state_dict: Vec<StateDictEntry>,
}

/// One network of `tests/fixtures/cifar_networks_shapes.json`, written by `xtask/torch/cifar_networks.py`.
#[derive(serde::Deserialize)]
struct TorchNetwork {
    /// For 10 and 100 classes.
    parameters: [usize; 2],
    /// For 10 classes.
    state_dict: Vec<StateDictEntry>,
}

fn read_fixture<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The network's tensors are the `state_dict`'s float tensors, in order, with their shapes and roles,
/// and its BatchNorm batch counters are the `state_dict`'s scalar int64 entries.
fn assert_state_dict_equals(
    key: &str,
    net: &dyn Module<CpuBackend>,
    state_dict: &[StateDictEntry],
) {
    let mut ours = Vec::new();
    net.visit_tensors(&mut |n, role, t| ours.push((n.to_string(), role, t.dims().to_vec())));
    let float: Vec<(String, Vec<usize>)> = state_dict
        .iter()
        .filter(|(_, _, dtype)| dtype == "float32")
        .map(|(n, s, _)| (n.clone(), s.clone()))
        .collect();
    let ours_shapes: Vec<(String, Vec<usize>)> = ours
        .iter()
        .map(|(n, _, s)| (n.clone(), s.clone()))
        .collect();
    assert_eq!(ours_shapes, float, "{key}: tensors in state_dict order");
    for (n, role, _) in &ours {
        let is_statistic = n.ends_with("running_mean") || n.ends_with("running_var");
        let want = if is_statistic {
            TensorRole::BatchNormStatistic
        } else {
            TensorRole::Parameter
        };
        assert_eq!(*role, want, "{key}: role of {n}");
    }

    let mut counters = Vec::new();
    net.visit_batch_counters(&mut |n, _| counters.push(n.to_string()));
    let torch_counters: Vec<String> = state_dict
        .iter()
        .filter(|(_, _, dtype)| dtype == "int64")
        .map(|(n, s, _)| {
            assert!(s.is_empty(), "{key}: {n} is not a scalar");
            n.clone()
        })
        .collect();
    assert_eq!(counters, torch_counters, "{key}: BatchNorm batch counters");
    assert_eq!(
        float.len() + torch_counters.len(),
        state_dict.len(),
        "{key}: state_dict entries of other types"
    );
}

/// The original SWA code's networks, from `tests/fixtures/torch_shapes.json` (written by
/// `tools/make_golden.py` from torch_ref.py).
#[test]
fn state_dict_keys_order_and_shapes_equal_torch_ref() {
    let table: BTreeMap<String, TorchStateDict> = read_fixture("torch_shapes.json");
    // Every network of torch_ref.py, plus preresnet56, for both class counts.
    assert_eq!(table.len(), 16, "networks in torch_shapes.json");
    for (key, torch) in &table {
        let (name, classes) = key.split_once('/').unwrap_or_else(|| panic!("key {key}"));
        let classes: usize = classes.parse().unwrap_or_else(|e| panic!("{key}: {e}"));
        let net = build(name, classes);
        assert_state_dict_equals(key, net.as_ref(), &torch.state_dict);
        assert_eq!(parameter_count(net.as_ref()), torch.parameters, "{key}");
    }
}

/// Shake-Shake and PyramidNet against the PyTorch definitions of `xtask/torch/cifar_networks.py`.
#[test]
fn shake_shake_and_pyramidnet_equal_their_pytorch_definition() {
    let table: BTreeMap<String, TorchNetwork> = read_fixture("cifar_networks_shapes.json");
    assert_eq!(table.len(), 5, "networks in cifar_networks_shapes.json");
    for (name, torch) in &table {
        assert_state_dict_equals(name, build(name, 10).as_ref(), &torch.state_dict);
        for (classes, want) in [10, 100].into_iter().zip(torch.parameters) {
            assert_eq!(
                parameter_count(build(name, classes).as_ref()),
                want,
                "{name} with {classes} classes"
            );
        }
    }
}

/// torchvision's ResNet-50, ResNet-152 and DenseNet-161 for 1000 classes, from
/// `tests/fixtures/imagenet_shapes.json` (written by `tools/golden_imagenet_networks.py` from
/// torchvision's own constructors), whose parameter counts are torchvision's published 25,557,032,
/// 60,192,808 and 28,681,000.
#[test]
fn imagenet_networks_equal_torchvision() {
    let table: BTreeMap<String, TorchStateDict> = read_fixture("imagenet_shapes.json");
    assert_eq!(table.len(), 3, "networks in imagenet_shapes.json");
    for (name, published) in [
        ("resnet50", 25_557_032),
        ("resnet152", 60_192_808),
        ("densenet161", 28_681_000),
    ] {
        let torch = &table[name];
        assert_eq!(torch.parameters, published, "{name}: the fixture's count");
        let net = build(name, 1000);
        assert_state_dict_equals(name, net.as_ref(), &torch.state_dict);
        assert_eq!(parameter_count(net.as_ref()), published, "{name}");
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
fn initialisation_is_deterministic_and_follows_the_original_code() {
    use swa_core::backend::Backend;
    let backend = CpuBackend::with_threads(2);
    let values = |name: &str, seed: u64| {
        let net = "preresnet20"
            .parse::<Architecture>()
            .unwrap()
            .build(&backend, 10, seed)
            .unwrap();
        let mut found = None;
        net.visit_tensors(&mut |n, _, t| {
            if n == name {
                found = Some(backend.to_host(t).unwrap());
            }
        });
        found.unwrap_or_else(|| panic!("no tensor {name}"))
    };
    let a = values("layer2.0.conv1.weight", 1);
    assert_eq!(
        a,
        values("layer2.0.conv1.weight", 1),
        "same seed, other weights"
    );
    assert_ne!(
        a,
        values("layer2.0.conv1.weight", 2),
        "other seed, same weights"
    );
    // He-normal with fan-out: std = sqrt(2 / (3·3·32)) for layer2's 3×3 convolutions with 32 outputs.
    let std = (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
    let want = (2.0f32 / (9.0 * 32.0)).sqrt();
    assert!((std / want - 1.0).abs() < 0.05, "std {std}, want {want}");
    assert!(values("bn.weight", 1).iter().all(|&v| v == 1.0));
    assert!(values("bn.bias", 1).iter().all(|&v| v == 0.0));
    // PyTorch's default Linear: U(−1/√64, 1/√64) for the 64 features into fc.
    let fc = values("fc.weight", 1);
    let bound = 1.0 / 8.0;
    assert!(fc.iter().all(|v| v.abs() <= bound));
    assert!(fc.iter().any(|v| v.abs() > 0.9 * bound));

    // WideResNet keeps PyTorch's default convolution initialisation: U(−1/√fan_in, 1/√fan_in), biased.
    let wrn = "wrn16x4"
        .parse::<Architecture>()
        .unwrap()
        .build(&backend, 10, 1)
        .unwrap();
    let mut conv = None;
    let mut bias = None;
    wrn.visit_tensors(&mut |n, _, t| match n {
        "layer2.0.conv2.weight" => conv = Some(backend.to_host(t).unwrap()),
        "layer2.0.conv2.bias" => bias = Some(backend.to_host(t).unwrap()),
        _ => {}
    });
    let (conv, bias) = (conv.unwrap(), bias.unwrap());
    let bound = 1.0 / ((128 * 9) as f32).sqrt();
    assert!(conv.iter().chain(&bias).all(|v| v.abs() <= bound));
    let uniform_std = bound / 3f32.sqrt();
    let std = (conv.iter().map(|v| v * v).sum::<f32>() / conv.len() as f32).sqrt();
    assert!(
        (std / uniform_std - 1.0).abs() < 0.05,
        "std {std}, want {uniform_std}"
    );
    assert!(
        bias.iter().any(|&v| v != 0.0),
        "WideResNet biases are not zero in PyTorch"
    );
}
