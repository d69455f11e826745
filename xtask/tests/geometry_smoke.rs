//! `cargo xtask geometry all` end to end on the smoke preset's runs over synthetic CIFAR-10: it must find
//! the weights of every figure it can make, write the figures, `geometry.json` and the flatness table,
//! resume from its cache without evaluating a point twice, and refuse folders that are not a seed's runs.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::assert_success;

use swa_data::{synthetic, DatasetKind, Layout, Packaging};

/// Runs `xtask ARGS EXTRA --data DATA` (the last of `args` is the option the paths of `extra` belong to).
fn xtask(args: &[&str], data: &Path, extra: &[&Path]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
    command.args(args);
    for path in extra {
        command.arg(path);
    }
    command
        .arg("--data")
        .arg(data)
        .output()
        .expect("the xtask binary runs")
}

#[test]
fn geometry_of_the_smoke_runs_writes_every_figure_and_resumes_from_its_cache() {
    let root = tempfile::tempdir().expect("temporary folder");
    let data = synthetic::write(
        DatasetKind::Cifar10,
        Layout::Binary,
        Packaging::Folder,
        &root.path().join("data"),
        160,
        3,
    )
    .expect("synthetic data");
    let out = root.path().join("out");
    let trained = xtask(
        &[
            "reproduce",
            "cifar10",
            "--preset",
            "smoke",
            "--device",
            "cpu",
            "--threads",
            "2",
            "--runs",
            "sgd,swa",
            "--out",
        ],
        &data,
        &[&out],
    );
    assert_success(&trained);
    let seed_dir = out.join("cifar10/preresnet8/seed-1");

    let geometry_args = [
        "geometry",
        "all",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--rays",
        "2",
        "--points",
        "3",
        "--grid",
        "3x3",
        "--train-subset",
        "64",
        "--test-subset",
        "32",
        "--batch-size",
        "32",
        "--run",
    ];
    let first = assert_success(&xtask(&geometry_args, &data, &[&seed_dir]));
    let geometry = seed_dir.join("geometry");
    for figure in [
        "rays.svg",
        "line.svg",
        "plane-sgd-swa-train-loss.svg",
        "plane-sgd-swa-test-error.svg",
        "plane-constant-lr-train-loss.svg",
        "plane-constant-lr-test-error.svg",
    ] {
        let svg = std::fs::read_to_string(geometry.join(figure))
            .unwrap_or_else(|e| panic!("{figure}: {e}\n{first}"));
        assert!(svg.contains("<svg"), "{figure}");
    }
    // Without an FGE run, its planes are skipped with the reason.
    assert!(first.contains("plane-fge: skipped"), "{first}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(geometry.join("geometry.json")).expect("json"))
            .expect("valid JSON");
    let surveys = json["surveys"].as_array().expect("surveys");
    let points = |name: &str| {
        surveys
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["points"].as_array())
            .map_or(0, Vec::len)
    };
    assert_eq!(points("line"), 3);
    assert_eq!(
        points("rays"),
        2 * 2 * 3,
        "two solutions, two rays, three distances"
    );
    assert_eq!(points("plane-sgd-swa"), 9);
    assert_eq!(points("plane-constant-lr"), 9);
    let rays = surveys.iter().find(|s| s["name"] == "rays").expect("rays");
    assert_eq!(rays["direction_seeds"].as_array().map(Vec::len), Some(2));
    // The plane through SGD, SWA and their start marks the three points.
    let plane = surveys
        .iter()
        .find(|s| s["name"] == "plane-sgd-swa")
        .expect("plane");
    let labels: Vec<&str> = plane["marks"]
        .as_array()
        .expect("marks")
        .iter()
        .filter_map(|m| m["label"].as_str())
        .collect();
    assert_eq!(labels[..2], ["SGD", "SWA"]);
    assert!(labels[2].starts_with("start (epoch"), "{labels:?}");
    assert_eq!(json["flatness"].as_array().map(Vec::len), Some(4));
    let table = std::fs::read_to_string(geometry.join("results.md")).expect("results.md");
    assert!(table.contains("| SWA | train_loss |"), "{table}");
    // The data set's report gathers the seed's flatness beside the accuracy table.
    let report = std::fs::read_to_string(out.join("cifar10/results.md")).expect("results.md");
    assert!(
        report.contains("## Flatness along random rays")
            && report.contains("| preresnet8 | seed-1 | train_loss |"),
        "{report}"
    );

    // Run again: every point comes from the cache, and the results are the same.
    let second = assert_success(&xtask(&geometry_args, &data, &[&seed_dir]));
    assert!(second.contains("rays: 12 points (12 cached)"), "{second}");
    let again: serde_json::Value =
        serde_json::from_slice(&std::fs::read(geometry.join("geometry.json")).expect("json"))
            .expect("valid JSON");
    assert_eq!(again["surveys"][0]["points"], json["surveys"][0]["points"]);

    // A folder that is not a seed's runs is refused with what it should hold.
    let refused = xtask(&geometry_args, &data, &[&out]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("checkpoints"), "{message}");
}
