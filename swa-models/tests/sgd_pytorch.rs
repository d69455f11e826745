//! `Sgd` takes the steps `torch.optim.SGD` takes, under every rule of PyTorch's update: the first step sets
//! the momentum buffer to the gradient (no dampening), dampening on later steps, no momentum (where
//! dampening does not apply), and Nesterov momentum. The expected parameters come from PyTorch itself
//! (`tools/make_golden.py --only sgd` writes `tests/fixtures/golden_sgd.json`).

use serde::Deserialize;
use swa_core::backend::Backend;
use swa_core::CpuBackend;
use swa_models::layers::Linear;
use swa_models::optim::{Sgd, SgdConfig};
use swa_models::{Module, TrainError};

#[derive(Deserialize)]
struct Settings {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    dampening: f32,
    nesterov: bool,
}

#[derive(Deserialize)]
struct Case {
    settings: Settings,
    after_each_step: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Golden {
    start: Vec<f32>,
    grads: Vec<Vec<f32>>,
    cases: Vec<Case>,
}

fn golden() -> Golden {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/golden_sgd.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A 3 → 2 linear layer whose weight is `start`; only the weight will get gradients.
fn layer(backend: &CpuBackend, start: &[f32]) -> Linear<CpuBackend> {
    Linear::from_tensors(
        backend.from_host(start, &[2, 3]).unwrap(),
        backend.zeros(&[2]).unwrap(),
    )
    .unwrap()
}

fn weight(backend: &CpuBackend, layer: &mut Linear<CpuBackend>) -> Vec<f32> {
    let mut value = Vec::new();
    layer.visit_params_mut(&mut |name, param| {
        if name == "weight" {
            value = backend.to_host(&param.value).unwrap();
        }
    });
    value
}

#[test]
fn every_rule_of_torch_sgd_gives_pytorchs_parameters() {
    let backend = CpuBackend::with_threads(1);
    let golden = golden();
    assert_eq!(golden.cases.len(), 4);
    for case in &golden.cases {
        let s = &case.settings;
        let config = SgdConfig {
            momentum: s.momentum,
            weight_decay: s.weight_decay,
            dampening: s.dampening,
            nesterov: s.nesterov,
        };
        let mut layer = layer(&backend, &golden.start);
        let mut sgd = Sgd::new(config);
        for (step, (grad, want)) in golden.grads.iter().zip(&case.after_each_step).enumerate() {
            layer.visit_params_mut(&mut |name, param| {
                if name == "weight" {
                    param.grad = Some(backend.from_host(grad, &[2, 3]).unwrap());
                }
            });
            sgd.step(&backend, &mut layer, s.lr).unwrap();
            let got = weight(&backend, &mut layer);
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                    "{config:?} lr {}: step {step}, element {i}: {g}, PyTorch {w}",
                    s.lr
                );
            }
        }
        // The bias had no gradient: left alone, as in PyTorch.
        layer.visit_params_mut(&mut |name, param| {
            if name == "bias" {
                assert_eq!(backend.to_host(&param.value).unwrap(), vec![0.0, 0.0]);
            }
        });
    }
}

#[test]
fn settings_pytorch_refuses_are_refused() {
    let backend = CpuBackend::with_threads(1);
    let good = SgdConfig::momentum(5e-4);
    assert!(good.validate().is_ok());
    let bad = [
        SgdConfig {
            nesterov: true,
            momentum: 0.0,
            ..good
        },
        SgdConfig {
            nesterov: true,
            dampening: 0.1,
            ..good
        },
        SgdConfig {
            momentum: -0.1,
            ..good
        },
        SgdConfig {
            weight_decay: f32::NAN,
            ..good
        },
        SgdConfig {
            dampening: f32::INFINITY,
            ..good
        },
    ];
    for config in bad {
        let mut layer = layer(&backend, &[0.0; 6]);
        layer.visit_params_mut(&mut |_, param| {
            param.grad = Some(backend.zeros(param.value.shape()).unwrap());
        });
        match Sgd::new(config).step(&backend, &mut layer, 0.1) {
            Err(TrainError::InvalidConfig(message)) => {
                assert!(message.starts_with("SGD: "), "{message}")
            }
            other => panic!("{config:?}: expected a refusal, got {other:?}"),
        }
        // Nothing moved.
        assert_eq!(weight(&backend, &mut layer), vec![0.0; 6]);
    }
}
