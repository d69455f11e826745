//! A strict reader for the pickles of the CIFAR python layout, and a writer of the same form.
//!
//! General pickle crates do not rebuild numpy arrays, and a general unpickler would execute any
//! callable named in the stream. This reader knows exactly the objects a CIFAR batch holds —
//! dicts, lists, tuples, integers, byte and text strings, and `uint8`/integer numpy arrays rebuilt
//! through `numpy.core.multiarray._reconstruct` — and rejects anything else with a typed error
//! carrying the byte offset. Every length is checked against the input before anything is
//! allocated, nesting depth and memo copying are bounded, and nothing panics on hostile input.
//!
//! The memo holds copies, not shared objects: a container changed after it was memoised is
//! recalled as it was when stored. CIFAR pickles never recall a container, so this never shows.

use std::collections::HashMap;
use std::rc::Rc;

/// Deepest container nesting accepted (a CIFAR batch needs 4).
const MAX_DEPTH: u32 = 64;
/// Total container elements that memo look-ups may copy (CIFAR batches copy none).
const MAX_MEMO_COPY_NODES: usize = 1 << 20;

/// Why a pickle stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleError {
    /// The stream ended inside an opcode or before STOP.
    #[error("pickle truncated at byte offset {offset}: {needed} more bytes needed for {what}")]
    Truncated {
        /// Where the missing bytes should start.
        offset: usize,
        /// How many bytes were needed.
        needed: usize,
        /// What they were for.
        what: &'static str,
    },
    /// An opcode this reader does not accept.
    #[error("unsupported pickle opcode 0x{opcode:02x} at byte offset {offset}")]
    UnsupportedOpcode {
        /// The opcode byte.
        opcode: u8,
        /// Its offset.
        offset: usize,
    },
    /// A protocol newer than 5.
    #[error("unsupported pickle protocol {protocol} at byte offset {offset}")]
    UnsupportedProtocol {
        /// The protocol number.
        protocol: u8,
        /// Its offset.
        offset: usize,
    },
    /// A global other than the numpy reconstruction functions.
    #[error("pickle references global '{module}.{name}' at byte offset {offset}; only numpy array reconstruction is accepted")]
    UnsupportedGlobal {
        /// Module part.
        module: String,
        /// Name part.
        name: String,
        /// Offset of the opcode.
        offset: usize,
    },
    /// An opcode found the stack in a state it cannot work with.
    #[error("malformed pickle at byte offset {offset}: {message}")]
    Malformed {
        /// Offset of the opcode.
        offset: usize,
        /// What was expected.
        message: String,
    },
    /// Containers nested too deeply.
    #[error("pickle nests containers deeper than {MAX_DEPTH} at byte offset {offset}")]
    TooDeep {
        /// Offset of the opcode.
        offset: usize,
    },
    /// Memo look-ups would copy too much.
    #[error("pickle memo look-ups copy more than {MAX_MEMO_COPY_NODES} elements at byte offset {offset}")]
    MemoBudget {
        /// Offset of the opcode.
        offset: usize,
    },
    /// Bytes after STOP.
    #[error("{extra} bytes after the pickle's STOP opcode at byte offset {offset}")]
    TrailingBytes {
        /// Offset of the first extra byte.
        offset: usize,
        /// How many extra bytes.
        extra: usize,
    },
}

/// Element type of a numpy array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dtype {
    /// `b'u'` (unsigned) or `b'i'` (signed).
    pub kind: u8,
    /// Bytes per element: 1, 2, 4 or 8 (little-endian when above 1).
    pub size: usize,
}

impl Dtype {
    fn parse(descr: &[u8]) -> Option<Dtype> {
        let descr = match descr.first() {
            Some(b'<') | Some(b'|') | Some(b'=') => &descr[1..],
            _ => descr,
        };
        let (kind, size) = match descr {
            b"u1" | b"B" => (b'u', 1),
            b"i1" | b"b" => (b'i', 1),
            b"u2" => (b'u', 2),
            b"i2" => (b'i', 2),
            b"u4" => (b'u', 4),
            b"i4" => (b'i', 4),
            b"u8" => (b'u', 8),
            b"i8" => (b'i', 8),
            _ => return None,
        };
        Some(Dtype { kind, size })
    }

    /// numpy's name for it ("uint8", "int64", …).
    pub fn name(&self) -> String {
        let base = if self.kind == b'u' { "uint" } else { "int" };
        format!("{base}{}", self.size * 8)
    }
}

/// A numpy array: shape, element type and raw little-endian C-order bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: Dtype,
    /// `shape.product() * dtype.size` bytes.
    pub data: Rc<[u8]>,
}

impl NdArray {
    /// The elements as integers (any accepted dtype).
    pub fn to_i64(&self) -> Vec<i64> {
        self.data
            .chunks_exact(self.dtype.size)
            .map(|chunk| {
                let mut raw = [0u8; 8];
                raw[..chunk.len()].copy_from_slice(chunk);
                let unsigned = u64::from_le_bytes(raw);
                if self.dtype.kind == b'i' && self.dtype.size < 8 {
                    let shift = 64 - 8 * self.dtype.size as u32;
                    ((unsigned << shift) as i64) >> shift
                } else {
                    unsigned as i64
                }
            })
            .collect()
    }
}

/// The callables this reader accepts in GLOBAL/STACK_GLOBAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Callable {
    Reconstruct,
    NdArrayClass,
    DtypeClass,
    CodecsEncode,
}

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True`/`False`.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// A byte string (Python 2 `str`, Python 3 `bytes`).
    Bytes(Rc<[u8]>),
    /// A text string.
    Str(Rc<str>),
    /// A list.
    List(Seq),
    /// A tuple.
    Tuple(Seq),
    /// A dict, in insertion order.
    Dict(Pairs),
    /// A numpy array.
    Array(NdArray),
    /// A numpy dtype.
    Dtype(Dtype),
    /// An array created by `_reconstruct` and not yet filled by BUILD.
    EmptyArray,
    #[doc(hidden)]
    Callable(CallableRef),
}

/// A reference to an accepted callable (opaque).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallableRef(Callable);

/// Elements of a list or tuple, with their nesting depth.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Seq {
    /// The elements.
    pub items: Vec<Value>,
    depth: u32,
    nodes: usize,
}

/// Entries of a dict, with their nesting depth.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Pairs {
    /// Key–value pairs in insertion order.
    pub items: Vec<(Value, Value)>,
    depth: u32,
    nodes: usize,
}

impl Value {
    fn depth(&self) -> u32 {
        match self {
            Value::List(seq) | Value::Tuple(seq) => seq.depth,
            Value::Dict(pairs) => pairs.depth,
            _ => 0,
        }
    }

    fn nodes(&self) -> usize {
        match self {
            Value::List(seq) | Value::Tuple(seq) => seq.nodes,
            Value::Dict(pairs) => pairs.nodes,
            _ => 1,
        }
    }

    /// A short description for error messages ("list of 3", "bytes", …).
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(v) => format!("int {v}"),
            Value::Float(_) => "float".into(),
            Value::Bytes(b) => format!("bytes of length {}", b.len()),
            Value::Str(_) => "str".into(),
            Value::List(seq) => format!("list of {}", seq.items.len()),
            Value::Tuple(seq) => format!("tuple of {}", seq.items.len()),
            Value::Dict(pairs) => format!("dict of {}", pairs.items.len()),
            Value::Array(array) => {
                format!("{} array of shape {:?}", array.dtype.name(), array.shape)
            }
            Value::Dtype(dtype) => format!("dtype {}", dtype.name()),
            Value::EmptyArray => "unfilled array".into(),
            Value::Callable(_) => "callable".into(),
        }
    }

    /// The text of a `bytes` or `str` value.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Bytes(b) => std::str::from_utf8(b).ok().map(str::to_owned),
            Value::Str(s) => Some(s.to_string()),
            _ => None,
        }
    }

    /// Looks up a dict entry whose key is the byte string or text string `key`.
    pub fn dict_get(&self, key: &str) -> Option<&Value> {
        let Value::Dict(pairs) = self else {
            return None;
        };
        pairs.items.iter().find_map(|(k, v)| match k {
            Value::Bytes(b) if &**b == key.as_bytes() => Some(v),
            Value::Str(s) if &**s == key => Some(v),
            _ => None,
        })
    }
}

fn seq(items: Vec<Value>, offset: usize) -> Result<Seq, PickleError> {
    let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
    if depth > MAX_DEPTH {
        return Err(PickleError::TooDeep { offset });
    }
    let nodes = 1 + items.iter().map(Value::nodes).sum::<usize>();
    Ok(Seq {
        items,
        depth,
        nodes,
    })
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    memo_copied: usize,
    op_offset: usize,
}

/// Decodes one pickle that must span all of `input`.
pub fn parse(input: &[u8]) -> Result<Value, PickleError> {
    let mut reader = Reader {
        input,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        memo_copied: 0,
        op_offset: 0,
    };
    let value = reader.run()?;
    if reader.pos != input.len() {
        return Err(PickleError::TrailingBytes {
            offset: reader.pos,
            extra: input.len() - reader.pos,
        });
    }
    Ok(value)
}

impl<'a> Reader<'a> {
    fn malformed(&self, message: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            offset: self.op_offset,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PickleError> {
        let available = self.input.len() - self.pos;
        if n > available {
            return Err(PickleError::Truncated {
                offset: self.pos,
                needed: n - available,
                what,
            });
        }
        let slice = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, PickleError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, PickleError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, PickleError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, PickleError> {
        let b = self.take(8, what)?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(b);
        Ok(u64::from_le_bytes(raw))
    }

    fn line(&mut self, what: &'static str) -> Result<&'a [u8], PickleError> {
        let rest = &self.input[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(end) => {
                self.pos += end + 1;
                Ok(&rest[..end])
            }
            None => Err(PickleError::Truncated {
                offset: self.input.len(),
                needed: 1,
                what,
            }),
        }
    }

    fn len_from(&self, n: u64) -> Result<usize, PickleError> {
        usize::try_from(n).map_err(|_| self.malformed(format!("length {n} does not fit in memory")))
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        // A value below the innermost mark belongs to an outer frame.
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.malformed("stack empty"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("stack empty"))
    }

    fn top_mut(&mut self) -> Result<&mut Value, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.malformed("stack empty"));
        }
        let offset = self.op_offset;
        self.stack.last_mut().ok_or(PickleError::Malformed {
            offset,
            message: "stack empty".into(),
        })
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK to pop to"))?;
        if mark > self.stack.len() {
            return Err(self.malformed("MARK above stack top"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Value>, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() < floor + n {
            return Err(self.malformed(format!("need {n} values on the stack")));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn push(&mut self, value: Value) {
        self.stack.push(value);
    }

    fn charge_copy(&mut self, nodes: usize) -> Result<(), PickleError> {
        self.memo_copied = self.memo_copied.saturating_add(nodes);
        if self.memo_copied > MAX_MEMO_COPY_NODES {
            return Err(PickleError::MemoBudget {
                offset: self.op_offset,
            });
        }
        Ok(())
    }

    fn memo_put(&mut self, key: u32) -> Result<(), PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        let value = match self.stack.last() {
            Some(value) if self.stack.len() > floor => value.clone(),
            _ => return Err(self.malformed("memo store with an empty stack")),
        };
        self.charge_copy(value.nodes())?;
        self.memo.insert(key, value);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), PickleError> {
        let value = self
            .memo
            .get(&key)
            .ok_or_else(|| self.malformed(format!("memo key {key} not stored")))?;
        let value = value.clone();
        self.charge_copy(value.nodes())?;
        self.push(value);
        Ok(())
    }

    fn append_to_list(&mut self, items: Vec<Value>) -> Result<(), PickleError> {
        let offset = self.op_offset;
        let list = self.top_mut()?;
        let Value::List(seq) = list else {
            let found = list.describe();
            return Err(PickleError::Malformed {
                offset,
                message: format!("APPEND(S) onto {found}, expected a list"),
            });
        };
        for item in &items {
            let depth = item.depth() + 1;
            if depth > MAX_DEPTH {
                return Err(PickleError::TooDeep { offset });
            }
            seq.depth = seq.depth.max(depth);
            seq.nodes = seq.nodes.saturating_add(item.nodes());
        }
        seq.items.extend(items);
        Ok(())
    }

    fn set_items(&mut self, flat: Vec<Value>) -> Result<(), PickleError> {
        if flat.len() % 2 != 0 {
            return Err(self.malformed("SETITEMS with an odd number of values"));
        }
        let offset = self.op_offset;
        let dict = self.top_mut()?;
        let Value::Dict(pairs) = dict else {
            let found = dict.describe();
            return Err(PickleError::Malformed {
                offset,
                message: format!("SETITEM(S) onto {found}, expected a dict"),
            });
        };
        let mut iter = flat.into_iter();
        while let (Some(key), Some(value)) = (iter.next(), iter.next()) {
            let depth = key.depth().max(value.depth()) + 1;
            if depth > MAX_DEPTH {
                return Err(PickleError::TooDeep { offset });
            }
            pairs.depth = pairs.depth.max(depth);
            pairs.nodes = pairs
                .nodes
                .saturating_add(key.nodes())
                .saturating_add(value.nodes());
            pairs.items.push((key, value));
        }
        Ok(())
    }

    fn global(&self, module: &[u8], name: &[u8]) -> Result<Value, PickleError> {
        let callable = match (module, name) {
            (b"numpy.core.multiarray", b"_reconstruct")
            | (b"numpy._core.multiarray", b"_reconstruct") => Callable::Reconstruct,
            (b"numpy", b"ndarray") => Callable::NdArrayClass,
            (b"numpy", b"dtype") => Callable::DtypeClass,
            (b"_codecs", b"encode") => Callable::CodecsEncode,
            _ => {
                return Err(PickleError::UnsupportedGlobal {
                    module: String::from_utf8_lossy(module).into_owned(),
                    name: String::from_utf8_lossy(name).into_owned(),
                    offset: self.op_offset,
                })
            }
        };
        Ok(Value::Callable(CallableRef(callable)))
    }

    fn reduce(&mut self) -> Result<(), PickleError> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let Value::Tuple(args) = args else {
            return Err(self.malformed(format!(
                "REDUCE arguments are {}, expected a tuple",
                args.describe()
            )));
        };
        let Value::Callable(CallableRef(callable)) = callable else {
            return Err(self.malformed(format!(
                "REDUCE on {}, expected a callable",
                callable.describe()
            )));
        };
        let result =
            match (callable, args.items.as_slice()) {
                (
                    Callable::Reconstruct,
                    [Value::Callable(CallableRef(Callable::NdArrayClass)), _, _],
                ) => Value::EmptyArray,
                (Callable::DtypeClass, [descr, ..]) => {
                    let descr = match descr {
                        Value::Bytes(b) => b.to_vec(),
                        Value::Str(s) => s.as_bytes().to_vec(),
                        other => {
                            return Err(self.malformed(format!(
                                "dtype of {}, expected a type string",
                                other.describe()
                            )))
                        }
                    };
                    let dtype = Dtype::parse(&descr).ok_or_else(|| {
                        self.malformed(format!(
                            "dtype '{}', expected an integer type",
                            String::from_utf8_lossy(&descr)
                        ))
                    })?;
                    Value::Dtype(dtype)
                }
                (Callable::CodecsEncode, [Value::Str(text), Value::Str(encoding)])
                    if &**encoding == "latin1" || &**encoding == "latin-1" =>
                {
                    // Python 3 writes bytes into protocol-2 pickles as latin-1 text.
                    let mut bytes = Vec::with_capacity(text.len());
                    for ch in text.chars() {
                        let code = u32::from(ch);
                        let byte = u8::try_from(code).map_err(|_| {
                            self.malformed(format!("character U+{code:04X} is not latin-1"))
                        })?;
                        bytes.push(byte);
                    }
                    Value::Bytes(bytes.into())
                }
                (Callable::CodecsEncode, [Value::Bytes(raw), Value::Str(_)]) => {
                    Value::Bytes(raw.clone())
                }
                (callable, _) => {
                    return Err(self.malformed(format!(
                    "REDUCE of {callable:?} with arguments ({}), not a numpy array reconstruction",
                    args.items.iter().map(Value::describe).collect::<Vec<_>>().join(", ")
                )))
                }
            };
        self.push(result);
        Ok(())
    }

    fn build(&mut self) -> Result<(), PickleError> {
        let state = self.pop()?;
        let offset = self.op_offset;
        let target = self.top_mut()?;
        match target {
            // numpy dtypes carry (version, byte order, …); only the byte order matters here.
            Value::Dtype(_) => match &state {
                Value::Tuple(seq) => match seq.items.get(1) {
                    Some(Value::Bytes(order)) if &**order == b">" => Err(PickleError::Malformed {
                        offset,
                        message: "big-endian dtype, expected little-endian".into(),
                    }),
                    Some(Value::Str(order)) if &**order == ">" => Err(PickleError::Malformed {
                        offset,
                        message: "big-endian dtype, expected little-endian".into(),
                    }),
                    _ => Ok(()),
                },
                other => Err(PickleError::Malformed {
                    offset,
                    message: format!("dtype state is {}, expected a tuple", other.describe()),
                }),
            },
            Value::EmptyArray => {
                let array = array_from_state(&state, offset)?;
                *target = Value::Array(array);
                Ok(())
            }
            other => Err(PickleError::Malformed {
                offset,
                message: format!(
                    "BUILD on {}, expected a numpy array or dtype",
                    other.describe()
                ),
            }),
        }
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            self.op_offset = self.pos;
            let opcode = self.byte("an opcode")?;
            match opcode {
                0x80 => {
                    let protocol = self.byte("the protocol number")?;
                    if protocol > 5 {
                        return Err(PickleError::UnsupportedProtocol {
                            protocol,
                            offset: self.op_offset,
                        });
                    }
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.u64("a frame length")?;
                }
                b'.' => {
                    let value = self.pop()?;
                    if !self.stack.is_empty() || !self.marks.is_empty() {
                        return Err(self.malformed("values left on the stack at STOP"));
                    }
                    if matches!(value, Value::EmptyArray | Value::Callable(_)) {
                        return Err(self.malformed(format!("result is {}", value.describe())));
                    }
                    return Ok(value);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top_mut()?.clone();
                    self.charge_copy(top.nodes())?;
                    self.push(top);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'K' => {
                    let v = self.byte("a BININT1 operand")?;
                    self.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.u16("a BININT2 operand")?;
                    self.push(Value::Int(i64::from(v)));
                }
                b'J' => {
                    let v = self.u32("a BININT operand")? as i32;
                    self.push(Value::Int(i64::from(v)));
                }
                0x8a => {
                    let n = usize::from(self.byte("a LONG1 length")?);
                    let bytes = self.take(n, "LONG1 digits")?;
                    if n > 8 {
                        return Err(
                            self.malformed(format!("{n}-byte integer, at most 8 supported"))
                        );
                    }
                    let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                        0xff
                    } else {
                        0
                    };
                    let mut raw = [fill; 8];
                    raw[..n].copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(raw)));
                }
                b'I' => {
                    let line = self.line("an INT line")?;
                    let value = match line {
                        b"00" => Value::Bool(false),
                        b"01" => Value::Bool(true),
                        _ => std::str::from_utf8(line)
                            .ok()
                            .and_then(|s| s.parse::<i64>().ok())
                            .map(Value::Int)
                            .ok_or_else(|| {
                                self.malformed("INT operand is not a decimal integer")
                            })?,
                    };
                    self.push(value);
                }
                b'G' => {
                    let bits = self.take(8, "a BINFLOAT operand")?;
                    let mut raw = [0u8; 8];
                    raw.copy_from_slice(bits);
                    self.push(Value::Float(f64::from_be_bytes(raw)));
                }
                b'U' | b'C' => {
                    let n = usize::from(self.byte("a string length")?);
                    let bytes = self.take(n, "string bytes")?;
                    self.push(Value::Bytes(bytes.into()));
                }
                b'T' => {
                    let n = self.u32("a BINSTRING length")? as i32;
                    let n = usize::try_from(n)
                        .map_err(|_| self.malformed(format!("negative string length {n}")))?;
                    let bytes = self.take(n, "string bytes")?;
                    self.push(Value::Bytes(bytes.into()));
                }
                b'B' => {
                    let n = self.u32("a BINBYTES length")?;
                    let n = self.len_from(u64::from(n))?;
                    let bytes = self.take(n, "bytes")?;
                    self.push(Value::Bytes(bytes.into()));
                }
                0x8e => {
                    let n = self.u64("a BINBYTES8 length")?;
                    let n = self.len_from(n)?;
                    let bytes = self.take(n, "bytes")?;
                    self.push(Value::Bytes(bytes.into()));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match opcode {
                        b'X' => u64::from(self.u32("a BINUNICODE length")?),
                        0x8c => u64::from(self.byte("a SHORT_BINUNICODE length")?),
                        _ => self.u64("a BINUNICODE8 length")?,
                    };
                    let n = self.len_from(n)?;
                    let bytes = self.take(n, "text bytes")?;
                    let text = std::str::from_utf8(bytes)
                        .map_err(|_| self.malformed("text string is not UTF-8"))?;
                    self.push(Value::Str(text.into()));
                }
                b']' => self.push(Value::List(Seq::default_with_depth())),
                b')' => self.push(Value::Tuple(Seq::default_with_depth())),
                b'}' => self.push(Value::Dict(Pairs {
                    items: Vec::new(),
                    depth: 1,
                    nodes: 1,
                })),
                b'l' => {
                    let items = self.pop_mark()?;
                    let list = seq(items, self.op_offset)?;
                    self.push(Value::List(list));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let tuple = seq(items, self.op_offset)?;
                    self.push(Value::Tuple(tuple));
                }
                0x85..=0x87 => {
                    let n = usize::from(opcode - 0x84);
                    let items = self.pop_n(n)?;
                    let tuple = seq(items, self.op_offset)?;
                    self.push(Value::Tuple(tuple));
                }
                b'd' => {
                    let flat = self.pop_mark()?;
                    self.push(Value::Dict(Pairs {
                        items: Vec::new(),
                        depth: 1,
                        nodes: 1,
                    }));
                    self.set_items(flat)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    self.append_to_list(vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append_to_list(items)?;
                }
                b's' => {
                    let pair = self.pop_n(2)?;
                    self.set_items(pair)?;
                }
                b'u' => {
                    let flat = self.pop_mark()?;
                    self.set_items(flat)?;
                }
                b'q' => {
                    let key = self.byte("a BINPUT key")?;
                    self.memo_put(u32::from(key))?;
                }
                b'r' => {
                    let key = self.u32("a LONG_BINPUT key")?;
                    self.memo_put(key)?;
                }
                0x94 => {
                    let key =
                        u32::try_from(self.memo.len()).map_err(|_| self.malformed("memo full"))?;
                    self.memo_put(key)?;
                }
                b'h' => {
                    let key = self.byte("a BINGET key")?;
                    self.memo_get(u32::from(key))?;
                }
                b'j' => {
                    let key = self.u32("a LONG_BINGET key")?;
                    self.memo_get(key)?;
                }
                b'c' => {
                    let module = self.line("a GLOBAL module")?;
                    let name = self.line("a GLOBAL name")?;
                    let global = self.global(module, name)?;
                    self.push(global);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.malformed("STACK_GLOBAL needs two text strings"));
                    };
                    let global = self.global(module.as_bytes(), name.as_bytes())?;
                    self.push(global);
                }
                b'R' => self.reduce()?,
                b'b' => self.build()?,
                _ => {
                    return Err(PickleError::UnsupportedOpcode {
                        opcode,
                        offset: self.op_offset,
                    })
                }
            }
        }
    }
}

impl Seq {
    fn default_with_depth() -> Seq {
        Seq {
            items: Vec::new(),
            depth: 1,
            nodes: 1,
        }
    }
}

/// numpy's ndarray state: `(version, shape, dtype, is_fortran, raw bytes)`; older writers omit `version`.
fn array_from_state(state: &Value, offset: usize) -> Result<NdArray, PickleError> {
    let malformed = |message: String| PickleError::Malformed { offset, message };
    let Value::Tuple(seq) = state else {
        return Err(malformed(format!(
            "array state is {}, expected a tuple",
            state.describe()
        )));
    };
    let fields = match seq.items.as_slice() {
        [Value::Int(_), shape, dtype, fortran, data] => [shape, dtype, fortran, data],
        [shape, dtype, fortran, data] => [shape, dtype, fortran, data],
        _ => {
            return Err(malformed(format!(
                "array state has {} fields, expected 4 or 5",
                seq.items.len()
            )))
        }
    };
    let [shape, dtype, fortran, data] = fields;
    let Value::Tuple(shape) = shape else {
        return Err(malformed(format!(
            "array shape is {}, expected a tuple",
            shape.describe()
        )));
    };
    let shape = shape
        .items
        .iter()
        .map(|dim| match dim {
            Value::Int(n) => {
                usize::try_from(*n).map_err(|_| malformed(format!("negative dimension {n}")))
            }
            other => Err(malformed(format!(
                "array dimension is {}, expected an int",
                other.describe()
            ))),
        })
        .collect::<Result<Vec<usize>, _>>()?;
    let Value::Dtype(dtype) = dtype else {
        return Err(malformed(format!(
            "array dtype is {}, expected a dtype",
            dtype.describe()
        )));
    };
    let fortran = match fortran {
        Value::Bool(b) => *b,
        Value::Int(i) => *i != 0,
        other => {
            return Err(malformed(format!(
                "array order flag is {}, expected a bool",
                other.describe()
            )))
        }
    };
    let Value::Bytes(data) = data else {
        return Err(malformed(format!(
            "array data is {}, expected bytes",
            data.describe()
        )));
    };
    let expected = shape
        .iter()
        .try_fold(dtype.size, |acc, &dim| acc.checked_mul(dim))
        .ok_or_else(|| malformed(format!("array shape {shape:?} overflows")))?;
    if expected != data.len() {
        return Err(malformed(format!(
            "array of shape {shape:?} and dtype {} needs {expected} bytes, found {}",
            dtype.name(),
            data.len()
        )));
    }
    if fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(malformed(format!(
            "array of shape {shape:?} is in Fortran order, expected C order"
        )));
    }
    Ok(NdArray {
        shape,
        dtype: *dtype,
        data: data.clone(),
    })
}

/// Writes pickles in the form Python 2's `cPickle.dump(obj, f, 2)` gives CIFAR batches: byte-string
/// keys, `BINPUT` after every memoised object, and numpy arrays rebuilt through `_reconstruct`.
#[derive(Default)]
pub struct PickleWriter {
    out: Vec<u8>,
    next_memo: u32,
}

/// A value the writer can emit.
pub enum WriteValue<'a> {
    /// A byte string.
    Bytes(&'a [u8]),
    /// A small non-negative integer.
    Int(u32),
    /// A list of integers.
    IntList(&'a [u32]),
    /// A list of byte strings.
    BytesList(&'a [Vec<u8>]),
    /// A `uint8` array of shape `(rows, cols)`.
    U8Matrix {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// `rows * cols` bytes.
        data: &'a [u8],
    },
}

impl PickleWriter {
    /// Serialises a dict with byte-string keys.
    pub fn dict(entries: &[(&str, WriteValue<'_>)]) -> Vec<u8> {
        let mut writer = PickleWriter::default();
        writer.out.extend_from_slice(&[0x80, 2, b'}']);
        writer.memoise();
        writer.out.push(b'(');
        for (key, value) in entries {
            writer.bytes(key.as_bytes());
            writer.value(value);
        }
        writer.out.extend_from_slice(b"u.");
        writer.out
    }

    fn memoise(&mut self) {
        if let Ok(key) = u8::try_from(self.next_memo) {
            self.out.extend_from_slice(&[b'q', key]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&self.next_memo.to_le_bytes());
        }
        self.next_memo += 1;
    }

    fn bytes(&mut self, bytes: &[u8]) {
        match u8::try_from(bytes.len()) {
            Ok(short) => self.out.extend_from_slice(&[b'U', short]),
            Err(_) => {
                self.out.push(b'T');
                // Python 2 strings longer than 2 GiB do not occur in CIFAR.
                let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                self.out.extend_from_slice(&len.to_le_bytes());
            }
        }
        self.out.extend_from_slice(bytes);
        self.memoise();
    }

    fn int(&mut self, value: u32) {
        if let Ok(small) = u8::try_from(value) {
            self.out.extend_from_slice(&[b'K', small]);
        } else if let Ok(medium) = u16::try_from(value) {
            self.out.push(b'M');
            self.out.extend_from_slice(&medium.to_le_bytes());
        } else {
            self.out.push(b'J');
            self.out.extend_from_slice(&value.to_le_bytes());
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
        self.memoise();
    }

    fn value(&mut self, value: &WriteValue<'_>) {
        match value {
            WriteValue::Bytes(b) => self.bytes(b),
            WriteValue::Int(i) => self.int(*i),
            WriteValue::IntList(items) => {
                self.out.push(b']');
                self.memoise();
                // The pickler appends in batches of 1000.
                for chunk in items.chunks(1000) {
                    self.out.push(b'(');
                    for &item in chunk {
                        self.int(item);
                    }
                    self.out.push(b'e');
                }
            }
            WriteValue::BytesList(items) => {
                self.out.push(b']');
                self.memoise();
                for chunk in items.chunks(1000) {
                    self.out.push(b'(');
                    for item in chunk {
                        self.bytes(item);
                    }
                    self.out.push(b'e');
                }
            }
            WriteValue::U8Matrix { rows, cols, data } => {
                self.global("numpy.core.multiarray", "_reconstruct");
                self.global("numpy", "ndarray");
                self.out.extend_from_slice(&[b'K', 0, 0x85]);
                self.memoise();
                self.bytes(b"b");
                self.out.push(0x87);
                self.memoise();
                self.out.push(b'R');
                self.memoise();
                self.out.extend_from_slice(&[b'(', b'K', 1]);
                for dim in [*rows, *cols] {
                    self.int(u32::try_from(dim).unwrap_or(u32::MAX));
                }
                self.out.push(0x86);
                self.memoise();
                self.global("numpy", "dtype");
                self.bytes(b"u1");
                self.out.extend_from_slice(&[b'K', 0, b'K', 1, 0x87]);
                self.memoise();
                self.out.push(b'R');
                self.memoise();
                self.out.extend_from_slice(&[b'(', b'K', 3]);
                self.bytes(b"|");
                self.out.extend_from_slice(b"NNN");
                self.out.push(b'J');
                self.out.extend_from_slice(&(-1i32).to_le_bytes());
                self.out.push(b'J');
                self.out.extend_from_slice(&(-1i32).to_le_bytes());
                self.out.extend_from_slice(&[b'K', 0, b't']);
                self.memoise();
                self.out.push(b'b');
                self.out.push(0x89);
                self.bytes(data);
                self.out.push(b't');
                self.memoise();
                self.out.push(b'b');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_cifar_like_dict() {
        let data: Vec<u8> = (0..2 * 3072).map(|i| (i % 251) as u8).collect();
        let names = vec![b"a.png".to_vec(), b"b.png".to_vec()];
        let bytes = PickleWriter::dict(&[
            ("batch_label", WriteValue::Bytes(b"training batch 1 of 5")),
            ("labels", WriteValue::IntList(&[3, 700])),
            (
                "data",
                WriteValue::U8Matrix {
                    rows: 2,
                    cols: 3072,
                    data: &data,
                },
            ),
            ("filenames", WriteValue::BytesList(&names)),
        ]);
        let value = parse(&bytes).expect("writer output parses");
        let Some(Value::Array(array)) = value.dict_get("data") else {
            panic!("no data array: {value:?}");
        };
        assert_eq!(array.shape, vec![2, 3072]);
        assert_eq!(&*array.data, &data[..]);
        let Some(Value::List(labels)) = value.dict_get("labels") else {
            panic!("no labels");
        };
        assert_eq!(labels.items, vec![Value::Int(3), Value::Int(700)]);
        assert_eq!(
            value
                .dict_get("batch_label")
                .and_then(Value::as_text)
                .as_deref(),
            Some("training batch 1 of 5")
        );
    }

    #[test]
    fn python3_latin1_bytes_and_stack_global_are_read() {
        // {'k': _codecs.encode('\xff\x01', 'latin1')} in protocol 4 style opcodes.
        let mut p = vec![0x80, 4, b'}', 0x94];
        p.extend_from_slice(&[0x8c, 1, b'k']);
        p.extend_from_slice(&[0x8c, 7]);
        p.extend_from_slice(b"_codecs");
        p.extend_from_slice(&[0x8c, 6]);
        p.extend_from_slice(b"encode");
        p.push(0x93);
        p.extend_from_slice(&[0x8c, 3, 0xc3, 0xbf, 0x01]);
        p.extend_from_slice(&[0x8c, 6]);
        p.extend_from_slice(b"latin1");
        p.extend_from_slice(&[0x86, b'R', b's', b'.']);
        let value = parse(&p).expect("parses");
        assert_eq!(
            value.dict_get("k"),
            Some(&Value::Bytes(vec![0xff, 0x01].into()))
        );
    }

    #[test]
    fn rejects_arbitrary_globals() {
        let p = b"\x80\x02cos\nsystem\nU\x02lsR.";
        assert!(matches!(
            parse(p),
            Err(PickleError::UnsupportedGlobal { offset: 2, .. })
        ));
    }

    #[test]
    fn rejects_deep_nesting_without_overflowing() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 100_000));
        p.extend(std::iter::repeat_n(b'a', 99_999));
        p.push(b'.');
        assert!(matches!(parse(&p), Err(PickleError::TooDeep { .. })));
    }

    #[test]
    fn rejects_memo_amplification() {
        // A 1000-element list, then many copies of it through BINGET.
        let mut p = vec![0x80, 2, b']', b'('];
        p.extend(std::iter::repeat_n([b'K', 1], 1000).flatten());
        p.extend_from_slice(&[b'e', b'q', 0]);
        p.extend_from_slice(b"0]");
        for _ in 0..5000 {
            p.extend_from_slice(&[b'h', 0, b'a']);
        }
        p.push(b'.');
        assert!(matches!(parse(&p), Err(PickleError::MemoBudget { .. })));
    }

    #[test]
    fn truncated_length_is_reported_with_offset() {
        let p = b"\x80\x02T\xff\xff\x00\x00abc";
        assert_eq!(
            parse(p),
            Err(PickleError::Truncated {
                offset: 7,
                needed: 65535 - 3,
                what: "string bytes"
            })
        );
    }

    #[test]
    fn signed_integer_arrays_decode() {
        let array = NdArray {
            shape: vec![2],
            dtype: Dtype {
                kind: b'i',
                size: 2,
            },
            data: vec![0xff, 0xff, 0x05, 0x00].into(),
        };
        assert_eq!(array.to_i64(), vec![-1, 5]);
    }
}
