//! Writing PyTorch's own checkpoint format: what `torch.save(model.state_dict(), path)` writes, so that
//! `model.load_state_dict(torch.load(path))` takes our weights as it takes torchvision's.
//!
//! The format (PyTorch 1.6 and later) is an uncompressed zip archive under one top-level folder:
//! - `data.pkl`: a pickle (protocol 2) of a `collections.OrderedDict` from key to tensor, each tensor
//!   rebuilt by `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
//!   backward_hooks)` from a storage the pickle names by a persistent id
//!   `('storage', torch.<Type>Storage, '<record>', 'cpu', numel)`;
//! - `data/<record>`: each storage's raw little-endian bytes, aligned to 64 bytes in the archive as
//!   PyTorch aligns them (so that `torch.load(..., mmap=True)` can map them);
//! - `byteorder` (`little`) and `version` (`3`).
//!
//! Reading goes through the `pytorch-reader` crate. Writing needs only the handful of pickle opcodes
//! below: a general pickle library cannot emit PyTorch's persistent ids, and pulling in a pickle VM to
//! write one fixed shape of dictionary would add more than it saves. The zip container is the `zip`
//! crate's.

use std::io::{Cursor, Write};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use super::StoredTensor;

/// The archive's top-level folder; `torch.load` accepts any single folder name.
const ARCHIVE: &str = "archive";
/// PyTorch aligns every record's data to this many bytes.
const RECORD_ALIGNMENT: u16 = 64;
/// The serialization format version PyTorch 1.6 to 2.x writes.
const FORMAT_VERSION: &str = "3\n";

/// Pickle opcodes (protocol 2) used here, named as in CPython's `pickle.py`.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const REDUCE: u8 = b'R';
    pub const BINPERSID: u8 = b'Q';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const NEWFALSE: u8 = 0x89;
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
}

/// A pickle being written.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![op::PROTO, 2])
    }

    fn opcode(&mut self, opcode: u8) {
        self.0.push(opcode);
    }

    /// A module-level name (`module.name`), as `GLOBAL` pushes it.
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(op::GLOBAL);
        for part in [module, name] {
            self.0.extend_from_slice(part.as_bytes());
            self.0.push(b'\n');
        }
    }

    /// `module.name()`: a call without arguments.
    fn call0(&mut self, module: &str, name: &str) {
        self.global(module, name);
        self.opcode(op::EMPTY_TUPLE);
        self.opcode(op::REDUCE);
    }

    fn string(&mut self, text: &str) {
        self.0.push(op::BINUNICODE);
        // Keys and record names are short; a pickle string's length field is 32 bits.
        let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(text.as_bytes());
    }

    /// A non-negative integer, in the shortest opcode that holds it.
    fn int(&mut self, value: u64) {
        if let Ok(byte) = u8::try_from(value) {
            self.0.extend_from_slice(&[op::BININT1, byte]);
        } else if let Ok(short) = u16::try_from(value) {
            self.0.push(op::BININT2);
            self.0.extend_from_slice(&short.to_le_bytes());
        } else if let Ok(int) = i32::try_from(value) {
            self.0.push(op::BININT);
            self.0.extend_from_slice(&int.to_le_bytes());
        } else {
            // LONG1: a length byte, then little-endian two's complement; nine bytes keep the sign bit
            // of any u64 clear.
            self.0.extend_from_slice(&[op::LONG1, 9]);
            self.0.extend_from_slice(&value.to_le_bytes());
            self.0.push(0);
        }
    }

    fn int_tuple(&mut self, values: &[usize]) {
        if values.is_empty() {
            self.opcode(op::EMPTY_TUPLE);
            return;
        }
        self.opcode(op::MARK);
        for &v in values {
            self.int(v as u64);
        }
        self.opcode(op::TUPLE);
    }

    fn finish(mut self) -> Vec<u8> {
        self.opcode(op::STOP);
        self.0
    }
}

/// PyTorch's storage class for a stored tensor's element type.
fn storage_class(tensor: &StoredTensor) -> &'static str {
    match tensor {
        StoredTensor::F32 { .. } => "FloatStorage",
        StoredTensor::F64 { .. } => "DoubleStorage",
        StoredTensor::I64 { .. } => "LongStorage",
    }
}

fn element_count(tensor: &StoredTensor) -> usize {
    match tensor {
        StoredTensor::F32 { values, .. } => values.len(),
        StoredTensor::F64 { values, .. } => values.len(),
        StoredTensor::I64 { values, .. } => values.len(),
    }
}

/// Row-major strides of a contiguous tensor of `shape`, in elements.
fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// The pickle of an `OrderedDict` of `tensors`, the i-th tensor's storage in record `i`.
fn state_dict_pickle<'a>(tensors: impl Iterator<Item = (&'a str, &'a StoredTensor)>) -> Vec<u8> {
    let mut pickle = Pickle::new();
    pickle.call0("collections", "OrderedDict");
    pickle.opcode(op::MARK);
    for (record, (name, tensor)) in tensors.enumerate() {
        pickle.string(name);
        pickle.global("torch._utils", "_rebuild_tensor_v2");
        pickle.opcode(op::MARK);
        // The storage, by persistent id.
        pickle.opcode(op::MARK);
        pickle.string("storage");
        pickle.global("torch", storage_class(tensor));
        pickle.string(&record.to_string());
        pickle.string("cpu");
        pickle.int(element_count(tensor) as u64);
        pickle.opcode(op::TUPLE);
        pickle.opcode(op::BINPERSID);
        // Storage offset, size, stride, requires_grad, backward hooks.
        pickle.int(0);
        pickle.int_tuple(tensor.shape());
        pickle.int_tuple(&contiguous_strides(tensor.shape()));
        pickle.opcode(op::NEWFALSE);
        pickle.call0("collections", "OrderedDict");
        pickle.opcode(op::TUPLE);
        pickle.opcode(op::REDUCE);
    }
    pickle.opcode(op::SETITEMS);
    pickle.finish()
}

/// The bytes of a `torch.save`d state dict holding `tensors` in the given order.
pub(super) fn encode<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a StoredTensor)> + Clone,
) -> Result<Vec<u8>, zip::result::ZipError> {
    let mut archive = ZipWriter::new(Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .large_file(true);
    let aligned = stored.with_alignment(RECORD_ALIGNMENT);

    archive.start_file(format!("{ARCHIVE}/data.pkl"), stored)?;
    archive.write_all(&state_dict_pickle(tensors.clone()))?;
    archive.start_file(format!("{ARCHIVE}/byteorder"), stored)?;
    archive.write_all(b"little")?;
    for (record, (_, tensor)) in tensors.enumerate() {
        archive.start_file(format!("{ARCHIVE}/data/{record}"), aligned)?;
        archive.write_all(&tensor.to_le_bytes())?;
    }
    archive.start_file(format!("{ARCHIVE}/version"), stored)?;
    archive.write_all(FORMAT_VERSION.as_bytes())?;
    Ok(archive.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_are_row_major() {
        assert_eq!(contiguous_strides(&[]), Vec::<usize>::new());
        assert_eq!(contiguous_strides(&[5]), vec![1]);
        assert_eq!(contiguous_strides(&[64, 3, 7, 7]), vec![147, 49, 7, 1]);
    }

    #[test]
    fn integers_take_the_shortest_opcode_and_keep_their_value() {
        let encode = |v: u64| {
            let mut p = Pickle(Vec::new());
            p.int(v);
            p.0
        };
        assert_eq!(encode(7), vec![op::BININT1, 7]);
        assert_eq!(encode(300), vec![op::BININT2, 44, 1]);
        assert_eq!(
            encode(25_557_032),
            [vec![op::BININT], 25_557_032i32.to_le_bytes().to_vec()].concat()
        );
        let big = encode(u64::MAX);
        assert_eq!(big[..2], [op::LONG1, 9]);
        assert_eq!(big[2..10], u64::MAX.to_le_bytes());
        assert_eq!(big[10], 0, "the sign byte keeps the value positive");
    }
}
