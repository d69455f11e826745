//! The smoke preset of `cargo xtask reproduce`, end to end, on synthetic data in the official layouts of
//! both data sets: it must train SGD, SWA and FGE runs, write the tables and plots, and resume to the same
//! results when run again.

use std::path::Path;
use std::process::Command;

use swa_data::{synthetic, DatasetKind, Layout, Packaging};

fn reproduce(data_set: &str, data: &Path, out: &Path) -> std::process::Output {
    reproduce_with(data_set, data, out, &[])
}

fn reproduce_with(data_set: &str, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "reproduce",
            data_set,
            "--preset",
            "smoke",
            "--device",
            "cpu",
            "--threads",
            "2",
        ])
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("the xtask binary runs")
}

fn check_outputs(out: &Path, data_set: &str) {
    let dir = out.join(data_set);
    let table = std::fs::read_to_string(dir.join("results.md")).expect("results.md is written");
    let row = table
        .lines()
        .find(|l| l.starts_with("| preresnet8 |"))
        .expect("a row for the smoke network");
    // Every column of the row holds a measured value: SGD, FGE and SWA at the three budgets.
    let cells: Vec<&str> = row
        .split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cells.len(), 8, "{row}");
    for cell in &cells[2..7] {
        let value: f64 = cell
            .parse()
            .unwrap_or_else(|_| panic!("cell `{cell}` of `{row}` is a number"));
        assert!((0.0..=100.0).contains(&value), "{row}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).expect("results.json"))
            .expect("valid JSON");
    assert_eq!(json[0]["model"], "preresnet8");
    for plot in ["preresnet8-test-error.svg", "preresnet8-learning-rate.svg"] {
        let svg = std::fs::read_to_string(dir.join(plot)).expect("plot written");
        assert!(
            svg.contains("<svg") && svg.contains("polyline"),
            "{plot} has curves"
        );
    }
}

fn smoke(kind: DatasetKind, layout: Layout, packaging: Packaging, name: &str) {
    let root = tempfile::tempdir().expect("temporary folder");
    let data = synthetic::write(kind, layout, packaging, &root.path().join("data"), 192, 7)
        .expect("synthetic data");
    let out = root.path().join("out");
    let first = reproduce(name, &data, &out);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        stdout.contains("estimated total"),
        "the plan is printed first:\n{stdout}"
    );
    // Per-epoch lines reach the log even when the output is not a terminal.
    assert!(
        stdout.contains("seed 1 swa epoch   6:"),
        "per-epoch lines are printed:\n{stdout}"
    );
    // SGD, SWA and FGE keep the same learning rate for their first 2 epochs, before any snapshot: the
    // later runs start from the SGD run's checkpoint there instead of training them again.
    for run in ["swa", "fge"] {
        assert!(
            stdout.contains(&format!("seed 1 {run}: epochs 1-2 are the sgd run's")),
            "{run} starts from the SGD run:\n{stdout}"
        );
        let history: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                out.join(name)
                    .join(format!("preresnet8/seed-1/{run}/history.json")),
            )
            .expect("history.json"),
        )
        .expect("valid JSON");
        assert_eq!(history["shared_epochs"], 2);
        assert_eq!(
            history["history"].as_array().map(Vec::len),
            Some(if run == "swa" { 6 } else { 4 })
        );
    }
    check_outputs(&out, name);
    let table = std::fs::read_to_string(out.join(name).join("results.md")).expect("table");

    // Running the same command again finds every run finished and reports the same table.
    let second = reproduce(name, &data, &out);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(String::from_utf8_lossy(&second.stdout).contains("finished earlier"));
    assert_eq!(
        std::fs::read_to_string(out.join(name).join("results.md")).expect("table"),
        table
    );

    // The same folder under another budget would mix two protocols in one run: refused, naming the
    // recorded recipe and the setting that differs, and the runs there are left as they were.
    let recipe_file = out.join(name).join("preresnet8/recipe.json");
    let recorded = std::fs::read_to_string(&recipe_file).expect("recipe.json is written");
    let other = reproduce_with(name, &data, &out, &["--budget", "2"]);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{stderr}");
    assert!(
        stderr.contains("recipe.json") && stderr.contains("budget: 2 vs 4"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&recipe_file).expect("recipe.json"),
        recorded
    );
}

#[test]
fn smoke_preset_on_cifar10_binary_folder() {
    smoke(
        DatasetKind::Cifar10,
        Layout::Binary,
        Packaging::Folder,
        "cifar10",
    );
}

#[test]
fn smoke_preset_on_cifar100_python_archive() {
    smoke(
        DatasetKind::Cifar100,
        Layout::Python,
        Packaging::Archive,
        "cifar100",
    );
}

#[test]
fn unknown_models_are_listed_with_the_valid_names() {
    let root = tempfile::tempdir().expect("temporary folder");
    let data = synthetic::write(
        DatasetKind::Cifar10,
        Layout::Binary,
        Packaging::Folder,
        root.path(),
        16,
        1,
    )
    .expect("synthetic data");
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "reproduce",
            "cifar10",
            "--preset",
            "smoke",
            "--model",
            "resnext50",
            "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(root.path().join("out"))
        .output()
        .expect("the xtask binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("resnext50") && stderr.contains("preresnet"),
        "{stderr}"
    );
}
