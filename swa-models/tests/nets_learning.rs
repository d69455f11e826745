//! A small network learns a separable problem with plain SGD: the whole forward–backward–update path works.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swa_core::backend::prelude::*;
use swa_core::backend::SgdStep;
use swa_core::CpuBackend;
use swa_models::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, Flatten, Linear, ReLU, Residual,
    Sequential,
};
use swa_models::{ForwardMode, Module};

const CLASSES: usize = 4;
const SIDE: usize = 8;

/// 8×8 three-channel images of four classes: a bright horizontal bar, a vertical bar, a diagonal or a
/// checkerboard, at a random offset, in a random channel mix, on noise.
fn dataset(n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut images = Vec::with_capacity(n * 3 * SIDE * SIDE);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % CLASSES) as u32;
        let offset = rng.random_range(0..SIDE);
        let weights: [f32; 3] = [rng.random(), rng.random(), rng.random()];
        for &w in &weights {
            for y in 0..SIDE {
                for x in 0..SIDE {
                    let on = match label {
                        0 => y == offset,
                        1 => x == offset,
                        2 => (x + SIDE - y) % SIDE == offset,
                        _ => (x + y) % 2 == 0,
                    };
                    let signal = if on { 1.0 + w } else { 0.0 };
                    images.push(signal + 0.3 * (rng.random::<f32>() - 0.5));
                }
            }
        }
        labels.push(label);
    }
    (images, labels)
}

fn network(backend: &CpuBackend) -> Sequential<CpuBackend> {
    let mut rng = StdRng::seed_from_u64(31);
    let conv = Conv2dConfig::new(3, 8, 3)
        .padding(1)
        .bias(false)
        .init(ConvInit::HeNormalFanOut);
    let mut net = Sequential::new();
    net.push_named("conv1", Conv2d::new(backend, conv, &mut rng).unwrap());
    let block = Residual::preact_basic(backend, 8, 8, 1, &mut rng).unwrap();
    net.push_named("block", block);
    net.push_named("bn", BatchNorm2d::new(backend, 8).unwrap());
    net.push_named("relu", ReLU::new());
    net.push_named("pool", AvgPool2d::new(SIDE).unwrap());
    net.push_named("flatten", Flatten::new());
    net.push_named("fc", Linear::new(backend, 8, CLASSES, &mut rng).unwrap());
    net.require_input_grad(false);
    net
}

fn accuracy(
    backend: &CpuBackend,
    net: &mut Sequential<CpuBackend>,
    x: &[f32],
    labels: &[u32],
) -> f32 {
    let input = backend
        .from_host(x, &[labels.len(), 3, SIDE, SIDE])
        .unwrap();
    let logits = net.forward(backend, &input, ForwardMode::Eval).unwrap();
    assert_eq!(logits.dims(), &[labels.len(), CLASSES]);
    let logits = backend.to_host(&logits).unwrap();
    let correct = logits
        .chunks(CLASSES)
        .zip(labels)
        .filter(|(row, &label)| {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32);
            best == Some(label)
        })
        .count();
    correct as f32 / labels.len() as f32
}

#[test]
fn a_small_network_learns_a_separable_problem_with_sgd() {
    let backend = CpuBackend::with_threads(2);
    let (x, labels) = dataset(256, 1);
    let mut net = network(&backend);
    let before = accuracy(&backend, &mut net, &x, &labels);

    let batch = 32;
    let step = SgdStep {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-4,
        dampening: 0.0,
        nesterov: false,
    };
    let mut momenta = Vec::new();
    net.visit_params_mut(&mut |_, p| momenta.push(backend.zeros(p.value.dims()).unwrap()));
    let image = 3 * SIDE * SIDE;
    let mut first_loss = None;
    let mut last_loss = 0.0;
    for epoch in 0..12 {
        for (b, chunk) in labels.chunks(batch).enumerate() {
            let start = b * batch;
            let input = backend
                .from_host(
                    &x[start * image..(start + chunk.len()) * image],
                    &[chunk.len(), 3, SIDE, SIDE],
                )
                .unwrap();
            net.zero_grads();
            let seed = (epoch * 100 + b) as u64;
            let logits = net
                .forward(&backend, &input, ForwardMode::Train { seed })
                .unwrap();
            let ce = backend.softmax_cross_entropy(&logits, chunk).unwrap();
            last_loss = backend.to_host(&ce.loss).unwrap()[0];
            first_loss.get_or_insert(last_loss);
            net.backward(&backend, &ce.grad).unwrap();
            let mut i = 0;
            net.visit_params_mut(&mut |name, p| {
                let grad = p
                    .grad
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name} has no gradient"));
                backend
                    .sgd_step_(&mut p.value, grad, &mut momenta[i], &step)
                    .unwrap();
                i += 1;
            });
        }
    }
    let after = accuracy(&backend, &mut net, &x, &labels);
    let first_loss = first_loss.unwrap_or(f32::NAN);
    eprintln!("training accuracy {before} → {after}, loss {first_loss} → {last_loss}");
    assert!(
        after > 0.95,
        "training accuracy {after} (before {before}); loss {first_loss} → {last_loss}"
    );
    assert!(
        last_loss < 0.5 * first_loss,
        "loss {first_loss} → {last_loss}"
    );
    // A held-out set from the same distribution: the network learned the patterns, not the samples.
    let (x_test, labels_test) = dataset(128, 2);
    let test = accuracy(&backend, &mut net, &x_test, &labels_test);
    eprintln!("held-out accuracy {test}");
    assert!(test > 0.9, "held-out accuracy {test}");
}
