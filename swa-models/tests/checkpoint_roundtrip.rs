//! Checkpoints: exact round trips, PyTorch's layout, validation errors that name the tensor, atomic writes.

use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};
use swa_core::backend::Backend;
use swa_core::params::NamedTensors;
use swa_core::CpuBackend;
use swa_models::checkpoint::{
    load_module, load_tensors, save_module, save_tensors, CheckpointError, StateDict, StoredTensor,
};
use swa_models::{Architecture, ForwardMode, Module, Network, NetworkConfig};

fn backend() -> CpuBackend {
    CpuBackend::with_threads(2)
}

fn network(name: &str, classes: usize, seed: u64) -> Network<CpuBackend> {
    let config = NetworkConfig {
        architecture: name.parse::<Architecture>().unwrap(),
        classes,
    };
    Network::new(&backend(), &config, seed).unwrap()
}

fn host_tensors<M: NamedTensors<CpuBackend> + ?Sized>(m: &M) -> Vec<(String, Vec<f32>)> {
    let b = backend();
    let mut out = Vec::new();
    m.visit_tensors(&mut |n, _, t| out.push((n.to_string(), b.to_host(t).unwrap())));
    out
}

fn counters<M: Module<CpuBackend> + ?Sized>(m: &M) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    m.visit_batch_counters(&mut |n, c| out.push((n.to_string(), c)));
    out
}

/// A network whose running statistics and batch counters have moved away from their initial values.
fn trained_network(name: &str, seed: u64) -> Network<CpuBackend> {
    let b = backend();
    let mut net = network(name, 10, seed);
    let x = b
        .from_host(
            &(0..2 * 3 * 32 * 32)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect::<Vec<_>>(),
            &[2, 3, 32, 32],
        )
        .unwrap();
    for step in 0..3 {
        net.forward(&b, &x, ForwardMode::Train { seed: step })
            .unwrap();
    }
    net.zero_grads();
    net
}

#[test]
fn a_saved_network_loads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("net.safetensors");
    let b = backend();
    let saved = trained_network("preresnet8", 1);
    save_module(&b, &saved, &path).unwrap();

    let mut loaded = network("preresnet8", 10, 2);
    assert_ne!(host_tensors(&saved), host_tensors(&loaded));
    load_module(&b, &mut loaded, &path).unwrap();
    assert_eq!(host_tensors(&saved), host_tensors(&loaded));
    assert_eq!(counters(&saved), counters(&loaded));
    assert!(counters(&loaded).iter().all(|(_, c)| *c == 3));

    // Saving and loading a boxed network from an architecture name works the same way.
    let mut boxed = "preresnet8"
        .parse::<Architecture>()
        .unwrap()
        .build(&b, 10, 3)
        .unwrap();
    load_module(&b, boxed.as_mut(), &path).unwrap();
    assert_eq!(host_tensors(&saved), host_tensors(boxed.as_ref()));
}

#[test]
fn the_file_has_pytorch_names_types_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrn.safetensors");
    let b = backend();
    let net = trained_network("wrn10x1", 4);
    save_module(&b, &net, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();

    let conv = file.tensor("layer2.0.shortcut.0.weight").unwrap();
    assert_eq!(conv.dtype(), Dtype::F32);
    assert_eq!(conv.shape(), &[32, 16, 1, 1]);
    let fc = file.tensor("linear.weight").unwrap();
    assert_eq!(fc.shape(), &[10, 64]);
    // Row-major little-endian values, as PyTorch lays out [out, in].
    let mut expected = None;
    net.visit_tensors(&mut |n, _, t| {
        if n == "linear.weight" {
            expected = Some(b.to_host(t).unwrap());
        }
    });
    let stored: Vec<f32> = fc
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(Some(stored), expected);

    let counter = file.tensor("bn1.num_batches_tracked").unwrap();
    assert_eq!(counter.dtype(), Dtype::I64);
    assert!(counter.shape().is_empty());
    assert_eq!(counter.data(), &3i64.to_le_bytes());
    let floats = host_tensors(&net).len();
    assert_eq!(file.len(), floats + counters(&net).len());
}

#[test]
fn loading_into_another_architecture_names_missing_and_unexpected_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p8.safetensors");
    let b = backend();
    save_module(&b, &network("preresnet8", 10, 1), &path).unwrap();
    let mut other = network("wrn10x1", 10, 1);
    let before = host_tensors(&other);
    match load_module(&b, &mut other, &path) {
        Err(CheckpointError::KeyMismatch {
            origin,
            missing,
            unexpected,
        }) => {
            assert!(origin.contains("p8.safetensors"), "{origin}");
            assert!(
                missing.contains(&"linear.weight".to_string()),
                "{missing:?}"
            );
            assert!(missing.contains(&"layer2.0.shortcut.0.bias".to_string()));
            assert!(
                unexpected.contains(&"fc.weight".to_string()),
                "{unexpected:?}"
            );
            assert!(unexpected.contains(&"layer2.0.downsample.0.weight".to_string()));
        }
        other => panic!("expected a key mismatch, got {other:?}"),
    }
    assert_eq!(
        before,
        host_tensors(&other),
        "a failed load changed the model"
    );
}

#[test]
fn a_shape_mismatch_names_the_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ten.safetensors");
    let b = backend();
    save_module(&b, &network("preresnet8", 10, 1), &path).unwrap();
    let mut hundred = network("preresnet8", 100, 1);
    let before = host_tensors(&hundred);
    let err = load_module(&b, &mut hundred, &path).unwrap_err();
    match &err {
        CheckpointError::ShapeMismatch {
            name,
            expected,
            got,
            ..
        } => {
            assert_eq!(name, "fc.weight");
            assert_eq!(expected, &[100, 64]);
            assert_eq!(got, &[10, 64]);
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("fc.weight") && message.contains("[100, 64]"),
        "{message}"
    );
    assert_eq!(
        before,
        host_tensors(&hundred),
        "a failed load changed the model"
    );
}

#[test]
fn wrong_types_and_broken_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend();
    let net = network("preresnet8", 10, 1);
    let mut dict = StateDict::from_module(&b, &net).unwrap();
    dict.insert(
        "fc.bias",
        StoredTensor::I64 {
            shape: vec![10],
            values: vec![0; 10],
        },
    );
    let path = dir.path().join("typed.safetensors");
    dict.save(&path).unwrap();
    let mut target = network("preresnet8", 10, 2);
    match load_module(&b, &mut target, &path) {
        Err(CheckpointError::DtypeMismatch { name, .. }) => assert_eq!(name, "fc.bias"),
        other => panic!("expected a type mismatch, got {other:?}"),
    }

    let broken = dir.path().join("broken.safetensors");
    std::fs::write(&broken, b"not a safetensors file").unwrap();
    match load_module(&b, &mut target, &broken) {
        Err(CheckpointError::Format { origin, .. }) => assert!(origin.contains("broken")),
        other => panic!("expected a format error, got {other:?}"),
    }
    match load_module(&b, &mut target, &dir.path().join("absent.safetensors")) {
        Err(CheckpointError::Io { path, .. }) => assert!(path.ends_with("absent.safetensors")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

fn directory_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn writes_replace_the_file_whole_and_leave_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let b = backend();
    let first = network("preresnet8", 10, 1);
    let second = trained_network("preresnet8", 2);
    save_module(&b, &first, &path).unwrap();
    save_module(&b, &second, &path).unwrap();
    assert_eq!(directory_entries(dir.path()), vec!["ckpt.safetensors"]);
    let mut loaded = network("preresnet8", 10, 3);
    load_module(&b, &mut loaded, &path).unwrap();
    assert_eq!(host_tensors(&loaded), host_tensors(&second));

    // A directory that does not exist: an error naming it, and the old file untouched elsewhere.
    let missing_dir = dir.path().join("no/such/dir/ckpt.safetensors");
    match save_module(&b, &first, &missing_dir) {
        Err(CheckpointError::Io { path, .. }) => assert!(path.ends_with("no/such/dir")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert_eq!(directory_entries(dir.path()), vec!["ckpt.safetensors"]);
}

#[test]
fn any_named_tensors_save_with_zero_counters_and_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tensors.safetensors");
    let b = backend();
    let source = trained_network("preresnet8", 5);
    // Only the NamedTensors view: no counters known.
    let view: &dyn NamedTensors<CpuBackend> = &source;
    save_tensors(&b, view, &path).unwrap();
    let dict = StateDict::load(&path).unwrap();
    assert_eq!(
        dict.get("layer1.0.bn1.num_batches_tracked"),
        Some(&StoredTensor::I64 {
            shape: vec![],
            values: vec![0]
        })
    );
    let mut target = network("preresnet8", 10, 6);
    let target_view: &mut dyn NamedTensors<CpuBackend> = &mut target;
    load_tensors(&b, target_view, &path).unwrap();
    assert_eq!(host_tensors(&source), host_tensors(&target));

    // A module checkpoint (with real counters) also loads into the tensors view.
    let module_path = dir.path().join("module.safetensors");
    save_module(&b, &source, &module_path).unwrap();
    let mut again = network("preresnet8", 10, 7);
    let again_view: &mut dyn NamedTensors<CpuBackend> = &mut again;
    load_tensors(&b, again_view, &module_path).unwrap();
    assert_eq!(host_tensors(&source), host_tensors(&again));
}

/// Writes checkpoints of the reference networks to `$SWA_MODELS_EXPORT_DIR`, for a check by hand that
/// PyTorch loads them strictly:
/// `python tools/make_golden.py --check-load $DIR/preresnet20.safetensors preresnet20 10`.
#[test]
#[ignore = "writes files for a check by hand in PyTorch: set SWA_MODELS_EXPORT_DIR, run with --ignored"]
fn export_checkpoints_for_pytorch() {
    let dir = std::env::var_os("SWA_MODELS_EXPORT_DIR")
        .expect("SWA_MODELS_EXPORT_DIR names the directory to write the checkpoints to");
    let b = backend();
    for name in ["preresnet20", "preresnet164", "wrn16x4", "vgg16", "vgg16bn"] {
        let net = trained_network(name, 8);
        let path = Path::new(&dir).join(format!("{name}.safetensors"));
        save_module(&b, &net, &path).unwrap();
        let mut loaded = network(name, 10, 9);
        load_module(&b, &mut loaded, &path).unwrap();
        assert_eq!(host_tensors(&net), host_tensors(&loaded));
        // make_golden.py --check-load prints PyTorch's logits on the same zero image.
        let zeros = b.zeros(&[1, 3, 32, 32]).unwrap();
        let logits = b
            .to_host(&loaded.forward(&b, &zeros, ForwardMode::Eval).unwrap())
            .unwrap();
        eprintln!("{name}: logits on a zero image {:?}", &logits[..3]);
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `torch.save(model.state_dict())` of torchvision's blocks reads as the same tensors as the safetensors
/// file of the same state dict, counters included, and loads into the network.
#[test]
fn pytorch_checkpoints_read_as_their_safetensors_twin() {
    let pth = StateDict::load(&fixture("golden_resnet14-w8.pth")).unwrap();
    let safetensors = StateDict::load(&fixture("golden_resnet14-w8.safetensors")).unwrap();
    assert_eq!(pth.len(), safetensors.len());
    for (name, tensor) in safetensors.iter() {
        assert_eq!(pth.get(name), Some(tensor), "{name}");
    }
    assert!(matches!(
        pth.get("bn1.num_batches_tracked"),
        Some(StoredTensor::I64 { values, .. }) if values == &[7]
    ));
    let mut net = network("resnet14-w8", 10, 3);
    load_module(&backend(), &mut net, &fixture("golden_resnet14-w8.pth")).unwrap();
    let loaded = host_tensors(&net);
    let (name, values) = &loaded[0];
    match safetensors.get(name) {
        Some(StoredTensor::F32 { values: want, .. }) => assert_eq!(values, want, "{name}"),
        other => panic!("{name}: {other:?}"),
    }
}

/// The original SWA code's checkpoints nest the state dict under `state_dict` beside the epoch and the
/// optimizer, with `nn.DataParallel`'s `module.` prefix: both are undone.
#[test]
fn a_nested_dataparallel_checkpoint_yields_its_state_dict() {
    let dict = StateDict::load(&fixture("golden_nested_checkpoint.pth")).unwrap();
    let names: Vec<&str> = dict.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["bn.num_batches_tracked", "fc.bias", "fc.weight"]);
    assert_eq!(
        dict.get("fc.weight"),
        Some(&StoredTensor::F32 {
            shape: vec![2, 3],
            values: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        })
    );
    assert_eq!(
        dict.get("fc.bias"),
        Some(&StoredTensor::F32 {
            shape: vec![2],
            values: vec![0.5, 1.5],
        })
    );
}

/// A PyTorch checkpoint cut short is refused with an error naming the file, never a panic.
#[test]
fn a_truncated_pytorch_checkpoint_is_reported_with_its_path() {
    let bytes = std::fs::read(fixture("golden_resnet14-w8.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for keep in [bytes.len() / 2, bytes.len() - 30, 100] {
        let path = dir.path().join(format!("cut-{keep}.pth"));
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let error = StateDict::load(&path).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, CheckpointError::PytorchFormat { .. }),
            "{keep} bytes: {message}"
        );
        assert!(message.contains(&format!("cut-{keep}.pth")), "{message}");
    }
}

/// A network saved to a `.pth` path is written in PyTorch's zip layout and loads back exactly, running
/// statistics and batch counters included.
#[test]
fn a_network_saved_as_pth_loads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet.pth");
    let b = backend();
    let saved = trained_network("resnet14-w8", 5);
    save_module(&b, &saved, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], b"PK\x03\x04", "a .pth is a zip archive");

    let mut loaded = network("resnet14-w8", 10, 6);
    assert_ne!(host_tensors(&saved), host_tensors(&loaded));
    load_module(&b, &mut loaded, &path).unwrap();
    assert_eq!(host_tensors(&saved), host_tensors(&loaded));
    assert_eq!(counters(&saved), counters(&loaded));
    assert!(counters(&loaded).iter().all(|(_, c)| *c == 3));
}

/// torchvision's own `.pth`, read and written again by us, reads back as the same tensors; so do tensors of
/// every stored type and rank, the scalar and the empty one included.
#[test]
fn written_pytorch_checkpoints_read_back_as_the_same_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let torchvision = StateDict::load(&fixture("golden_resnet14-w8.pth")).unwrap();
    let rewritten = dir.path().join("rewritten.pt");
    torchvision.save(&rewritten).unwrap();
    let again = StateDict::load(&rewritten).unwrap();
    assert_eq!(again.len(), torchvision.len());
    for (name, tensor) in torchvision.iter() {
        assert_eq!(again.get(name), Some(tensor), "{name}");
    }

    let mut mixed = StateDict::new();
    mixed.insert(
        "weights",
        StoredTensor::F32 {
            shape: vec![2, 3, 4],
            values: (0..24).map(|i| i as f32 * 0.25 - 3.0).collect(),
        },
    );
    mixed.insert(
        "probabilities",
        StoredTensor::F64 {
            shape: vec![3, 2],
            values: vec![0.125, 0.875, 1e-300, 1.0, 0.5, 0.5],
        },
    );
    mixed.insert(
        "labels",
        StoredTensor::I64 {
            shape: vec![70_000],
            values: (0..70_000).map(|i| i64::from(i) * 65_537 - 1).collect(),
        },
    );
    mixed.insert(
        "empty",
        StoredTensor::F32 {
            shape: vec![0, 5],
            values: vec![],
        },
    );
    mixed.insert_counter("bn.num_batches_tracked", 1 << 40);
    let path = dir.path().join("mixed.pth");
    mixed.save(&path).unwrap();
    let read = StateDict::load(&path).unwrap();
    assert_eq!(read.len(), mixed.len());
    for (name, tensor) in mixed.iter() {
        assert_eq!(read.get(name), Some(tensor), "{name}");
    }
}

/// The full ResNet-50 in both directions against torchvision (see `tools/torchvision_pth_check.py`, which
/// writes the inputs of this test and checks its output in PyTorch): torchvision's `.pth` loads and
/// predicts torchvision's logits on one image within 1e-4 of the largest; ours is written for PyTorch.
#[test]
#[ignore = "needs files written by tools/torchvision_pth_check.py: set SWA_TORCHVISION_CHECK_DIR, run with --ignored"]
fn torchvision_resnet50_pth_in_both_directions() {
    let dir = std::path::PathBuf::from(
        std::env::var_os("SWA_TORCHVISION_CHECK_DIR")
            .expect("SWA_TORCHVISION_CHECK_DIR names the folder torchvision_pth_check.py wrote"),
    );
    let b = backend();
    let mut net = network("resnet50", 1000, 1);
    load_module(&b, &mut net, &dir.join("torchvision_resnet50.pth")).unwrap();
    let io = StateDict::load(&dir.join("resnet50_io.safetensors")).unwrap();
    let (
        Some(StoredTensor::F32 { values: input, .. }),
        Some(StoredTensor::F32 { values: want, .. }),
    ) = (io.get("input"), io.get("logits"))
    else {
        panic!("resnet50_io.safetensors holds no f32 input and logits")
    };
    let x = b.from_host(input, &[1, 3, 224, 224]).unwrap();
    let got = b
        .to_host(&net.forward(&b, &x, ForwardMode::Eval).unwrap())
        .unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let error = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
        / scale;
    eprintln!(
        "resnet50 from torchvision's .pth: largest logit difference {error:.2e} of the largest"
    );
    assert!(error <= 1e-4, "logits differ by {error:.2e} relative");
    save_module(&b, &net, &dir.join("ours_resnet50.pth")).unwrap();
}

/// torchvision's published DenseNet weights name a dense layer's children `norm.1`, `conv.2`, … and hold
/// no batch counters (they predate both): they read as the current names, with every counter at 0 as
/// PyTorch loads them, and load into the network.
#[test]
fn torchvision_legacy_densenet_checkpoints_read_under_the_current_names() {
    let legacy = StateDict::load(&fixture("golden_densenet29-k8_legacy.pth")).unwrap();
    let current = StateDict::load(&fixture("golden_densenet29-k8.safetensors")).unwrap();
    assert_eq!(legacy.len(), current.len());
    for (name, tensor) in current.iter() {
        match tensor {
            StoredTensor::I64 { .. } => assert_eq!(
                legacy.get(name),
                Some(&StoredTensor::I64 {
                    shape: vec![],
                    values: vec![0]
                }),
                "{name}"
            ),
            _ => assert_eq!(legacy.get(name), Some(tensor), "{name}"),
        }
    }
    let mut net = network("densenet29-k8", 10, 3);
    load_module(
        &backend(),
        &mut net,
        &fixture("golden_densenet29-k8_legacy.pth"),
    )
    .unwrap();
    let mut counters = Vec::new();
    net.visit_batch_counters(&mut |_, count| counters.push(count));
    // norm0, two a dense layer, one a transition, norm5.
    assert_eq!(counters.len(), 1 + 2 * 12 + 3 + 1);
    assert!(counters.iter().all(|&c| c == 0), "{counters:?}");
}
