//! `cargo xtask reproduce --method swag` and `cargo xtask calibrate` end to end on the smoke preset over
//! synthetic CIFAR-10: the runs hold out the end of the training split, the SWA run collects SWAG
//! moments, every method is scored into the calibration table of `results.md` (the temperature fitted on
//! the held-out images), the reliability diagram and the per-example probabilities are written, and a
//! corrupt moments file is refused with its name.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::assert_success;

use swa_data::{synthetic, DatasetKind, Layout, Packaging};
use swa_models::checkpoint::StateDict;

fn xtask(args: &[&str], extra: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
    command
        .args(args)
        .args(["--device", "cpu", "--threads", "2"]);
    for (flag, path) in extra {
        command.arg(flag).arg(path);
    }
    command.output().expect("the xtask binary runs")
}

#[test]
fn reproduce_with_swag_scores_every_method_and_calibrate_refuses_corrupt_moments() {
    let root = tempfile::tempdir().expect("temporary folder");
    let data = synthetic::write(
        DatasetKind::Cifar10,
        Layout::Binary,
        Packaging::Folder,
        &root.path().join("data"),
        192,
        7,
    )
    .expect("synthetic data");
    let out = root.path().join("out");
    let args = [
        "reproduce",
        "cifar10",
        "--preset",
        "smoke",
        "--method",
        "swag",
        "--holdout",
        "32",
    ];
    assert_success(&xtask(&args, &[("--data", &data), ("--out", &out)]));

    let table = std::fs::read_to_string(out.join("cifar10/results.md")).expect("results.md");
    for method in [
        "SGD",
        "SWA",
        "SWA + temperature",
        "SWAG-Diagonal",
        "SWAG",
        "FGE",
    ] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| preresnet8 | seed-1 | {method} |")))
            .unwrap_or_else(|| panic!("a calibration row for {method}:\n{table}"));
        let cells: Vec<f64> = row
            .split('|')
            .map(str::trim)
            .skip(5)
            .filter(|c| !c.is_empty())
            .map(|c| {
                c.parse()
                    .unwrap_or_else(|_| panic!("`{c}` in `{row}` is a number"))
            })
            .collect();
        // Accuracy in percent, NLL and ECE.
        assert_eq!(cells.len(), 3, "{row}");
        assert!((0.0..=100.0).contains(&cells[0]) && cells[1] > 0.0, "{row}");
        assert!((0.0..=1.0).contains(&cells[2]), "{row}");
    }

    let seed = out.join("cifar10/preresnet8/seed-1");
    let calibration = seed.join("calibration");
    let markdown = std::fs::read_to_string(calibration.join("calibration.md")).expect("table");
    assert!(
        markdown.contains("fitted on the 32 held-out training images"),
        "{markdown}"
    );
    let state = std::fs::read_to_string(seed.join("sgd/checkpoints/epoch-0004/state.json"))
        .expect("the SGD run's last checkpoint");
    assert!(state.contains("\"holdout\":32"), "{state}");
    let svg = std::fs::read_to_string(calibration.join("reliability.svg")).expect("diagram");
    assert!(
        svg.contains("SWAG-Diagonal") && svg.contains("confidence"),
        "{svg}"
    );
    let probabilities =
        StateDict::load(&calibration.join("probabilities.safetensors")).expect("probabilities");
    let images = probabilities
        .get("labels")
        .map(|t| t.shape().to_vec())
        .expect("labels");
    assert_eq!(
        probabilities.get("SWAG").map(|t| t.shape().to_vec()),
        Some(vec![images[0], 10])
    );

    // The SWA run's last checkpoint holds the moments; truncated, they are refused by name.
    let moments = seed.join("swa/checkpoints/epoch-0006/swag.safetensors");
    let bytes = std::fs::read(&moments).expect("moments written");
    std::fs::write(&moments, &bytes[..bytes.len() / 2]).expect("truncate");
    let refused = xtask(
        &["calibrate", "--samples", "2"],
        &[("--run", &seed), ("--data", &data)],
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("swag.safetensors"), "{stderr}");
}
