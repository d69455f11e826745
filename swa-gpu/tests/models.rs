//! The paper's networks from swa-models run unchanged on the GPU: the same seed gives the same logits
//! and gradients as on the CPU reference.
//!
//! Tolerance: each op agrees to ~1e-6 relative (see `ops.rs`); through a dozen layers of convolution and
//! batch norm (whose backward pass divides by the batch's standard deviation) the differences grow, so
//! each tensor is compared with `1e-3 · max|want| + 1e-6` — two orders of magnitude above the observed
//! differences, and orders below what any wrong index or formula produces (differences of the size of
//! the values themselves).

mod common;

use std::collections::BTreeMap;

use common::*;
use swa_core::backend::prelude::*;
use swa_models::{Architecture, ForwardMode, Module, Network, NetworkConfig};

const BATCH: usize = 2;
const CLASSES: usize = 10;

/// Logits, then every parameter's gradient by name, after one training-mode forward and backward on
/// `BATCH` images of `size × size` pixels.
fn forward_backward<B: Backend>(
    b: &B,
    architecture: Architecture,
    size: usize,
) -> (Vec<f32>, BTreeMap<String, Vec<f32>>) {
    let config = NetworkConfig {
        architecture,
        classes: CLASSES,
    };
    let mut net = Network::new(b, &config, 17).unwrap();
    let x = b
        .from_host(&random(4, BATCH * 3 * size * size), &[BATCH, 3, size, size])
        .unwrap();
    let logits = net.forward(b, &x, ForwardMode::Train { seed: 99 }).unwrap();
    assert_eq!(logits.dims(), &[BATCH, CLASSES]);
    let ce = b.softmax_cross_entropy(&logits, &[3, 7]).unwrap();
    net.backward(b, &ce.grad).unwrap();
    let mut grads = BTreeMap::new();
    net.visit_params_mut(&mut |name, param| {
        let grad = param
            .grad
            .as_ref()
            .map(|g| b.to_host(g).unwrap())
            .unwrap_or_default();
        grads.insert(name.to_string(), grad);
    });
    (b.to_host(&logits).unwrap(), grads)
}

fn relative_bounds(want: &[f32]) -> Vec<f32> {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    vec![1e-3 * scale + 1e-6; want.len()]
}

fn compare(architecture: Architecture) {
    compare_at(architecture, 32);
}

/// [`compare`] on images of `size × size` pixels.
fn compare_at(architecture: Architecture, size: usize) {
    let Some(g) = gpu() else { return };
    let (gpu_logits, gpu_grads) = forward_backward(&g, architecture, size);
    let (cpu_logits, cpu_grads) = forward_backward(&cpu(), architecture, size);
    assert_within(
        &format!("{architecture} logits"),
        &gpu_logits,
        &cpu_logits,
        &relative_bounds(&cpu_logits),
    );
    assert_eq!(
        gpu_grads.keys().collect::<Vec<_>>(),
        cpu_grads.keys().collect::<Vec<_>>()
    );
    let mut worst = 0.0f32;
    for (name, want) in &cpu_grads {
        let got = &gpu_grads[name];
        assert!(!want.is_empty(), "{architecture}: {name} has no gradient");
        assert_within(
            &format!("{architecture} grad {name}"),
            got,
            want,
            &relative_bounds(want),
        );
        let bound = relative_bounds(want)[0];
        let err = got
            .iter()
            .zip(want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(err / bound);
    }
    eprintln!(
        "{architecture}: {} gradients, worst difference {worst:.2e} of the bound",
        cpu_grads.len()
    );
}

#[test]
fn preresnet_matches_cpu() {
    compare(Architecture::PreResNet { depth: 8 });
}

/// With dropout, which must draw the same masks on both backends.
#[test]
fn wide_resnet_with_dropout_matches_cpu() {
    compare(Architecture::WideResNet {
        depth: 10,
        widen_factor: 1,
        dropout_rate: 0.3,
    });
}

/// Shake-Shake's per-image mixing, with coefficients drawn on the host from the pass's seed.
#[test]
fn shake_shake_matches_cpu() {
    compare("shakeshake8-2x4d".parse().unwrap());
}

/// PyramidNet's zero-padded shortcuts, with basic and with bottleneck blocks.
#[test]
fn pyramidnets_match_cpu() {
    compare("pyramidnet8a3".parse().unwrap());
    compare("pyramidnet11a4-bottleneck".parse().unwrap());
}

/// torchvision's ResNet layout at its smallest (one bottleneck a stage, 4 wide): the padded max pooling
/// of the stem, post-activation blocks and global average pooling, on 32×32 images.
#[test]
fn resnet_matches_cpu() {
    compare("resnet14-w4".parse().unwrap());
}

/// torchvision's DenseNet layout at its smallest (two dense layers a block, growth 4): dense layers that
/// read their input piece by piece through channel slices of `norm1` and `conv1`, the block's output
/// written slice by slice, transitions with average pooling, on 64×64 images: at 32×32 the last block
/// runs on 1×1 planes, where a training-mode BatchNorm of two images sees two values a channel and
/// amplifies the backends' rounding differences towards the bound.
#[test]
fn densenet_matches_cpu() {
    compare_at("densenet21-k4".parse().unwrap(), 64);
}

/// Logits in evaluation mode after a BatchNorm recomputation pass: the paths that run layers together
/// (BatchNorm folded into the convolution before it, BatchNorm and ReLU in one pass, ReLU in place).
fn recompute_then_evaluate<B: Backend>(b: &B, architecture: Architecture) -> Vec<f32> {
    let config = NetworkConfig {
        architecture,
        classes: CLASSES,
    };
    let mut net = Network::new(b, &config, 23).unwrap();
    let shape = [BATCH, 3, 32, 32];
    let x = b
        .from_host(&random(6, BATCH * 3 * 32 * 32), &shape)
        .unwrap();
    let recompute = ForwardMode::RecomputeBatchNorm {
        momentum: 1.0,
        seed: 5,
    };
    net.forward(b, &x, recompute).unwrap();
    let x = b
        .from_host(&random(7, BATCH * 3 * 32 * 32), &shape)
        .unwrap();
    let logits = net.forward(b, &x, ForwardMode::Eval).unwrap();
    b.to_host(&logits).unwrap()
}

#[test]
fn evaluation_after_recomputation_matches_cpu() {
    let Some(g) = gpu() else { return };
    for architecture in [
        Architecture::PreResNet { depth: 8 },
        "vgg16bn".parse().unwrap(),
    ] {
        let want = recompute_then_evaluate(&cpu(), architecture);
        let got = recompute_then_evaluate(&g, architecture);
        assert_within(
            &format!("{architecture} evaluation logits"),
            &got,
            &want,
            &relative_bounds(&want),
        );
    }
}
