//! A few SGD steps of a tiny conv → batch norm → ReLU → max-pool → linear network, written once against
//! the `Backend` trait and run on the GPU and on the CPU reference.
//!
//! Tolerance: every op agrees to within ~1e-6 relative per step (summation order, see `ops.rs`); over
//! five steps at lr 0.1 these differences stay far below 1e-3, while the parameters themselves move by
//! more than 1e-2 (asserted), so a wrong gradient or update anywhere cannot pass.

mod common;

use common::*;
use swa_core::backend::prelude::*;
use swa_core::backend::{Conv2dSpec, SgdStep};

const BATCH: usize = 6;
const CLASSES: usize = 3;
const TOLERANCE: f32 = 1e-3;

struct Net<B: Backend> {
    conv_w: B::Tensor,
    gamma: B::Tensor,
    beta: B::Tensor,
    running_mean: B::Tensor,
    running_var: B::Tensor,
    fc_w: B::Tensor,
    fc_b: B::Tensor,
    momenta: Vec<B::Tensor>,
}

fn init<B: Backend>(b: &B) -> Net<B> {
    let scaled = |seed, n, s: f32| random(seed, n).iter().map(|v| v * s).collect::<Vec<_>>();
    let conv_w = b
        .from_host(&scaled(1, 4 * 3 * 9, 0.3), &[4, 3, 3, 3])
        .unwrap();
    let gamma = b.from_host(&[1.0, 0.9, 1.1, 1.0], &[4]).unwrap();
    let beta = b.zeros(&[4]).unwrap();
    let running_mean = b.zeros(&[4]).unwrap();
    let running_var = b.from_host(&[1.0; 4], &[4]).unwrap();
    let fc_w = b
        .from_host(&scaled(2, CLASSES * 64, 0.2), &[CLASSES, 64])
        .unwrap();
    let fc_b = b.zeros(&[CLASSES]).unwrap();
    let shapes: [&[usize]; 5] = [&[4, 3, 3, 3], &[4], &[4], &[CLASSES, 64], &[CLASSES]];
    let momenta = shapes.iter().map(|s| b.zeros(s).unwrap()).collect();
    Net {
        conv_w,
        gamma,
        beta,
        running_mean,
        running_var,
        fc_w,
        fc_b,
        momenta,
    }
}

/// One training step; returns the loss before the update.
fn step<B: Backend>(b: &B, net: &mut Net<B>, x: &B::Tensor, labels: &[u32]) -> f32 {
    let spec = Conv2dSpec {
        stride: 1,
        padding: 1,
    };
    let conv = b.conv2d(x, &net.conv_w, None, spec).unwrap();
    let (normed, saved) = b
        .batch_norm_train(
            &conv,
            &net.gamma,
            &net.beta,
            &mut net.running_mean,
            &mut net.running_var,
            0.1,
            1e-5,
        )
        .unwrap();
    let act = b.relu(&normed).unwrap();
    let pooled = b.max_pool2d(&act, 2, 2, 0).unwrap();
    let flat = b
        .reshape(b.duplicate(&pooled).unwrap(), &[BATCH, 64])
        .unwrap();
    let mut logits = b.matmul(&flat, &net.fc_w, false, true).unwrap();
    b.add_row_bias_(&mut logits, &net.fc_b).unwrap();
    let ce = b.softmax_cross_entropy(&logits, labels).unwrap();

    let d_fc_w = b.matmul(&ce.grad, &flat, true, false).unwrap();
    let d_fc_b = b.sum_rows(&ce.grad).unwrap();
    let d_flat = b.matmul(&ce.grad, &net.fc_w, false, false).unwrap();
    let d_pooled = b.reshape(d_flat, &[BATCH, 4, 4, 4]).unwrap();
    let d_act = b.max_pool2d_backward(&act, &d_pooled, 2, 2, 0).unwrap();
    let d_normed = b.relu_backward(&act, &d_act).unwrap();
    let bn = b
        .batch_norm_backward(&conv, &net.gamma, &saved, &d_normed)
        .unwrap();
    let conv_grads = b
        .conv2d_backward(x, &net.conv_w, &bn.input, spec, false, false)
        .unwrap();

    let sgd = SgdStep {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 5e-4,
        dampening: 0.0,
        nesterov: false,
    };
    let [m0, m1, m2, m3, m4] = &mut net.momenta[..] else {
        unreachable!()
    };
    b.sgd_step_(&mut net.conv_w, &conv_grads.weight, m0, &sgd)
        .unwrap();
    b.sgd_step_(&mut net.gamma, &bn.gamma, m1, &sgd).unwrap();
    b.sgd_step_(&mut net.beta, &bn.beta, m2, &sgd).unwrap();
    b.sgd_step_(&mut net.fc_w, &d_fc_w, m3, &sgd).unwrap();
    b.sgd_step_(&mut net.fc_b, &d_fc_b, m4, &sgd).unwrap();
    b.to_host(&ce.loss).unwrap()[0]
}

fn params<B: Backend>(b: &B, net: &Net<B>) -> Vec<Vec<f32>> {
    [
        &net.conv_w,
        &net.gamma,
        &net.beta,
        &net.running_mean,
        &net.running_var,
        &net.fc_w,
        &net.fc_b,
    ]
    .iter()
    .map(|t| b.to_host(t).unwrap())
    .collect()
}

fn run<B: Backend>(b: &B) -> (Vec<f32>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let x = b
        .from_host(&random(3, BATCH * 3 * 8 * 8), &[BATCH, 3, 8, 8])
        .unwrap();
    let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % CLASSES as u32).collect();
    let mut net = init(b);
    let initial = params(b, &net);
    let losses = (0..5).map(|_| step(b, &mut net, &x, &labels)).collect();
    (losses, initial, params(b, &net))
}

#[test]
fn sgd_steps_agree_with_cpu() {
    let Some(g) = gpu() else { return };
    let (gpu_losses, initial, gpu_params) = run(&g);
    let (cpu_losses, _, cpu_params) = run(&cpu());
    eprintln!("losses gpu {gpu_losses:?} cpu {cpu_losses:?}");
    assert!(
        cpu_losses[4] < cpu_losses[0],
        "training should lower the loss: {cpu_losses:?}"
    );
    let bounds = vec![TOLERANCE; gpu_losses.len()];
    assert_within("losses", &gpu_losses, &cpu_losses, &bounds);
    let names = [
        "conv weight",
        "gamma",
        "beta",
        "running mean",
        "running var",
        "fc weight",
        "fc bias",
    ];
    for ((name, (got, want)), start) in names
        .iter()
        .zip(gpu_params.iter().zip(&cpu_params))
        .zip(&initial)
    {
        let moved = want
            .iter()
            .zip(start)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            moved > 10.0 * TOLERANCE,
            "{name} moved only {moved}: the check would be vacuous"
        );
        assert_within(name, got, want, &vec![TOLERANCE; got.len()]);
    }
}
