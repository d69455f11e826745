//! The pickles of the CIFAR python layout: read with [`serde_pickle`], written in the official form.
//!
//! serde-pickle runs the pickle machine without ever calling anything a stream names: a global
//! such as `numpy.core.multiarray._reconstruct` stays an inert placeholder, and BUILD replaces an
//! object by its state. A numpy array therefore arrives as the state tuple of numpy's
//! `ndarray.__reduce__`, `(version, shape, dtype state, is_fortran, raw bytes)`, which
//! [`NdArray::from_state`] reads. The dtype's type code does not survive BUILD (only its
//! byte-order character does), so an array is recognised by its shape, byte order and byte count.
//!
//! serde-pickle is the reader because it is the maintained pickle implementation for Rust and
//! never executes a stream. It bounds neither nesting depth nor memo copies, though: a crafted
//! stream could exhaust the stack (10,000 nested lists, about 20 KB, overflow a 2 MiB thread
//! stack) or memory while it is decoded. [`parse`] therefore first scans the opcodes once and
//! refuses streams that nest deeper than [`MAX_DEPTH`] or would build more than a multiple of
//! their own size ([`PickleError::TooDeep`], [`PickleError::TooLarge`],
//! [`PickleError::MemoRewritten`]); see the `scan` module for the rules.

mod scan;

pub use scan::{MAX_DEPTH, MIN_SIZE_BUDGET, SIZE_PER_BYTE};

use serde::Serializer as _;
use serde_pickle::{DeOptions, HashableValue, SerOptions, Serializer};

pub use serde_pickle::Value;

/// Why a pickle stream could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    /// The pickle machine stopped at an opcode (truncated stream, unknown opcode, bad stack).
    #[error("invalid pickle at byte offset {offset}: {code}")]
    AtOffset {
        /// Where the machine stopped.
        offset: usize,
        /// Why.
        code: serde_pickle::ErrorCode,
    },
    /// Containers nest deeper than decoding, which recurses once per level, may go.
    #[error("pickle nests containers deeper than {limit} levels at byte offset {offset}")]
    TooDeep {
        /// The opcode that would nest one level too deep.
        offset: usize,
        /// The deepest nesting accepted ([`MAX_DEPTH`]).
        limit: usize,
    },
    /// Memo references and copies would build more than the stream's size budget: at least
    /// [`MIN_SIZE_BUDGET`], else [`SIZE_PER_BYTE`] values or string bytes per byte of stream.
    #[error(
        "pickle at byte offset {offset} would build more than {limit} values and string bytes \
         through memo references and copies, the limit for its size"
    )]
    TooLarge {
        /// The opcode that would exceed the budget.
        offset: usize,
        /// The budget.
        limit: u64,
    },
    /// A memo slot is written twice, or a memoised container is extended after it was
    /// referred to (as a container that holds itself is), so its copies cannot be bounded.
    #[error("pickle changes memo slot {slot} at byte offset {offset} after it was referred to")]
    MemoRewritten {
        /// The opcode that changes the slot.
        offset: usize,
        /// The memo slot.
        slot: u32,
    },
    /// The stream ran but its result is not plain data (e.g. an unhashable dict key).
    #[error("invalid pickle: {0}")]
    Decode(#[source] serde_pickle::Error),
    /// serde-pickle could not write a value.
    #[error("writing a pickle: {0}")]
    Encode(#[source] serde_pickle::Error),
    /// A matrix to write whose byte count is not `rows × cols`, or over the 2 GiB a protocol 2
    /// string holds.
    #[error("array '{key}': {rows} × {cols} in {bytes} bytes, expected rows × cols bytes, at most 2 GiB")]
    MatrixSize {
        /// Its dict key.
        key: String,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Bytes given.
        bytes: usize,
    },
}

/// Decodes one pickle that must span all of `bytes`, after a scan of its opcodes has bounded its
/// depth and the size it expands to (see the module documentation).
///
/// Byte strings stay bytes (Python 2's `str`, as the official files hold them); objects of
/// unknown classes that no BUILD gave a state become `None`.
pub fn parse(bytes: &[u8]) -> Result<Value, PickleError> {
    scan::check(bytes)?;
    serde_pickle::value_from_slice(bytes, DeOptions::new().replace_unresolved_globals()).map_err(
        |error| match error {
            serde_pickle::Error::Eval(code, offset) => PickleError::AtOffset { offset, code },
            other => PickleError::Decode(other),
        },
    )
}

/// The entry of a dict whose key is the byte string or text string `key`.
pub fn dict_get<'v>(value: &'v Value, key: &str) -> Option<&'v Value> {
    let Value::Dict(entries) = value else {
        return None;
    };
    entries
        .get(&HashableValue::Bytes(key.as_bytes().to_vec()))
        .or_else(|| entries.get(&HashableValue::String(key.to_owned())))
}

/// The text of a byte string (UTF-8) or text string.
pub fn text(value: &Value) -> Option<&str> {
    match value {
        Value::Bytes(bytes) => std::str::from_utf8(bytes).ok(),
        Value::String(text) => Some(text),
        _ => None,
    }
}

/// A short description for error messages ("list of 3", "bytes of length 5", …).
pub fn describe(value: &Value) -> String {
    if let Some(array) = NdArray::from_state(value) {
        return array.describe();
    }
    match value {
        Value::None => "None".into(),
        Value::Bool(_) => "bool".into(),
        Value::I64(v) => format!("int {v}"),
        Value::Int(v) => format!("int {v}"),
        Value::F64(_) => "float".into(),
        Value::Bytes(b) => format!("bytes of length {}", b.len()),
        Value::String(_) => "str".into(),
        Value::List(items) => format!("list of {}", items.len()),
        Value::Tuple(items) => format!("tuple of {}", items.len()),
        Value::Set(items) | Value::FrozenSet(items) => format!("set of {}", items.len()),
        Value::Dict(entries) => format!("dict of {}", entries.len()),
    }
}

/// A numpy array as its pickled state gives it: shape, byte order and raw C-order bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NdArray<'v> {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// numpy's byte-order character: `|` for single-byte elements, `<` for little-endian ones.
    pub byte_order: u8,
    /// The elements' bytes.
    pub data: &'v [u8],
}

impl<'v> NdArray<'v> {
    /// Reads numpy's array state `(version, shape, dtype state, is_fortran, raw bytes)` (older
    /// writers omit `version`); `None` for anything else, big-endian or Fortran-ordered arrays.
    pub fn from_state(state: &'v Value) -> Option<NdArray<'v>> {
        let Value::Tuple(fields) = state else {
            return None;
        };
        let (Value::Tuple(shape), Value::Tuple(dtype), Value::Bool(false), Value::Bytes(data)) =
            (match fields.as_slice() {
                [Value::I64(_), shape, dtype, fortran, data] | [shape, dtype, fortran, data] => {
                    (shape, dtype, fortran, data)
                }
                _ => return None,
            })
        else {
            return None;
        };
        // A dtype's state is `(version, byte order, …)`.
        let byte_order = match dtype.get(1)? {
            Value::Bytes(order) => order.as_slice(),
            Value::String(order) => order.as_bytes(),
            _ => return None,
        };
        let byte_order = match byte_order {
            [order @ (b'|' | b'<')] => *order,
            _ => return None,
        };
        let shape = shape
            .iter()
            .map(|dim| match dim {
                Value::I64(n) => usize::try_from(*n).ok(),
                _ => None,
            })
            .collect::<Option<_>>()?;
        Some(NdArray {
            shape,
            byte_order,
            data,
        })
    }

    /// Number of elements (`None` on overflow).
    pub fn element_count(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &dim| acc.checked_mul(dim))
    }

    /// Whether it holds exactly one byte per element, as a `uint8` array does.
    pub fn is_bytes(&self) -> bool {
        self.byte_order == b'|' && self.element_count() == Some(self.data.len())
    }

    /// The elements as little-endian unsigned integers of the width the byte count implies (1,
    /// 2, 4 or 8 bytes; 8-byte ones as two's complement); `None` if the count implies no such
    /// width. The dtype's signedness is not in the state, so a negative element of a narrower
    /// signed array reads as a large positive one.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let len = self.element_count()?;
        if len == 0 {
            return Some(Vec::new());
        }
        let width = self.data.len() / len;
        if width * len != self.data.len() || ![1, 2, 4, 8].contains(&width) {
            return None;
        }
        Some(
            self.data
                .chunks_exact(width)
                .map(|chunk| {
                    let mut raw = [0u8; 8];
                    raw[..width].copy_from_slice(chunk);
                    i64::from_le_bytes(raw)
                })
                .collect(),
        )
    }

    /// "array of shape [2, 3072] in 6144 bytes".
    pub fn describe(&self) -> String {
        format!(
            "array of shape {:?} in {} bytes",
            self.shape,
            self.data.len()
        )
    }
}

/// A `uint8` numpy array of shape `(rows, cols)` to write.
#[derive(Debug, Clone, Copy)]
pub struct U8Matrix<'a> {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows * cols` bytes, row after row.
    pub data: &'a [u8],
}

/// Pickles a dict whose keys are byte strings: the `plain` entries as serde-pickle writes them in
/// protocol 2, and `matrix` under its key as the numpy array
/// `numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')` with the state Python 2's
/// numpy gives a `uint8` array, its bytes one `BINSTRING`, as the official files hold it. Python
/// reads the result with `pickle.load(f, encoding='bytes')` (or `'latin1'`), as it reads them.
pub fn write_dict(
    plain: Vec<(&str, Value)>,
    matrix: Option<(&str, U8Matrix<'_>)>,
) -> Result<Vec<u8>, PickleError> {
    let options = || SerOptions::new().proto_v2();
    let entries = plain
        .into_iter()
        .map(|(key, value)| (HashableValue::Bytes(key.as_bytes().to_vec()), value))
        .collect();
    let mut out = serde_pickle::value_to_vec(&Value::Dict(entries), options())
        .map_err(PickleError::Encode)?;
    let Some((key, matrix)) = matrix else {
        return Ok(out);
    };
    let as_i32 = |n: usize| i32::try_from(n).ok();
    let (Some(rows), Some(cols), Some(data_len)) = (
        as_i32(matrix.rows),
        as_i32(matrix.cols),
        as_i32(matrix.data.len()),
    ) else {
        return Err(matrix_size(key, &matrix));
    };
    if matrix.rows.checked_mul(matrix.cols) != Some(matrix.data.len()) {
        return Err(matrix_size(key, &matrix));
    }
    // Dropping serde-pickle's STOP leaves the dict on the stack; SETITEM then adds the array.
    out.pop();
    (&mut Serializer::new(&mut out, options()))
        .serialize_bytes(key.as_bytes())
        .map_err(PickleError::Encode)?;
    out.extend_from_slice(
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01J",
    );
    out.extend_from_slice(&rows.to_le_bytes());
    out.push(b'J');
    out.extend_from_slice(&cols.to_le_bytes());
    // The shape tuple, then dtype('u1') with its state (3, '|', None, None, None, -1, -1, 0), then
    // is_fortran False and the bytes.
    out.extend_from_slice(
        b"\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T",
    );
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(matrix.data);
    out.extend_from_slice(b"tbs.");
    Ok(out)
}

fn matrix_size(key: &str, matrix: &U8Matrix<'_>) -> PickleError {
    PickleError::MatrixSize {
        key: key.to_owned(),
        rows: matrix.rows,
        cols: matrix.cols,
        bytes: matrix.data.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_dict_reads_back() {
        let data: Vec<u8> = (0..2 * 3072).map(|i| (i % 251) as u8).collect();
        let labels = Value::List(vec![Value::I64(3), Value::I64(700)]);
        let matrix = U8Matrix {
            rows: 2,
            cols: 3072,
            data: &data,
        };
        let bytes = write_dict(
            vec![
                (
                    "batch_label",
                    Value::Bytes(b"training batch 1 of 5".to_vec()),
                ),
                ("labels", labels.clone()),
            ],
            Some(("data", matrix)),
        )
        .expect("write");
        let value = parse(&bytes).expect("parse");
        let array = dict_get(&value, "data")
            .and_then(NdArray::from_state)
            .expect("an array");
        assert_eq!(array.shape, vec![2, 3072]);
        assert!(array.is_bytes());
        assert_eq!(array.data, &data[..]);
        assert_eq!(dict_get(&value, "labels"), Some(&labels));
        assert_eq!(
            dict_get(&value, "batch_label").and_then(text),
            Some("training batch 1 of 5")
        );
    }

    #[test]
    fn matrix_of_the_wrong_size_is_not_written() {
        let matrix = U8Matrix {
            rows: 2,
            cols: 3072,
            data: &[0; 3072],
        };
        assert!(matches!(
            write_dict(Vec::new(), Some(("data", matrix))),
            Err(PickleError::MatrixSize {
                rows: 2,
                bytes: 3072,
                ..
            })
        ));
    }

    #[test]
    fn unknown_globals_are_inert_data() {
        // os.system('ls'): the call is never made; the result is a placeholder.
        assert_eq!(
            parse(b"\x80\x02cos\nsystem\nU\x02ls\x85R.").expect("parse"),
            Value::None
        );
    }

    #[test]
    fn truncated_stream_reports_its_offset() {
        match parse(b"\x80\x02T\xff\xff\x00\x00abc") {
            Err(error @ PickleError::AtOffset { .. }) => {
                assert!(error.to_string().contains("byte offset"), "{error}")
            }
            other => panic!("expected an offset error, got {other:?}"),
        }
    }

    #[test]
    fn integer_arrays_read_at_the_width_of_their_bytes() {
        let state = |order: &[u8], data: Vec<u8>| {
            Value::Tuple(vec![
                Value::I64(1),
                Value::Tuple(vec![Value::I64(2)]),
                Value::Tuple(vec![Value::I64(3), Value::Bytes(order.to_vec())]),
                Value::Bool(false),
                Value::Bytes(data),
            ])
        };
        let two_bytes = state(b"<", vec![0x07, 0x01, 0x05, 0x00]);
        let array = NdArray::from_state(&two_bytes).expect("array");
        assert_eq!(array.to_i64(), Some(vec![263, 5]));
        assert!(!array.is_bytes());
        let eight_bytes = state(b"<", [(-1i64).to_le_bytes(), 9i64.to_le_bytes()].concat());
        let array = NdArray::from_state(&eight_bytes).expect("array");
        assert_eq!(array.to_i64(), Some(vec![-1, 9]));
        assert_eq!(
            NdArray::from_state(&state(b"<", vec![0; 3])).and_then(|a| a.to_i64()),
            None
        );
        assert_eq!(NdArray::from_state(&state(b">", vec![0; 4])), None);
    }
}
