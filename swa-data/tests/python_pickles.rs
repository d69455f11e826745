//! The reader against bytes Python's own `pickle.dump` wrote (with numpy): the files under
//! `tests/fixtures/`, made by `tests/fixtures/make_fixtures.py`.

use std::path::Path;

use swa_data::pickle::{self, Value};
use swa_data::{python, DatasetKind, IMAGE_BYTES};

/// Pixel `k` of each fixture file is `k % 251`.
fn pixels(images: usize) -> Vec<u8> {
    (0..images * IMAGE_BYTES).map(|k| (k % 251) as u8).collect()
}

#[test]
fn cifar100_train_written_by_python_is_read() {
    let bytes = include_bytes!("fixtures/cifar100_train_2_images");
    let records = python::parse_batch(
        DatasetKind::Cifar100,
        bytes,
        Path::new("cifar100_train_2_images"),
        100,
        Some(20),
    )
    .expect("Python's pickle parses");
    assert_eq!(records.images, pixels(2));
    assert_eq!(records.labels, vec![19, 29]);
    assert_eq!(records.coarse_labels, Some(vec![11, 15]));
}

#[test]
fn cifar100_meta_written_by_python_is_read() {
    let bytes = include_bytes!("fixtures/cifar100_meta_3_classes");
    let (fine, coarse) = python::parse_meta(
        DatasetKind::Cifar100,
        bytes,
        Path::new("cifar100_meta_3_classes"),
    )
    .expect("Python's pickle parses");
    assert_eq!(fine, ["apple", "aquarium_fish", "baby"]);
    assert_eq!(
        coarse,
        Some(vec!["aquatic_mammals".to_owned(), "fish".to_owned()])
    );
}

#[test]
fn labels_pickled_as_a_numpy_array_are_read() {
    let bytes = include_bytes!("fixtures/cifar10_batch_1_image_array_labels");
    let file = Path::new("cifar10_batch_1_image_array_labels");
    let records = python::parse_batch(DatasetKind::Cifar10, bytes, file, 10, None)
        .expect("Python's pickle parses");
    assert_eq!(records.images, pixels(1));
    assert_eq!(records.labels, vec![6]);
    // Label 6 is out of range for 5 classes.
    assert!(matches!(
        python::parse_batch(DatasetKind::Cifar10, bytes, file, 5, None),
        Err(swa_data::DataError::LabelOutOfRange { label: 6, .. })
    ));
}

#[test]
fn python_pickle_cut_short_is_an_error_with_its_offset() {
    let bytes = include_bytes!("fixtures/cifar100_train_2_images");
    let file = Path::new("cifar100_train_2_images");
    for len in [0, 1, 100, bytes.len() / 2, bytes.len() - 1] {
        match python::parse_batch(DatasetKind::Cifar100, &bytes[..len], file, 100, Some(20)) {
            Err(swa_data::DataError::Pickle {
                file: named,
                source,
            }) => {
                assert_eq!(named, file);
                assert!(source.to_string().contains("byte offset"), "{source}");
            }
            other => panic!("{len} bytes: expected a pickle error, got {other:?}"),
        }
    }
}

/// The CIFAR-10 batch of `make_fixtures.py` pickled with `protocol`.
fn protocol_fixture(protocol: u8) -> &'static [u8] {
    match protocol {
        2 => include_bytes!("fixtures/cifar10_batch_protocol_2"),
        3 => include_bytes!("fixtures/cifar10_batch_protocol_3"),
        4 => include_bytes!("fixtures/cifar10_batch_protocol_4"),
        _ => include_bytes!("fixtures/cifar10_batch_protocol_5"),
    }
}

#[test]
fn every_protocol_python_writes_passes_the_limits_with_memoised_names() {
    let name = Value::Bytes(b"camion_s_000148.png".to_vec());
    for protocol in 2..=5 {
        let value = pickle::parse(protocol_fixture(protocol))
            .unwrap_or_else(|error| panic!("protocol {protocol}: {error}"));
        // The second name is a memo reference to the first in the stream.
        assert_eq!(
            pickle::dict_get(&value, "filenames"),
            Some(&Value::List(vec![name.clone(), name.clone()])),
            "protocol {protocol}"
        );
        assert_eq!(
            pickle::dict_get(&value, "labels"),
            Some(&Value::List(vec![Value::I64(9), Value::I64(9)])),
            "protocol {protocol}"
        );
    }
}

#[test]
fn batches_pickled_with_protocols_2_to_4_are_read() {
    for protocol in 2..=4 {
        let file = format!("cifar10_batch_protocol_{protocol}");
        let records = python::parse_batch(
            DatasetKind::Cifar10,
            protocol_fixture(protocol),
            Path::new(&file),
            10,
            None,
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(records.images, pixels(2), "{file}");
        assert_eq!(records.labels, vec![9, 9], "{file}");
    }
}

#[test]
fn protocol_5_array_is_a_structure_error_naming_data() {
    // numpy pickles an array with protocol 5 as `_frombuffer(buffer, dtype, shape, order)`,
    // whose arguments serde-pickle does not keep: the file decodes, but without an array.
    match python::parse_batch(
        DatasetKind::Cifar10,
        protocol_fixture(5),
        Path::new("cifar10_batch_protocol_5"),
        10,
        None,
    ) {
        Err(swa_data::DataError::PickleStructure { field, .. }) => assert_eq!(field, "data"),
        other => panic!("expected a structure error on 'data', got {other:?}"),
    }
}
