//! SWA in miniature, step for step against PyTorch's own training tools.
//!
//! The fixtures come from `tools/make_golden.py` (`--only train`): PreResNet-8 from a stored `state_dict`
//! takes four steps of `torch.optim.SGD` (momentum 0.9, weight decay 3e-4, a new learning rate each step)
//! on fixed batches of four images; `torch.optim.swa_utils.AveragedModel` averages the weights after
//! steps 2, 3 and 4; `swa_utils.update_bn` recomputes BatchNorm over two more batches; the average then
//! classifies a test batch in eval mode. The same steps here go through the crate's public API (`Sgd`,
//! `WeightAverage`, `update_bn`) on any backend, and every loss, weight, running statistic and logit is
//! compared. This pins the whole training semantics to PyTorch's: the loss and its gradient, every
//! layer's backward pass, weight decay on every parameter, momentum, BatchNorm's running statistics in
//! training and in the recomputation, and the running mean of the weights.
//!
//! Tolerance: single-precision kernels that sum in another order than PyTorch's differ by about 1e-6
//! relative per op; through four steps at learning rates up to 0.1 that stays below 2e-5 of each tensor's
//! largest magnitude. The test also asserts that training moved every weight tensor by at least twice
//! that, so a missing update cannot pass.

use std::path::{Path, PathBuf};

use swa_core::averaging::{BufferPolicy, WeightAverage, WeightAveraging};
use swa_core::backend::{Backend, HasShape};
use swa_models::checkpoint::{load_module, StateDict, StoredTensor};
use swa_models::optim::{Sgd, SgdConfig};
use swa_models::{update_bn, ForwardMode, HostBatch, Module, Network, NetworkConfig};

const NETWORK: &str = "preresnet8";
const CLASSES: usize = 10;
/// The learning rate of each step, as `TRAIN_LRS` in make_golden.py.
const LEARNING_RATES: [f32; 4] = [0.1, 0.05, 0.05, 0.02];
const MOMENTUM: f32 = 0.9;
const WEIGHT_DECAY: f32 = 3e-4;
/// 0-based step after which the weights are averaged (`TRAIN_SWA_FROM`).
const SWA_FROM_STEP: usize = 1;
const BN_BATCHES: usize = 2;
const TOLERANCE: f32 = 2e-5;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../swa-models/tests/fixtures")
}

fn f32_entry<'a>(io: &'a StateDict, name: &str) -> (&'a [usize], &'a [f32]) {
    match io.get(name) {
        Some(StoredTensor::F32 { shape, values }) => (shape, values),
        other => panic!(
            "{}: `{name}` is {other:?}, expected f32 values",
            io.origin()
        ),
    }
}

fn batch(io: &StateDict, prefix: &str) -> HostBatch {
    let (shape, images) = f32_entry(io, &format!("{prefix}.input"));
    let labels = match io.get(&format!("{prefix}.labels")) {
        Some(StoredTensor::I64 { values, .. }) => values
            .iter()
            .map(|&l| u32::try_from(l).expect("labels are class indices"))
            .collect(),
        // update_bn ignores labels; PyTorch's recomputation batches have none.
        None => vec![0; shape[0]],
        other => panic!("{prefix}.labels is {other:?}"),
    };
    HostBatch {
        images: images.to_vec(),
        shape: shape.try_into().expect("images are [n, c, h, w]"),
        labels,
    }
}

/// Largest element-wise difference, relative to the largest magnitude of the expected values.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// Compares every entry of `got` with `io`'s `<prefix>.<name>`, returning how many f32 tensors matched.
fn compare_state(got: &StateDict, io: &StateDict, prefix: &str, what: &str) -> usize {
    let mut compared = 0;
    for (name, tensor) in got.iter() {
        let key = format!("{prefix}.{name}");
        match (tensor, io.get(&key)) {
            (
                StoredTensor::F32 { shape, values },
                Some(StoredTensor::F32 {
                    shape: s,
                    values: v,
                }),
            ) => {
                assert_eq!(shape, s, "{what}: shape of {name}");
                let err = relative_error(values, v);
                assert!(
                    err < TOLERANCE,
                    "{what}: {name} differs from PyTorch by {err:.2e} (relative)"
                );
                compared += 1;
            }
            (StoredTensor::I64 { values, .. }, Some(StoredTensor::I64 { values: v, .. })) => {
                assert_eq!(values, v, "{what}: batch counter {name}");
            }
            (_, other) => panic!("{what}: {name} has no PyTorch counterpart ({key} is {other:?})"),
        }
    }
    let expected = io
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{prefix}.")))
        .count();
    assert_eq!(
        got.len(),
        expected,
        "{what}: PyTorch's state_dict has {expected} entries"
    );
    compared
}

/// Runs the miniature SWA protocol on `backend` and checks it against PyTorch at every stage.
pub fn check_against_pytorch<B: Backend>(backend: &B, label: &str) {
    let dir = fixture_dir();
    let io = StateDict::load(&dir.join(format!("golden_train_{NETWORK}_io.safetensors")))
        .expect("training fixture");
    let start: &Path = &dir.join(format!("golden_train_{NETWORK}.safetensors"));
    let config = NetworkConfig {
        architecture: NETWORK.parse().expect("architecture name"),
        classes: CLASSES,
    };
    // Another seed than PyTorch's: every starting value must come from the stored state_dict.
    let mut net = Network::new(backend, &config, 12345).expect("network");
    load_module(backend, &mut net, start).expect("starting weights");
    let initial = StateDict::from_module(backend, &net).expect("initial state");

    let mut optimizer = Sgd::new(SgdConfig {
        momentum: MOMENTUM,
        weight_decay: WEIGHT_DECAY,
        dampening: 0.0,
        nesterov: false,
    });
    let mut average: Option<WeightAverage<B>> = None;
    let (_, want_losses) = f32_entry(&io, "losses");
    assert_eq!(want_losses.len(), LEARNING_RATES.len());
    for (step, &lr) in LEARNING_RATES.iter().enumerate() {
        let batch = batch(&io, &format!("step{step}"));
        let x = backend.from_host(&batch.images, &batch.shape).unwrap();
        let logits = net
            .forward(backend, &x, ForwardMode::Train { seed: step as u64 })
            .unwrap();
        let ce = backend
            .softmax_cross_entropy(&logits, &batch.labels)
            .unwrap();
        let loss = backend.to_host(&ce.loss).unwrap()[0];
        let want = want_losses[step];
        eprintln!("{label}: step {step} loss {loss:.6} (PyTorch {want:.6})");
        assert!(
            (loss - want).abs() <= TOLERANCE * want.abs(),
            "{label}: loss of step {step} is {loss}, PyTorch's {want}"
        );
        net.backward(backend, &ce.grad).unwrap();
        optimizer.step(backend, &mut net, lr).unwrap();
        if step >= SWA_FROM_STEP {
            match &mut average {
                Some(average) => average.update(backend, &net).unwrap(),
                None => {
                    average = Some(
                        WeightAverage::swa(backend, &net, BufferPolicy::RecomputeLater).unwrap(),
                    )
                }
            }
        }
    }

    let trained = StateDict::from_module(backend, &net).expect("trained state");
    let compared = compare_state(&trained, &io, "trained", &format!("{label}: after SGD"));
    assert!(compared > 0);
    // Training must have moved every weight beyond the tolerance (BatchNorm's scales, which start at 1,
    // move least), or a missing update would pass the comparison.
    for (name, tensor) in trained.iter() {
        if let (StoredTensor::F32 { values, .. }, Some(StoredTensor::F32 { values: before, .. })) =
            (tensor, initial.get(name))
        {
            if name.ends_with("weight") {
                let moved = relative_error(values, before);
                assert!(
                    moved > 2.0 * TOLERANCE,
                    "{label}: {name} moved by only {moved:.2e}"
                );
            }
        }
    }

    let average = average.expect("snapshots were taken");
    assert_eq!(
        average.count(),
        (LEARNING_RATES.len() - SWA_FROM_STEP) as u64
    );
    average.copy_into(backend, &mut net).unwrap();
    let bn_batches: Vec<_> = (0..BN_BATCHES)
        .map(|i| batch(&io, &format!("bn{i}")))
        .collect();
    let seen = update_bn(backend, &mut net, bn_batches, 0).unwrap();
    assert_eq!(seen, BN_BATCHES * want_losses.len());
    let swa = StateDict::from_module(backend, &net).expect("averaged state");
    compare_state(
        &swa,
        &io,
        "swa",
        &format!("{label}: SWA average after update_bn"),
    );

    let test = batch(&io, "test");
    let x = backend.from_host(&test.images, &test.shape).unwrap();
    let logits = net.forward(backend, &x, ForwardMode::Eval).unwrap();
    assert_eq!(logits.dims(), &[test.len(), CLASSES]);
    let (_, want) = f32_entry(&io, "test.logits");
    let err = relative_error(&backend.to_host(&logits).unwrap(), want);
    eprintln!("{label}: SWA eval logits, relative error {err:.2e}");
    assert!(
        err < TOLERANCE,
        "{label}: the average's logits differ from PyTorch's by {err:.2e}"
    );
}
