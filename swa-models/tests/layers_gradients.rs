//! Finite-difference checks of every layer's backward pass on the CPU backend, and of the behaviours a
//! training loop relies on: caches released after backward, BatchNorm modes, dropout streams, the first
//! layer's skipped input gradient.

mod common;

use rand::rngs::StdRng;
use rand::SeedableRng;
use swa_core::backend::{Backend, Conv2dSpec, HasShape};
use swa_core::CpuBackend;
use swa_models::layers::gradcheck::{check_gradients, GradCheckConfig, GradCheckReport};
use swa_models::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, ConvInit, DenseBlock, Dropout, Flatten, Linear,
    MaxPool2d, ReLU, Residual, Sequential,
};
use swa_models::{ForwardMode, Module};

fn backend() -> CpuBackend {
    CpuBackend::with_threads(2)
}

fn random_input(seed: u64, shape: &[usize]) -> Vec<f32> {
    common::random_input(seed, shape.iter().product())
}

/// As `common::assert_agrees`, and exactly `expected_entries` gradients were compared.
fn assert_agrees(what: &str, report: &GradCheckReport, expected_entries: usize) {
    assert_eq!(
        report.entries.len(),
        expected_entries,
        "{what}: number of compared gradients"
    );
    common::assert_agrees(what, report, expected_entries);
}

fn check<M: Module<CpuBackend>>(
    what: &str,
    module: &mut M,
    shape: &[usize],
    config: &GradCheckConfig,
    expected_entries: usize,
) {
    let b = backend();
    let x = random_input(11, shape);
    let report = check_gradients(&b, module, &x, shape, true, config)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_agrees(what, &report, expected_entries);
}

#[test]
fn conv2d_gradients_with_bias_stride_and_padding() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(1);
    let config = Conv2dConfig::new(3, 4, 3).stride(2).padding(1);
    let mut conv = Conv2d::new(&b, config, &mut rng).unwrap();
    let cfg = GradCheckConfig::default();
    // 24 inputs, 6 weights, 4 biases.
    check(
        "conv 3×3 stride 2",
        &mut conv,
        &[2, 3, 7, 7],
        &cfg,
        24 + 6 + 4,
    );

    let config = Conv2dConfig::new(3, 5, 1)
        .bias(false)
        .init(ConvInit::HeNormalFanOut);
    let mut conv = Conv2d::new(&b, config, &mut rng).unwrap();
    check(
        "conv 1×1 without bias",
        &mut conv,
        &[2, 3, 5, 5],
        &cfg,
        24 + 6,
    );
}

#[test]
fn batch_norm_training_gradients() {
    let b = backend();
    let mut bn = BatchNorm2d::new(&b, 3).unwrap();
    // Non-trivial scale and shift, so that their gradients and the input gradient's terms all matter.
    bn.visit_params_mut(&mut |name, p| {
        let values = if name == "weight" {
            vec![0.5, 1.5, -1.0]
        } else {
            vec![0.1, -0.2, 0.3]
        };
        p.value = b.from_host(&values, &[3]).unwrap();
    });
    let cfg = GradCheckConfig::default();
    check("batch norm", &mut bn, &[3, 3, 4, 4], &cfg, 24 + 3 + 3);
}

#[test]
fn linear_relu_pool_flatten_and_dropout_gradients() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(2);
    let cfg = GradCheckConfig::default();
    let mut linear = Linear::new(&b, 6, 4, &mut rng).unwrap();
    check("linear", &mut linear, &[3, 6], &cfg, 18 + 6 + 4);

    // Each layer after a convolution, so that the check covers its backward inside a chain.
    let chain = |layer: Box<dyn Module<CpuBackend>>, rng: &mut StdRng| {
        let conv = Conv2d::new(&b, Conv2dConfig::new(2, 3, 3).padding(1), rng).unwrap();
        let mut seq = Sequential::new().with(conv);
        seq.push_boxed("1", layer);
        seq
    };
    let mut relu = chain(Box::new(ReLU::new()), &mut rng);
    check("conv → relu", &mut relu, &[2, 2, 6, 6], &cfg, 24 + 6 + 3);
    let mut max = chain(Box::new(MaxPool2d::new(2, 2).unwrap()), &mut rng);
    check("conv → max pool", &mut max, &[2, 2, 6, 6], &cfg, 24 + 6 + 3);
    let mut avg = chain(Box::new(AvgPool2d::new(3).unwrap()), &mut rng);
    check("conv → avg pool", &mut avg, &[2, 2, 6, 6], &cfg, 24 + 6 + 3);
    let mut drop = chain(Box::new(Dropout::new(0.4, 3).unwrap()), &mut rng);
    check("conv → dropout", &mut drop, &[2, 2, 6, 6], &cfg, 24 + 6 + 3);

    let mut flat = Sequential::new()
        .with(Conv2d::new(&b, Conv2dConfig::new(2, 3, 3), &mut rng).unwrap())
        .with(Flatten::new())
        .with(Linear::new(&b, 3 * 4 * 4, 5, &mut rng).unwrap());
    // conv: 6 weights + 3 biases; linear: 6 weights + 5 biases.
    check(
        "conv → flatten → linear",
        &mut flat,
        &[2, 2, 6, 6],
        &cfg,
        24 + 20,
    );
}

#[test]
fn residual_block_gradients() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(3);
    let cfg = GradCheckConfig {
        param_samples: 3,
        ..Default::default()
    };
    let params = |block: &mut Residual<CpuBackend>| {
        let mut n = 0;
        block.visit_params_mut(&mut |_, p| n += p.value.numel().min(3));
        n
    };

    // Identity shortcut, then a strided projection.
    let mut block = Residual::preact_basic(&b, 4, 4, 1, &mut rng).unwrap();
    assert!(!block.has_projection());
    let n = params(&mut block);
    check(
        "basic block, identity",
        &mut block,
        &[2, 4, 6, 6],
        &cfg,
        24 + n,
    );
    let mut block = Residual::preact_basic(&b, 3, 4, 2, &mut rng).unwrap();
    assert!(block.has_projection());
    let n = params(&mut block);
    check(
        "basic block, projection",
        &mut block,
        &[2, 3, 6, 6],
        &cfg,
        24 + n,
    );

    let mut block = Residual::preact_bottleneck(&b, 3, 2, 2, &mut rng).unwrap();
    let n = params(&mut block);
    check("bottleneck block", &mut block, &[2, 3, 6, 6], &cfg, 24 + n);

    let mut block = Residual::wide_basic(&b, 3, 4, 2, 0.3, 0, &mut rng).unwrap();
    let n = params(&mut block);
    check(
        "wide basic block with dropout",
        &mut block,
        &[2, 3, 6, 6],
        &cfg,
        24 + n,
    );
}

/// A dense block of three layers: each layer reads the block's input and the layers before it piece by
/// piece, so the input's gradient gathers the output's slice and what three layers send back, and
/// `norm1` and `conv1` of the later layers get their gradients slice by slice (enough elements sampled
/// to reach every piece's slice).
#[test]
fn dense_block_gradients() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(5);
    let mut block = DenseBlock::new(&b, 3, 3, 2, 2, &mut rng).unwrap();
    assert_eq!(block.out_channels(), 9);
    let cfg = GradCheckConfig {
        param_samples: 12,
        ..Default::default()
    };
    let mut n = 0;
    block.visit_params_mut(&mut |_, p| n += p.value.numel().min(12));
    check("dense block", &mut block, &[2, 3, 5, 5], &cfg, 24 + n);
}

#[test]
fn backward_releases_caches_and_needs_a_training_forward() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(4);
    let mut block = Residual::preact_basic(&b, 2, 2, 1, &mut rng).unwrap();
    let x = b
        .from_host(&random_input(5, &[2, 2, 4, 4]), &[2, 2, 4, 4])
        .unwrap();
    let y = block
        .forward(&b, &x, ForwardMode::Train { seed: 0 })
        .unwrap();
    block.backward(&b, &y).unwrap();
    assert!(
        block.backward(&b, &y).is_err(),
        "a second backward found a cache that the first should have released"
    );

    for mode in [
        ForwardMode::Eval,
        ForwardMode::RecomputeBatchNorm {
            momentum: 0.5,
            seed: 0,
        },
    ] {
        let y = block.forward(&b, &x, mode).unwrap();
        assert!(
            block.backward(&b, &y).is_err(),
            "{mode:?} cached activations for backward"
        );
    }

    block
        .forward(&b, &x, ForwardMode::Train { seed: 0 })
        .unwrap();
    block.zero_grads();
    assert!(block.backward(&b, &y).is_err(), "zero_grads kept the cache");
}

#[test]
fn gradients_accumulate_over_backward_passes() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(6);
    let mut linear = Linear::new(&b, 3, 2, &mut rng).unwrap();
    let x = b.from_host(&random_input(7, &[4, 3]), &[4, 3]).unwrap();
    let dy = b.from_host(&random_input(8, &[4, 2]), &[4, 2]).unwrap();
    let mut grads = Vec::new();
    for _ in 0..2 {
        linear
            .forward(&b, &x, ForwardMode::Train { seed: 0 })
            .unwrap();
        linear.backward(&b, &dy).unwrap();
        grads.push(b.to_host(linear.weight().grad.as_ref().unwrap()).unwrap());
    }
    for (once, twice) in grads[0].iter().zip(&grads[1]) {
        assert!((2.0 * once - twice).abs() <= 1e-6 * once.abs().max(1.0));
    }
}

#[test]
fn batch_norm_modes_use_and_update_the_right_statistics() {
    let b = backend();
    let shape = [4, 2, 3, 3];
    let values = random_input(9, &shape);
    let x = b.from_host(&values, &shape).unwrap();
    // Per-channel batch mean and unbiased variance, computed here independently.
    let per_channel = 4 * 9;
    let mut mean = [0.0f64; 2];
    let mut var = [0.0f64; 2];
    for c in 0..2 {
        let xs: Vec<f64> = (0..4)
            .flat_map(|n| (0..9).map(move |i| (n, i)))
            .map(|(n, i)| f64::from(values[(n * 2 + c) * 9 + i]))
            .collect();
        mean[c] = xs.iter().sum::<f64>() / per_channel as f64;
        var[c] = xs.iter().map(|v| (v - mean[c]).powi(2)).sum::<f64>() / (per_channel - 1) as f64;
    }
    let close = |got: &[f32], want: &[f64]| {
        got.iter()
            .zip(want)
            .all(|(&g, &w)| (f64::from(g) - w).abs() < 1e-5)
    };

    let mut bn = BatchNorm2d::new(&b, 2).unwrap().with_momentum(0.9);
    bn.forward(&b, &x, ForwardMode::Train { seed: 0 }).unwrap();
    let rm = b.to_host(bn.running_mean()).unwrap();
    let rv = b.to_host(bn.running_var()).unwrap();
    let want_rm: Vec<f64> = mean.iter().map(|m| 0.9 * m).collect();
    let want_rv: Vec<f64> = var.iter().map(|v| 0.1 + 0.9 * v).collect();
    assert!(
        close(&rm, &want_rm),
        "running mean {rm:?}, want {want_rm:?}"
    );
    assert!(close(&rv, &want_rv), "running var {rv:?}, want {want_rv:?}");
    assert_eq!(bn.num_batches_tracked(), 1);

    // Recomputation uses the given momentum, not the layer's own: momentum 1 replaces the statistics.
    let mut bn = BatchNorm2d::new(&b, 2).unwrap();
    let mode = ForwardMode::RecomputeBatchNorm {
        momentum: 1.0,
        seed: 0,
    };
    bn.forward(&b, &x, mode).unwrap();
    assert!(close(&b.to_host(bn.running_mean()).unwrap(), &mean));
    assert!(close(&b.to_host(bn.running_var()).unwrap(), &var));
    assert_eq!(bn.num_batches_tracked(), 1);

    // Evaluation normalises with those running statistics and leaves them alone.
    let y = b
        .to_host(&bn.forward(&b, &x, ForwardMode::Eval).unwrap())
        .unwrap();
    assert_eq!(bn.num_batches_tracked(), 1);
    for (i, (&xi, &yi)) in values.iter().zip(&y).enumerate() {
        let c = (i / 9) % 2;
        let want = (f64::from(xi) - mean[c]) / (var[c] + 1e-5).sqrt();
        assert!(
            (f64::from(yi) - want).abs() < 1e-4,
            "element {i}: {yi} vs {want}"
        );
    }
}

#[test]
fn dropout_layers_draw_different_masks_and_evaluation_is_the_identity() {
    let b = backend();
    let shape = [4, 64];
    let x = b.from_host(&vec![1.0; 256], &shape).unwrap();
    let mut first = Dropout::<CpuBackend>::new(0.5, 0).unwrap();
    let mut second = Dropout::<CpuBackend>::new(0.5, 1).unwrap();
    let train = ForwardMode::Train { seed: 42 };
    let a = b.to_host(&first.forward(&b, &x, train).unwrap()).unwrap();
    let again = b.to_host(&first.forward(&b, &x, train).unwrap()).unwrap();
    let other = b.to_host(&second.forward(&b, &x, train).unwrap()).unwrap();
    let next_step = b
        .to_host(
            &first
                .forward(&b, &x, ForwardMode::Train { seed: 43 })
                .unwrap(),
        )
        .unwrap();
    assert_eq!(a, again, "the same seed must give the same mask");
    assert_ne!(a, other, "two layers drew the same mask");
    assert_ne!(a, next_step, "two steps drew the same mask");
    assert!(a.iter().all(|&v| v == 0.0 || v == 2.0));
    let kept = a.iter().filter(|&&v| v > 0.0).count();
    assert!((90..=166).contains(&kept), "kept {kept} of 256 at p = 0.5");

    let eval = b
        .to_host(&first.forward(&b, &x, ForwardMode::Eval).unwrap())
        .unwrap();
    assert!(eval.iter().all(|&v| v == 1.0));
    assert!(Dropout::<CpuBackend>::new(1.0, 0).is_err());
}

#[test]
fn a_first_convolution_can_skip_its_input_gradient() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(12);
    let make = |rng: &mut StdRng| Conv2d::new(&b, Conv2dConfig::new(2, 3, 3).padding(1), rng);
    let mut full = make(&mut rng.clone()).unwrap();
    let mut first = make(&mut rng).unwrap();
    first.require_input_grad(false);
    let x = b
        .from_host(&random_input(13, &[2, 2, 5, 5]), &[2, 2, 5, 5])
        .unwrap();
    let dy = b
        .from_host(&random_input(14, &[2, 3, 5, 5]), &[2, 3, 5, 5])
        .unwrap();
    for conv in [&mut full, &mut first] {
        conv.forward(&b, &x, ForwardMode::Train { seed: 0 })
            .unwrap();
    }
    let dx_full = full.backward(&b, &dy).unwrap();
    let dx_first = first.backward(&b, &dy).unwrap();
    assert_eq!(dx_full.dims(), &[2, 2, 5, 5]);
    assert_eq!(dx_first.dims(), &[0]);
    // The weight gradient is the same either way.
    assert_eq!(
        b.to_host(full.weight().grad.as_ref().unwrap()).unwrap(),
        b.to_host(first.weight().grad.as_ref().unwrap()).unwrap()
    );
}

#[test]
fn layers_name_their_tensors_as_pytorch_does() {
    use swa_core::params::{NamedTensors, TensorRole};
    let b = backend();
    let mut rng = StdRng::seed_from_u64(15);
    let block = Residual::preact_basic(&b, 2, 4, 2, &mut rng).unwrap();
    let mut names = Vec::new();
    block.visit_tensors(&mut |name, role, t| {
        names.push((name.to_string(), role, t.dims().to_vec()))
    });
    let stat = TensorRole::BatchNormStatistic;
    let param = TensorRole::Parameter;
    let want = vec![
        ("bn1.weight", param, vec![2]),
        ("bn1.bias", param, vec![2]),
        ("bn1.running_mean", stat, vec![2]),
        ("bn1.running_var", stat, vec![2]),
        ("conv1.weight", param, vec![4, 2, 3, 3]),
        ("bn2.weight", param, vec![4]),
        ("bn2.bias", param, vec![4]),
        ("bn2.running_mean", stat, vec![4]),
        ("bn2.running_var", stat, vec![4]),
        ("conv2.weight", param, vec![4, 4, 3, 3]),
        ("downsample.0.weight", param, vec![4, 2, 1, 1]),
    ];
    let want: Vec<_> = want
        .into_iter()
        .map(|(n, r, s)| (n.to_string(), r, s))
        .collect();
    assert_eq!(names, want);

    let mut counters = Vec::new();
    block.visit_batch_counters(&mut |name, count| counters.push((name.to_string(), count)));
    assert_eq!(
        counters,
        vec![
            ("bn1.num_batches_tracked".to_string(), 0),
            ("bn2.num_batches_tracked".to_string(), 0)
        ]
    );

    let conv = Conv2d::<CpuBackend>::from_tensors(
        b.zeros(&[3, 2, 3, 3]).unwrap(),
        Some(b.zeros(&[4]).unwrap()),
        Conv2dSpec {
            stride: 1,
            padding: 1,
        },
    );
    assert!(conv.is_err(), "a bias of the wrong length was accepted");
}

/// A layer whose backward is off by 10% (a stand-in for a wrong gradient), to show the check has teeth.
struct ScaledBackward(Linear<CpuBackend>);

impl swa_core::params::NamedTensors<CpuBackend> for ScaledBackward {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, swa_core::TensorRole, &swa_core::CpuTensor)) {
        self.0.visit_tensors(f)
    }
    fn visit_tensors_mut(
        &mut self,
        f: &mut dyn FnMut(&str, swa_core::TensorRole, &mut swa_core::CpuTensor),
    ) {
        self.0.visit_tensors_mut(f)
    }
}

impl Module<CpuBackend> for ScaledBackward {
    fn forward_input(
        &mut self,
        b: &CpuBackend,
        x: swa_models::module::ForwardInput<'_, CpuBackend>,
        mode: ForwardMode,
    ) -> swa_core::BackendResult<swa_core::CpuTensor> {
        self.0.forward_input(b, x, mode)
    }
    fn backward(
        &mut self,
        b: &CpuBackend,
        dy: &swa_core::CpuTensor,
    ) -> swa_core::BackendResult<swa_core::CpuTensor> {
        let mut dx = self.0.backward(b, dy)?;
        b.scale_(&mut dx, 1.1)?;
        Ok(dx)
    }
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut swa_models::Param<CpuBackend>)) {
        self.0.visit_params_mut(f)
    }
}

#[test]
fn the_check_catches_a_wrong_input_gradient() {
    let b = backend();
    let mut rng = StdRng::seed_from_u64(16);
    let mut wrong = ScaledBackward(Linear::new(&b, 6, 4, &mut rng).unwrap());
    let x = random_input(17, &[3, 6]);
    let report = check_gradients(
        &b,
        &mut wrong,
        &x,
        &[3, 6],
        true,
        &GradCheckConfig::default(),
    )
    .unwrap();
    let failures = report.failures();
    assert!(
        failures.len() >= 15 && failures.iter().all(|e| e.tensor == "input"),
        "the check missed a 10% error in the input gradient: {} failures",
        failures.len()
    );
}
