//! Records the versions of the measured crates (from the workspace's `Cargo.lock`) and of the compiler,
//! so that every report says what it measured.

use std::path::Path;
use std::process::Command;

/// The crates whose versions a report names: swa-rs's own and those doing the heavy lifting.
const CRATES: [&str; 9] = [
    "swa-bench",
    "swa-core",
    "swa-models",
    "swa-data",
    "swa-gpu",
    "gemm",
    "ndarray",
    "rayon",
    "wgpu",
];

fn main() {
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(&lock).unwrap_or_default();
    let mut versions = Vec::new();
    for block in text.split("[[package]]") {
        let field = |key: &str| {
            block.lines().find_map(|line| {
                line.strip_prefix(key)
                    .and_then(|rest| rest.trim().strip_prefix('='))
                    .map(|v| v.trim().trim_matches('"').to_string())
            })
        };
        if let (Some(name), Some(version)) = (field("name "), field("version ")) {
            if CRATES.contains(&name.as_str())
                && !versions
                    .iter()
                    .any(|(n, v): &(String, String)| n == &name && v == &version)
            {
                versions.push((name, version));
            }
        }
    }
    versions.sort();
    let joined: Vec<String> = versions.iter().map(|(n, v)| format!("{n}={v}")).collect();
    println!(
        "cargo:rustc-env=SWA_BENCH_CRATE_VERSIONS={}",
        joined.join(";")
    );

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SWA_BENCH_RUSTC_VERSION={version}");
}
