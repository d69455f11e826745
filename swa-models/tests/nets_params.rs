//! Every network has exactly the PyTorch reference's tensors: names, order, shapes and parameter counts,
//! for 10 and 100 classes.

use std::collections::BTreeMap;

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

fn build(name: &str, classes: usize) -> Box<dyn Module<CpuBackend>> {
    let backend = CpuBackend::with_threads(2);
    let architecture: Architecture = name.parse().unwrap_or_else(|e| panic!("{e}"));
    architecture
        .build(&backend, classes, 0)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

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

/// One network's tensors as PyTorch's `state_dict` lists them.
#[derive(serde::Deserialize)]
struct TorchStateDict {
    parameters: usize,
    state_dict: Vec<(String, Vec<usize>, String)>,
}

/// `tests/fixtures/torch_shapes.json`, written by `tools/make_golden.py` from torch_ref.py.
fn torch_shapes() -> BTreeMap<String, TorchStateDict> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/torch_shapes.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn state_dict_keys_order_and_shapes_equal_torch_ref() {
    let table = torch_shapes();
    // Every network of torch_ref.py, plus preresnet56, for both class counts.
    assert_eq!(table.len(), 16, "networks in torch_shapes.json");
    for (key, torch) in &table {
        let (name, classes) = key.split_once('/').unwrap_or_else(|| panic!("key {key}"));
        let classes: usize = classes.parse().unwrap_or_else(|e| panic!("{key}: {e}"));
        let net = build(name, classes);

        let mut ours = Vec::new();
        net.visit_tensors(&mut |n, role, t| ours.push((n.to_string(), role, t.dims().to_vec())));
        let float: Vec<(String, Vec<usize>)> = torch
            .state_dict
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
        let torch_counters: Vec<String> = torch
            .state_dict
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
            torch.state_dict.len(),
            "{key}: state_dict entries of other types"
        );
        assert_eq!(parameter_count(net.as_ref()), torch.parameters, "{key}");
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
