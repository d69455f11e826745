//! The binary layout: fixed-size records (label byte(s), then 3,072 pixel bytes) and names as text.

use std::path::Path;

use crate::error::{DataError, Result};
use crate::layout::{DatasetKind, IMAGE_BYTES};

/// Images and labels decoded from one binary file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BinaryRecords {
    /// `n × 3072` pixel bytes.
    pub images: Vec<u8>,
    /// Fine (or only) labels.
    pub labels: Vec<u32>,
    /// Coarse labels (CIFAR-100).
    pub coarse_labels: Option<Vec<u32>>,
}

/// Decodes the records of one `.bin` file.
///
/// `classes` and `coarse_classes` bound the labels; `file` names the file in errors.
pub fn parse_records(
    kind: DatasetKind,
    bytes: &[u8],
    file: &Path,
    classes: usize,
    coarse_classes: Option<usize>,
) -> Result<BinaryRecords> {
    let label_bytes = match kind {
        DatasetKind::Cifar10 => 1,
        DatasetKind::Cifar100 => 2,
    };
    let record_len = label_bytes + IMAGE_BYTES;
    let remainder = bytes.len() % record_len;
    if remainder != 0 {
        let record = bytes.len() / record_len;
        return Err(DataError::Truncated {
            file: file.to_path_buf(),
            record,
            offset: (record * record_len) as u64,
            available: remainder,
            record_len,
            file_len: bytes.len() as u64,
        });
    }
    let count = bytes.len() / record_len;
    let mut records = BinaryRecords {
        images: Vec::with_capacity(count * IMAGE_BYTES),
        labels: Vec::with_capacity(count),
        coarse_labels: (kind == DatasetKind::Cifar100).then(|| Vec::with_capacity(count)),
    };
    for (index, record) in bytes.chunks_exact(record_len).enumerate() {
        let offset = (index * record_len) as u64;
        let out_of_range = |which, label: u8, classes| DataError::LabelOutOfRange {
            file: file.to_path_buf(),
            record: index,
            offset,
            which,
            label: i64::from(label),
            classes,
        };
        let fine = record[label_bytes - 1];
        if usize::from(fine) >= classes {
            let which = if kind == DatasetKind::Cifar100 {
                "fine"
            } else {
                "class"
            };
            return Err(out_of_range(which, fine, classes));
        }
        if let Some(coarse_labels) = records.coarse_labels.as_mut() {
            let coarse = record[0];
            let coarse_classes = coarse_classes.unwrap_or(0);
            if usize::from(coarse) >= coarse_classes {
                return Err(out_of_range("coarse", coarse, coarse_classes));
            }
            coarse_labels.push(u32::from(coarse));
        }
        records.labels.push(u32::from(fine));
        records.images.extend_from_slice(&record[label_bytes..]);
    }
    Ok(records)
}

/// Reads class names from a text file: one per line, blank lines ignored (the official files end
/// with some), surrounding whitespace trimmed.
pub fn parse_names(bytes: &[u8], file: &Path) -> Result<Vec<String>> {
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::ClassNames {
        file: file.to_path_buf(),
        message: format!("not UTF-8 text ({e})"),
    })?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        return Err(DataError::ClassNames {
            file: file.to_path_buf(),
            message: "no names, expected one per line".into(),
        });
    }
    if names.len() > 256 {
        return Err(DataError::ClassNames {
            file: file.to_path_buf(),
            message: format!("{} names, at most 256 fit a label byte", names.len()),
        });
    }
    Ok(names)
}

/// Encodes records in the official binary layout (for the synthetic writer).
pub fn encode_records(images: &[u8], labels: &[u32], coarse_labels: Option<&[u32]>) -> Vec<u8> {
    let label_bytes = if coarse_labels.is_some() { 2 } else { 1 };
    let mut out = Vec::with_capacity(labels.len() * (label_bytes + IMAGE_BYTES));
    for (index, (image, &label)) in images.chunks_exact(IMAGE_BYTES).zip(labels).enumerate() {
        if let Some(coarse) = coarse_labels {
            out.push(coarse.get(index).copied().unwrap_or(0) as u8);
        }
        out.push(label as u8);
        out.extend_from_slice(image);
    }
    out
}
