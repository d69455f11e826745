//! `cargo xtask reproduce imagenet --preset smoke`, end to end, on a tiny ImageFolder of synthetic JPEGs in
//! ImageNet's layout and weights saved as PyTorch's `.pth`: it must evaluate the pretrained network, run
//! SWA with the average reported after each epoch, write the table, resume to the same table, and refuse
//! a wrong layout, another network's checkpoint and weights for another number of classes, saying why.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use swa_core::CpuBackend;
use swa_data::synthetic::{write_image_folder, ImageFolderSpec};
use swa_models::checkpoint::{save_module, StateDict};
use swa_models::Architecture;

const MODEL: &str = "resnet14-w4";
const CLASSES: usize = 3;

fn reproduce(data: &Path, weights: &Path, model: &str, out: &Path) -> Output {
    reproduce_with(data, weights, model, out, &[])
}

fn reproduce_with(data: &Path, weights: &Path, model: &str, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "reproduce",
            "imagenet",
            "--preset",
            "smoke",
            "--device",
            "cpu",
            "--threads",
            "2",
        ])
        .args(["--model", model])
        .arg("--data")
        .arg(data)
        .arg("--weights")
        .arg(weights)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("the xtask binary runs")
}

fn write_data(root: &Path) {
    for (split, per_class, seed) in [("train", 8, 1), ("val", 4, 2)] {
        let spec = ImageFolderSpec {
            seed,
            ..ImageFolderSpec::jpeg(CLASSES, per_class, 44, 36)
        };
        write_image_folder(&spec, &root.join(split)).expect("synthetic ImageFolder");
    }
}

fn write_weights(path: &Path, model: &str, classes: usize) {
    let backend = CpuBackend::with_threads(1);
    let architecture: Architecture = model.parse().expect("a network name");
    let network = architecture.build(&backend, classes, 5).expect("network");
    save_module(&backend, network.as_ref(), path).expect("weights written");
}

fn failure(output: &Output) -> String {
    assert!(!output.status.success(), "expected a refusal");
    String::from_utf8_lossy(&output.stderr).to_string()
}

#[test]
fn smoke_preset_runs_resumes_and_refuses_bad_input() {
    let root = tempfile::tempdir().expect("temporary folder");
    let data = root.path().join("imagenet");
    write_data(&data);
    let weights = root.path().join("pretrained.pth");
    write_weights(&weights, MODEL, CLASSES);
    let out = root.path().join("out");

    let first = common::assert_success(&reproduce(&data, &weights, MODEL, &out));
    assert!(
        first.contains("estimated total"),
        "the plan comes first:\n{first}"
    );
    assert!(first.contains("pretrained: top-1"), "{first}");
    let dir = out.join("imagenet").join(MODEL);
    let table = std::fs::read_to_string(dir.join("results.md")).expect("results.md");
    for row in ["| pretrained |", "| SWA, 1 epochs |", "| SWA, 2 epochs |"] {
        let line = table
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("{row} in\n{table}"));
        let top1: f64 = line
            .split('|')
            .nth(2)
            .map(str::trim)
            .and_then(|c| c.parse().ok())
            .unwrap_or(-1.0);
        assert!((0.0..=100.0).contains(&top1), "{line}");
    }
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).expect("results.json"))
            .expect("JSON");
    assert_eq!(
        results["swa"][0].as_array().map(Vec::len),
        Some(2),
        "{results}"
    );
    assert_eq!(results["pretrained"]["count"], 12, "every validation image");
    // The average is written in both formats; the .pth reads back as the safetensors file.
    let pth = StateDict::load(&dir.join("seed-1/swa.pth")).expect("swa.pth");
    let safetensors =
        StateDict::load(&dir.join("seed-1/swa.safetensors")).expect("swa.safetensors");
    assert_eq!(pth.len(), safetensors.len());
    for (name, tensor) in safetensors.iter() {
        assert_eq!(pth.get(name), Some(tensor), "{name}");
    }

    let again = common::assert_success(&reproduce(&data, &weights, MODEL, &out));
    assert!(again.contains("finished earlier"), "{again}");
    let table_again = std::fs::read_to_string(dir.join("results.md")).expect("results.md");
    assert_eq!(
        table_again, table,
        "a finished run reports the same results"
    );

    // A folder without val/ is refused with the layout it needs.
    let flat = root.path().join("flat");
    write_image_folder(
        &ImageFolderSpec::jpeg(CLASSES, 2, 40, 40),
        &flat.join("train"),
    )
    .expect("train only");
    let message = failure(&reproduce(&flat, &weights, MODEL, &out));
    assert!(
        message.contains("val") && message.contains("layout"),
        "{message}"
    );

    // Another network's checkpoint names what does not fit.
    let other = root.path().join("other.safetensors");
    write_weights(&other, "resnet26-w4", CLASSES);
    let message = failure(&reproduce(&data, &other, MODEL, &out));
    assert!(
        message.contains("other.safetensors") && message.contains("unexpected"),
        "{message}"
    );

    // Weights for another number of classes name the classifier's shapes.
    let wide = root.path().join("five.pth");
    write_weights(&wide, MODEL, 5);
    let message = failure(&reproduce(&data, &wide, MODEL, &out));
    assert!(
        message.contains("fc.weight") && message.contains("3 classes"),
        "{message}"
    );

    // A truncated image stops the run with its path, before any epoch is checkpointed; with
    // --skip-bad-images it is left out and listed.
    let first_image = data.join("train/class_000/image_0000.jpg");
    let bytes = std::fs::read(&first_image).expect("a training image");
    let broken = data.join("train/class_000/broken.jpg");
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).expect("a truncated copy");
    let fresh = root.path().join("out-broken");
    let message = failure(&reproduce(&data, &weights, MODEL, &fresh));
    assert!(message.contains("broken.jpg"), "{message}");
    let skipping = reproduce_with(&data, &weights, MODEL, &fresh, &["--skip-bad-images"]);
    common::assert_success(&skipping);
    let results: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fresh.join("imagenet").join(MODEL).join("results.json"))
            .expect("results.json"),
    )
    .expect("JSON");
    let listed = results["skipped_images"].to_string();
    assert!(listed.contains("broken.jpg"), "{listed}");
}
