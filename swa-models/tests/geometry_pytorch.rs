//! The loss-surface line against PyTorch: the points `t·w_SGD + (1 − t)·w_SWA` that
//! `geometry::line` builds and `SurfaceProbe` evaluates give the losses and errors that PyTorch gives
//! for the same weights and batches.
//!
//! The fixture comes from `tools/make_golden.py`; regenerate it with
//!
//! ```text
//! /tmp/ref/bin/python swa-models/tools/make_golden.py --only geometry
//! ```
//!
//! (any Python with PyTorch and safetensors, and the reference networks' `torch_ref.py`, will do). It
//! holds two PreResNet-8 state_dicts from two torch seeds, with BatchNorm's scales and shifts
//! randomised (`sgd.<key>`, `swa.<key>`), two train batches and one test batch of eight images, and for
//! each t of [`TS`], PyTorch's numbers: the parameters interpolated in float64 and rounded once to
//! float32, BatchNorm's statistics reset and recomputed with `torch.optim.swa_utils.update_bn` on the
//! train batches (a cumulative mean, which equals swa-models' batch-size-weighted mean on batches of one
//! size), then in eval mode the mean cross-entropy (float64 from the float32 logits) and the error on
//! the train and test images, and `wd/2 · Σ‖p‖²` over `model.parameters()`.
//!
//! Tolerances: the losses and the L2 term agree to [`RELATIVE_TOLERANCE`] (on the CPU they differ by
//! about 1e-7: single-precision kernels that sum in another order than PyTorch's, and the weight decay
//! held as an `f32`). The errors must agree image for image: the generator refuses data on which an
//! image's two largest logits are closer than 1e-3 of the largest logit's magnitude, far above that
//! rounding, so no prediction can flip between the two implementations.

mod common;

use std::path::PathBuf;

use swa_core::backend::Backend;
use swa_core::CpuBackend;
use swa_models::checkpoint::{StateDict, StoredTensor};
use swa_models::geometry::{line, PointMetrics, SurfaceData, SurfaceProbe, WeightVector};
use swa_models::{Architecture, HostBatch};

const NETWORK: &str = "preresnet8";
const CLASSES: usize = 10;
/// The points of the line, as `GEOMETRY_TS` in make_golden.py: one between SWA (0) and SGD (1), one
/// beyond SGD.
const TS: [f64; 2] = [0.25, 1.5];
/// `GEOMETRY_WEIGHT_DECAY`.
const WEIGHT_DECAY: f32 = 5e-4;
const TRAIN_BATCHES: usize = 2;
const RELATIVE_TOLERANCE: f64 = 1e-4;

fn fixture() -> StateDict {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "tests/fixtures/golden_geometry_{NETWORK}.safetensors"
    ));
    StateDict::load(&path).expect("the geometry fixture (see make_golden.py --only geometry)")
}

fn scalar(io: &StateDict, name: &str) -> f64 {
    match io.get(name) {
        Some(StoredTensor::F64 { shape, values }) if shape.is_empty() => values[0],
        other => panic!(
            "{}: `{name}` is {other:?}, expected an f64 scalar",
            io.origin()
        ),
    }
}

fn batch(io: &StateDict, prefix: &str) -> HostBatch {
    let (shape, images) = match io.get(&format!("{prefix}.input")) {
        Some(StoredTensor::F32 { shape, values }) => (shape, values),
        other => panic!("{prefix}.input is {other:?}"),
    };
    let labels = match io.get(&format!("{prefix}.labels")) {
        Some(StoredTensor::I64 { values, .. }) => values
            .iter()
            .map(|&l| u32::try_from(l).expect("labels are class indices"))
            .collect(),
        other => panic!("{prefix}.labels is {other:?}"),
    };
    HostBatch {
        images: images.clone(),
        shape: shape
            .as_slice()
            .try_into()
            .expect("images are [n, c, h, w]"),
        labels,
    }
}

fn relative_difference(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs()
}

/// The number of misclassified images an error in percent stands for (rounded: one image is a whole
/// unit, so rounding cannot hide a difference of one).
fn misclassified(error_percent: f64, images: usize) -> f64 {
    (error_percent / 100.0 * images as f64).round()
}

/// Evaluates the fixture's line on `backend` and compares every point with PyTorch's numbers, returning
/// the largest relative difference of a loss.
fn check_line_against_pytorch<B: Backend>(backend: &B, label: &str) -> f64 {
    let io = fixture();
    let architecture: Architecture = NETWORK.parse().expect("architecture name");
    // Another seed than PyTorch's: every parameter must come from the points, and every BatchNorm
    // statistic from update_bn.
    let net = architecture
        .build(backend, CLASSES, 12345)
        .expect("network");
    let mut probe = SurfaceProbe::new(backend.clone(), net, WEIGHT_DECAY);
    let sgd: WeightVector = probe
        .layout()
        .vector_of(&common::prefixed(&io, "sgd"))
        .expect("the SGD weights");
    let swa: WeightVector = probe
        .layout()
        .vector_of(&common::prefixed(&io, "swa"))
        .expect("the SWA weights");

    let train: Vec<HostBatch> = (0..TRAIN_BATCHES)
        .map(|j| batch(&io, &format!("train{j}")))
        .collect();
    let test = vec![batch(&io, "test0")];
    let data = SurfaceData {
        train: &train,
        test: &test,
    };
    let survey = line(&sgd, &swa, &TS).expect("the line");
    assert_eq!(survey.points.len(), TS.len());

    let mut worst: f64 = 0.0;
    for (i, &t) in TS.iter().enumerate() {
        let prefix = format!("t{i}");
        assert_eq!(scalar(&io, &format!("{prefix}.t")), t, "the fixture's t{i}");
        let got = probe.evaluate(&survey.point(i), data).expect("evaluation");
        let want = PointMetrics {
            train_loss: scalar(&io, &format!("{prefix}.train_loss")),
            train_nll: scalar(&io, &format!("{prefix}.train_nll")),
            l2_term: scalar(&io, &format!("{prefix}.l2_term")),
            train_error: scalar(&io, &format!("{prefix}.train_error")),
            test_loss: scalar(&io, &format!("{prefix}.test_loss")),
            test_error: scalar(&io, &format!("{prefix}.test_error")),
        };
        eprintln!("{label}: t = {t}: {got:?}\n{label}: PyTorch:  {want:?}");
        for (what, g, w) in [
            ("train_loss", got.train_loss, want.train_loss),
            ("train_nll", got.train_nll, want.train_nll),
            ("l2_term", got.l2_term, want.l2_term),
            ("test_loss", got.test_loss, want.test_loss),
        ] {
            let difference = relative_difference(g, w);
            eprintln!("{label}: t = {t}: {what} differs by {difference:.2e} (relative)");
            assert!(
                difference < RELATIVE_TOLERANCE,
                "{label}: at t = {t} {what} is {g}, PyTorch's {w} ({difference:.2e} relative)"
            );
            worst = worst.max(difference);
        }
        for (what, g, w, images) in [
            (
                "train_error",
                got.train_error,
                want.train_error,
                data.train_images(),
            ),
            (
                "test_error",
                got.test_error,
                want.test_error,
                data.test_images(),
            ),
        ] {
            assert_eq!(
                misclassified(g, images),
                misclassified(w, images),
                "{label}: at t = {t} {what} is {g} %, PyTorch's {w} % (of {images} images)"
            );
        }
    }
    worst
}

#[test]
fn the_sgd_swa_line_matches_pytorch_on_cpu() {
    let worst = check_line_against_pytorch(&CpuBackend::with_threads(2), "cpu");
    eprintln!("cpu: largest relative difference of a loss {worst:.2e}");
}
