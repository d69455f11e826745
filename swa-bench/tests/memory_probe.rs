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
    // The parent's peak must not show in the child's: 512 MiB touched here, far above what training
    // PreResNet-20 on 2 images takes (a child's `ru_maxrss` would report this parent's peak).
    let parent_ballast = vec![1u8; 512 << 20];
    let output = Command::new(env!("CARGO_BIN_EXE_swa-bench"))
        .args(&args)
        .output()
        .expect("starting swa-bench");
    assert_eq!(
        parent_ballast
            .iter()
            .step_by(4096)
            .map(|&b| b as usize)
            .sum::<usize>(),
        512 << 8
    );
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
    assert!(
        rss.peak_kib < 256 << 10,
        "the child reported its parent's peak: {rss:?}"
    );
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
