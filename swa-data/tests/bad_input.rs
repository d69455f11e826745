//! Each kind of bad input gives a typed error naming the file, the record or offset, and what was
//! expected.

use std::path::{Path, PathBuf};

use swa_data::pickle::{self, U8Matrix, Value};
use swa_data::synthetic::{self, SyntheticSpec};
use swa_data::{load, DataError, DatasetKind, Layout, Packaging};

/// A pickled list of ints.
fn ints(values: &[i64]) -> Value {
    Value::List(values.iter().copied().map(Value::I64).collect())
}

fn write(kind: DatasetKind, layout: Layout, packaging: Packaging, dir: &Path) -> PathBuf {
    let spec = SyntheticSpec {
        train_images: 10,
        test_images: 4,
        ..SyntheticSpec::new(kind, layout, packaging, 0, 5)
    };
    synthetic::write_spec(&spec, dir).expect("write synthetic set")
}

#[test]
fn truncated_binary_file_names_file_record_and_offset() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let folder = write(
        DatasetKind::Cifar10,
        Layout::Binary,
        Packaging::Folder,
        dir.path(),
    );
    let file = folder.join("data_batch_2.bin");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() - 100]).expect("truncate");
    let error = load(&folder).expect_err("truncated file must fail");
    match &error {
        DataError::Truncated {
            file: named,
            record,
            offset,
            available,
            record_len,
            ..
        } => {
            assert_eq!(named, &file);
            // data_batch_2 holds 2 records; the second one lost 100 bytes.
            assert_eq!(
                (*record, *offset, *available, *record_len),
                (1, 3073, 2973, 3073)
            );
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert!(error.to_string().contains("data_batch_2.bin"), "{error}");
}

#[test]
fn label_out_of_range_names_record_offset_and_range() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let folder = write(
        DatasetKind::Cifar100,
        Layout::Binary,
        Packaging::Folder,
        dir.path(),
    );
    let file = folder.join("test.bin");
    let mut bytes = std::fs::read(&file).expect("read");
    // Record 2's fine label (second byte of the record).
    bytes[2 * 3074 + 1] = 100;
    std::fs::write(&file, &bytes).expect("write");
    match load(&folder).expect_err("bad label") {
        DataError::LabelOutOfRange {
            file: named,
            record,
            offset,
            which,
            label,
            classes,
        } => {
            assert_eq!(named, file);
            assert_eq!(
                (record, offset, which, label, classes),
                (2, 2 * 3074, "fine", 100, 100)
            );
        }
        other => panic!("expected LabelOutOfRange, got {other:?}"),
    }

    // Coarse labels are checked too.
    let mut bytes = std::fs::read(&file).expect("read");
    bytes[2 * 3074 + 1] = 5;
    bytes[3 * 3074] = 20;
    std::fs::write(&file, &bytes).expect("write");
    assert!(matches!(
        load(&folder),
        Err(DataError::LabelOutOfRange {
            which: "coarse",
            record: 3,
            label: 20,
            classes: 20,
            ..
        })
    ));
}

#[test]
fn pickled_label_out_of_range_is_reported() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let folder = write(
        DatasetKind::Cifar10,
        Layout::Python,
        Packaging::Folder,
        dir.path(),
    );
    let pixels = vec![0u8; 2 * 3072];
    let bad = pickle::write_dict(
        vec![("labels", ints(&[1, 10]))],
        Some((
            "data",
            U8Matrix {
                rows: 2,
                cols: 3072,
                data: &pixels,
            },
        )),
    )
    .expect("write");
    std::fs::write(folder.join("test_batch"), bad).expect("write");
    match load(&folder).expect_err("bad label") {
        DataError::LabelOutOfRange {
            file,
            record,
            label,
            classes,
            ..
        } => {
            assert_eq!(file, folder.join("test_batch"));
            assert_eq!((record, label, classes), (1, 10, 10));
        }
        other => panic!("expected LabelOutOfRange, got {other:?}"),
    }
}

#[test]
fn pickle_of_the_wrong_shape_is_a_structure_error() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let folder = write(
        DatasetKind::Cifar100,
        Layout::Python,
        Packaging::Folder,
        dir.path(),
    );
    let pixels = vec![0u8; 2 * 3000];
    let wrong_shape = pickle::write_dict(
        vec![
            ("fine_labels", ints(&[1, 2])),
            ("coarse_labels", ints(&[1, 2])),
        ],
        Some((
            "data",
            U8Matrix {
                rows: 2,
                cols: 3000,
                data: &pixels,
            },
        )),
    )
    .expect("write");
    std::fs::write(folder.join("train"), wrong_shape).expect("write");
    let error = load(&folder).expect_err("wrong shape");
    match &error {
        DataError::PickleStructure {
            file,
            field,
            expected,
            found,
        } => {
            assert_eq!(file, &folder.join("train"));
            assert_eq!(field, "data");
            assert!(expected.contains("(n, 3072)"), "{expected}");
            assert!(found.contains("[2, 3000]"), "{found}");
        }
        other => panic!("expected PickleStructure, got {other:?}"),
    }

    // Labels and rows disagree.
    let pixels = vec![0u8; 2 * 3072];
    let short_labels = pickle::write_dict(
        vec![
            ("fine_labels", ints(&[1])),
            ("coarse_labels", ints(&[1, 2])),
        ],
        Some((
            "data",
            U8Matrix {
                rows: 2,
                cols: 3072,
                data: &pixels,
            },
        )),
    )
    .expect("write");
    std::fs::write(folder.join("train"), short_labels).expect("write");
    assert!(matches!(
        load(&folder),
        Err(DataError::CountMismatch {
            expected: 2,
            actual: 1,
            ..
        })
    ));

    // A missing key.
    let no_labels = pickle::write_dict(
        Vec::new(),
        Some((
            "data",
            U8Matrix {
                rows: 2,
                cols: 3072,
                data: &pixels,
            },
        )),
    )
    .expect("write");
    std::fs::write(folder.join("train"), no_labels).expect("write");
    assert!(
        matches!(load(&folder), Err(DataError::PickleStructure { field, .. }) if field == "fine_labels")
    );
}

#[test]
fn truncated_pickle_is_a_pickle_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let folder = write(
        DatasetKind::Cifar10,
        Layout::Python,
        Packaging::Folder,
        dir.path(),
    );
    let file = folder.join("data_batch_4");
    let bytes = std::fs::read(&file).expect("read");
    std::fs::write(&file, &bytes[..bytes.len() / 2]).expect("truncate");
    match load(&folder).expect_err("truncated pickle") {
        DataError::Pickle {
            file: named,
            source,
        } => {
            assert_eq!(named, file);
            assert!(source.to_string().contains("byte offset"), "{source}");
        }
        other => panic!("expected Pickle, got {other:?}"),
    }
}

#[test]
fn archive_missing_a_member_names_it() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let archive = dir.path().join("cifar-10-binary.tar.gz");
    let members: Vec<(String, Vec<u8>)> =
        ["data_batch_1.bin", "data_batch_2.bin", "batches.meta.txt"]
            .iter()
            .map(|name| (format!("cifar-10-batches-bin/{name}"), b"x\n".to_vec()))
            .collect();
    swa_data::archive::write_archive(&archive, &members).expect("write archive");
    match load(&archive).expect_err("missing members") {
        DataError::MissingMember {
            archive: named,
            member,
        } => {
            assert_eq!(named, archive);
            assert_eq!(member, "cifar-10-batches-bin/data_batch_3.bin");
        }
        other => panic!("expected MissingMember, got {other:?}"),
    }
}

#[test]
fn corrupt_archive_is_an_archive_error() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let archive = write(
        DatasetKind::Cifar100,
        Layout::Binary,
        Packaging::Archive,
        dir.path(),
    );
    let bytes = std::fs::read(&archive).expect("read");
    std::fs::write(&archive, &bytes[..bytes.len() / 2]).expect("truncate");
    let error = load(&archive).expect_err("corrupt archive");
    assert!(
        matches!(&error, DataError::Archive { archive: named, .. } if named == &archive),
        "{error:?}"
    );
}

#[test]
fn wrong_size_images_for_labels_is_a_count_mismatch() {
    let parts = swa_data::DatasetParts {
        images: vec![0; 3072 * 2 - 1],
        labels: vec![0, 1],
        class_names: vec!["a".into(), "b".into()],
        ..Default::default()
    };
    let error = swa_data::Dataset::new(
        DatasetKind::Cifar10,
        swa_data::Split::Train,
        parts,
        "x.bin".into(),
    )
    .expect_err("wrong size");
    assert!(
        matches!(
            &error,
            DataError::CountMismatch {
                expected: 6144,
                actual: 6143,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("x.bin"));
}

#[test]
fn empty_class_name_file_is_rejected() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let folder = write(
        DatasetKind::Cifar10,
        Layout::Binary,
        Packaging::Folder,
        dir.path(),
    );
    std::fs::write(folder.join("batches.meta.txt"), "\n\n").expect("write");
    assert!(
        matches!(load(&folder), Err(DataError::ClassNames { file, .. }) if file.ends_with("batches.meta.txt"))
    );
}

#[test]
fn wrong_checksum_is_reported_by_the_check() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let folder = write(
        DatasetKind::Cifar10,
        Layout::Binary,
        Packaging::Folder,
        dir.path(),
    );
    let report = swa_data::check(DatasetKind::Cifar10, &folder).expect("check runs");
    assert!(!report.is_valid());
    // Synthetic files have the official names but not the official contents.
    let mismatch = report
        .defects
        .iter()
        .find(|d| d.contains("data_batch_1.bin") && d.contains("5dd7e06a14cb22eb9f671a540d1b7c25"));
    assert!(mismatch.is_some(), "{:?}", report.defects);
    assert!(report
        .defects
        .iter()
        .any(|d| d.contains("train split: 10 images read, expected 50000")));
}

#[test]
fn check_reports_files_of_the_wrong_size_and_archive_checksums() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let archive = write(
        DatasetKind::Cifar100,
        Layout::Binary,
        Packaging::Archive,
        dir.path(),
    );
    let report = swa_data::check(DatasetKind::Cifar100, &archive).expect("check runs");
    let text = report.to_string();
    // The archive itself is compared with the official archive's MD5.
    assert!(
        report
            .defects
            .iter()
            .any(|d| d.contains("cifar-100-binary.tar.gz")
                && d.contains("03b5dce01913d631647c71ecec9e9cb8")),
        "{text}"
    );
    assert!(
        report
            .defects
            .iter()
            .any(|d| d.contains("cifar-100-binary/train.bin")
                && d.contains(
                    "wrong size: 30740 bytes, expected 153700000 (50000 records of 3074 bytes)"
                )),
        "{text}"
    );
    assert_eq!(report.splits[0].images, 10);
    assert_eq!(report.splits[0].class_counts.iter().sum::<usize>(), 10);
    assert!(text.contains("result: INVALID"), "{text}");
    assert!(text.contains("train split: 10 images"), "{text}");
}
