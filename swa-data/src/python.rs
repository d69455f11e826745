//! The python layout: pickled dicts whose `data` is a `uint8` numpy array of shape `(n, 3072)`.

use std::path::Path;

use crate::binary::BinaryRecords;
use crate::error::{DataError, Result};
use crate::layout::{DatasetKind, IMAGE_BYTES};
use crate::pickle::{self, describe, NdArray, Value};

fn structure(file: &Path, field: &str, expected: &str, found: String) -> DataError {
    DataError::PickleStructure {
        file: file.to_path_buf(),
        field: field.to_owned(),
        expected: expected.to_owned(),
        found,
    }
}

fn decode(bytes: &[u8], file: &Path) -> Result<Value> {
    let value = pickle::parse(bytes).map_err(|source| DataError::Pickle {
        file: file.to_path_buf(),
        source,
    })?;
    if !matches!(value, Value::Dict(_)) {
        return Err(structure(file, "<top level>", "a dict", describe(&value)));
    }
    Ok(value)
}

fn field<'v>(value: &'v Value, key: &str, file: &Path) -> Result<&'v Value> {
    pickle::dict_get(value, key)
        .ok_or_else(|| structure(file, key, "a present key", "no such key".into()))
}

fn labels(
    value: &Value,
    key: &str,
    file: &Path,
    classes: usize,
    expected_len: usize,
) -> Result<Vec<u32>> {
    let expected = "a list of ints";
    let raw: Vec<i64> = match field(value, key, file)? {
        Value::List(list) => list
            .iter()
            .map(|item| match item {
                Value::I64(i) => Ok(*i),
                other => Err(structure(
                    file,
                    key,
                    expected,
                    format!("an element {}", describe(other)),
                )),
            })
            .collect::<Result<_>>()?,
        other => match NdArray::from_state(other) {
            Some(array) if array.shape.len() == 1 => array
                .to_i64()
                .ok_or_else(|| structure(file, key, expected, array.describe()))?,
            _ => return Err(structure(file, key, expected, describe(other))),
        },
    };
    if raw.len() != expected_len {
        return Err(DataError::CountMismatch {
            file: file.to_path_buf(),
            what: format!("entries of '{key}' (one per row of 'data')"),
            expected: expected_len,
            actual: raw.len(),
        });
    }
    let which = match key {
        "fine_labels" => "fine",
        "coarse_labels" => "coarse",
        _ => "class",
    };
    raw.into_iter()
        .enumerate()
        .map(|(record, label)| {
            u32::try_from(label)
                .ok()
                .filter(|&l| (l as usize) < classes)
                .ok_or(DataError::LabelOutOfRange {
                    file: file.to_path_buf(),
                    record,
                    offset: 0,
                    which,
                    label,
                    classes,
                })
        })
        .collect()
}

/// Decodes one pickled batch (`data_batch_1`, `test_batch`, `train`, `test`).
pub fn parse_batch(
    kind: DatasetKind,
    bytes: &[u8],
    file: &Path,
    classes: usize,
    coarse_classes: Option<usize>,
) -> Result<BinaryRecords> {
    let value = decode(bytes, file)?;
    let data = field(&value, "data", file)?;
    let expected = "a uint8 array of shape (n, 3072)";
    let array = NdArray::from_state(data)
        .ok_or_else(|| structure(file, "data", expected, describe(data)))?;
    let count = match array.shape[..] {
        [count, IMAGE_BYTES] if array.is_bytes() => count,
        _ => return Err(structure(file, "data", expected, array.describe())),
    };
    match kind {
        DatasetKind::Cifar10 => Ok(BinaryRecords {
            images: array.data.to_vec(),
            labels: labels(&value, "labels", file, classes, count)?,
            coarse_labels: None,
        }),
        DatasetKind::Cifar100 => Ok(BinaryRecords {
            images: array.data.to_vec(),
            labels: labels(&value, "fine_labels", file, classes, count)?,
            coarse_labels: Some(labels(
                &value,
                "coarse_labels",
                file,
                coarse_classes.unwrap_or(0),
                count,
            )?),
        }),
    }
}

fn names(value: &Value, key: &str, file: &Path) -> Result<Vec<String>> {
    let expected = "a non-empty list of at most 256 UTF-8 strings";
    match field(value, key, file)? {
        Value::List(list) if !list.is_empty() && list.len() <= 256 => list
            .iter()
            .map(|item| {
                pickle::text(item).map(str::to_owned).ok_or_else(|| {
                    structure(
                        file,
                        key,
                        expected,
                        format!("an element {}", describe(item)),
                    )
                })
            })
            .collect(),
        other => Err(structure(file, key, expected, describe(other))),
    }
}

/// Class names from the metadata pickle: `(fine or only names, coarse names for CIFAR-100)`.
pub fn parse_meta(
    kind: DatasetKind,
    bytes: &[u8],
    file: &Path,
) -> Result<(Vec<String>, Option<Vec<String>>)> {
    let value = decode(bytes, file)?;
    match kind {
        DatasetKind::Cifar10 => Ok((names(&value, "label_names", file)?, None)),
        DatasetKind::Cifar100 => Ok((
            names(&value, "fine_label_names", file)?,
            Some(names(&value, "coarse_label_names", file)?),
        )),
    }
}
