//! The hidden subcommand with which the training suite measures swa-rs's peak memory in a child process:
//! it must train and print a line the parent reads back.

use std::process::Command;

use swa_bench::memory::{PeakRss, ProbeRequest};
use swa_models::Architecture;

#[test]
fn the_probe_subcommand_trains_and_prints_its_resident_memory() {
    if !std::path::Path::new("/proc/self/status").exists() {
        eprintln!("skipped: peak memory is measured on Linux only");
        return;
    }
    let args = ProbeRequest {
        network: Architecture::PreResNet { depth: 20 },
        batch: 2,
        steps: 2,
        threads: 1,
    }
    .args();
    let output = Command::new(env!("CARGO_BIN_EXE_swa-bench"))
        .args(&args)
        .output()
        .expect("starting swa-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rss = PeakRss::parse(&stdout).expect("a start_rss_kib=… peak_rss_kib=… line");
    assert!(rss.start_kib > 0, "{rss:?}");
    // Building PreResNet-20 (0.27M parameters, with momentum and gradients) and training must grow the
    // resident set by at least the parameters' 1 MiB.
    assert!(rss.peak_kib > rss.start_kib + 1024, "{rss:?}");
}

#[test]
fn the_probe_subcommand_refuses_an_unknown_network() {
    let output = Command::new(env!("CARGO_BIN_EXE_swa-bench"))
        .args([
            "peak-memory-probe",
            "--network",
            "resnet-nope",
            "--batch",
            "2",
            "--steps",
            "1",
            "--threads",
            "1",
        ])
        .output()
        .expect("starting swa-bench");
    assert!(!output.status.success());
    assert!(PeakRss::parse(&String::from_utf8_lossy(&output.stdout)).is_none());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown network"));
}
