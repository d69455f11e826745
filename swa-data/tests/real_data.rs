//! The real CIFAR-10 (official binary folder) named by `SWA_CIFAR10_DIR`: counts, channel means,
//! and the check command's verdict on it and on a truncated copy. Without the variable the test
//! says on stderr that it did not run.

use std::io::Write;
use std::path::PathBuf;

use swa_data::{check, load_kind, ChecksumStatus, DatasetKind, Split};

fn real_dir() -> Option<PathBuf> {
    match std::env::var_os("SWA_CIFAR10_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            // Written to the stream directly: the test harness would hide `eprintln!` of a passing test.
            let _ = writeln!(
                std::io::stderr(),
                "NOT RUN: real CIFAR-10 checks skipped because SWA_CIFAR10_DIR is not set \
                 (set it to a cifar-10-batches-bin folder)"
            );
            None
        }
    }
}

#[test]
fn real_cifar10_has_the_published_counts_and_channel_means() {
    let Some(dir) = real_dir() else { return };
    let data = load_kind(DatasetKind::Cifar10, &dir).expect("load real CIFAR-10");
    assert_eq!(data.train.len(), 50_000);
    assert_eq!(data.test.len(), 10_000);
    assert_eq!(data.train.class_counts(), vec![5_000; 10]);
    assert_eq!(data.test.class_counts(), vec![1_000; 10]);
    assert_eq!(data.train.class_names()[0], "airplane");
    assert_eq!(data.train.class_names()[9], "truck");
    let means = data.train.channel_means();
    for (mean, published) in means.iter().zip([125.3, 123.0, 113.9]) {
        assert!(
            (mean - published).abs() < 0.06,
            "channel means {means:?}, published 125.3, 123.0, 113.9"
        );
    }
}

#[test]
fn the_check_accepts_the_real_set_and_rejects_a_truncated_copy() {
    let Some(dir) = real_dir() else { return };
    let report = check(DatasetKind::Cifar10, &dir).expect("check runs");
    assert!(report.is_valid(), "{report}");
    assert!(report
        .files
        .iter()
        .filter(|f| f.path.extension().is_some_and(|e| e == "bin"))
        .all(|f| f.checksum == ChecksumStatus::Match));
    assert_eq!(
        report
            .splits
            .iter()
            .map(|s| (s.split, s.images))
            .collect::<Vec<_>>(),
        vec![(Split::Train, 50_000), (Split::Test, 10_000)]
    );

    let copy = tempfile::tempdir().expect("temporary folder");
    for entry in std::fs::read_dir(&dir).expect("list real folder").flatten() {
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).expect("copy");
    }
    let victim = copy.path().join("data_batch_3.bin");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .expect("open copy");
    file.set_len(30_730_000 - 1000).expect("truncate");
    let report = check(DatasetKind::Cifar10, copy.path()).expect("check runs");
    assert!(!report.is_valid());
    let named: Vec<&String> = report
        .defects
        .iter()
        .filter(|d| d.contains("data_batch_3.bin"))
        .collect();
    assert!(named.iter().any(|d| d.contains("truncated")), "{report}");
    assert!(named.iter().any(|d| d.contains("MD5")), "{report}");
    assert!(
        report
            .defects
            .iter()
            .all(|d| !d.contains("data_batch_1.bin")),
        "{report}"
    );
}
