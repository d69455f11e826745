//! Checkpoints of weights in the safetensors format, readable by PyTorch, and in PyTorch's own format.
//!
//! [`StateDict::load`] also reads what `torch.save(model.state_dict(), path)` writes (`.pth`, `.pt`: the
//! zip layout of PyTorch 1.6 and later and the older pickle and tar layouts, through the `pytorch-reader`
//! crate), so torchvision's pretrained weights and the original SWA code's checkpoints load as users have
//! them: a state dict nested under `state_dict` or `model` (training checkpoints) is found, and the
//! `module.` prefix of `nn.DataParallel` is dropped, and torchvision's published DenseNet weights, older
//! than both its current names (`denselayer1.norm.1` for `denselayer1.norm1`) and BatchNorm's batch
//! counter, read under the current names with every counter at 0, as PyTorch loads them. [`StateDict::save`] writes that format too when the
//! path ends in `.pth` or `.pt` (the layout `torch.save` writes, so `torch.load` and `load_state_dict` take
//! it), and safetensors otherwise.
//!
//! A checkpoint holds every named tensor of a network under its PyTorch `state_dict` key, as little-endian
//! `F32` in PyTorch's layout, plus one `I64` scalar `<bn>.num_batches_tracked` per BatchNorm layer, so that
//! `model.load_state_dict(safetensors.torch.load_file(path), strict=True)` accepts the file. Loading checks
//! names, shapes and element types before it writes a single tensor, and reports every missing and
//! unexpected key at once.
//!
//! Every write is atomic: the file is written to a temporary file in the same directory, flushed to disk and
//! renamed over the destination, so a crash leaves either the old checkpoint or the new one, never a torn
//! file.
//!
//! ```
//! use swa_core::CpuBackend;
//! use swa_models::checkpoint::{load_module, save_module};
//! use swa_models::layers::BatchNorm2d;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = CpuBackend::with_threads(1);
//! let bn = BatchNorm2d::new(&backend, 4)?;
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("bn.safetensors");
//! save_module(&backend, &bn, &path)?;
//! let mut restored = BatchNorm2d::new(&backend, 4)?;
//! load_module(&backend, &mut restored, &path)?;
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use swa_core::averaging::AverageState;
use swa_core::backend::{Backend, BackendError, HasShape};
use swa_core::params::{NamedTensors, TensorRole};
use swa_core::swag::SwagState;

use crate::module::Module;

mod pth;

/// Whether a file's first bytes are those of a PyTorch checkpoint: a zip archive (`PK\x03\x04`, PyTorch
/// 1.6 and later), a pickle stream (protocol opcode `0x80`, the legacy layout) or a tar archive (`ustar`
/// at byte 257, the oldest). A safetensors file starts with the 8-byte length of its JSON header and then
/// the header's opening brace, so a file with `{` at byte 8 is taken for safetensors whatever its first
/// bytes.
/// The bytes [`is_pytorch_file`] looks at: up to the end of a tar header's `ustar` magic.
const FORMAT_PROBE_BYTES: usize = 262;

fn is_pytorch_file(bytes: &[u8]) -> bool {
    let safetensors = bytes.get(8) == Some(&b'{');
    let zip = bytes.starts_with(b"PK\x03\x04");
    let pickle = bytes.first() == Some(&0x80);
    let tar = bytes.get(257..262) == Some(b"ustar".as_slice());
    !safetensors && (zip || pickle || tar)
}

/// Whether a path names a PyTorch checkpoint by its extension (`.pth`, `.pt`, any case).
fn is_pytorch_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("pth") || e.eq_ignore_ascii_case("pt"))
}

/// Little-endian values of a fixed width from raw bytes (the length already checked by the caller).
fn le_values<T, const N: usize>(bytes: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|chunk| {
            let mut array = [0u8; N];
            array.copy_from_slice(chunk);
            from(array)
        })
        .collect()
}

/// The suffix PyTorch gives a BatchNorm layer's batch counter.
pub const BATCH_COUNTER_SUFFIX: &str = "num_batches_tracked";

/// Errors reading, writing or applying a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (`writing`, `reading`, …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The bytes are not a valid safetensors file, or a tensor cannot be stored in one.
    #[error("{origin}: not a valid safetensors checkpoint: {message}")]
    Format {
        /// The file (or `in-memory state dict`).
        origin: String,
        /// What was wrong.
        message: String,
    },
    /// The tensors could not be encoded as a PyTorch checkpoint.
    #[error("{origin}: cannot be encoded as a PyTorch checkpoint: {message}")]
    PytorchEncode {
        /// The state dict's origin.
        origin: String,
        /// What went wrong.
        message: String,
    },
    /// A PyTorch checkpoint that could not be read.
    #[error("{origin}: not a readable PyTorch checkpoint: {message}")]
    PytorchFormat {
        /// The file.
        origin: String,
        /// What was wrong.
        message: String,
    },
    /// The checkpoint's keys differ from the model's.
    #[error(
        "{origin}: keys do not match the model: missing {missing:?}, unexpected {unexpected:?}"
    )]
    KeyMismatch {
        /// The file.
        origin: String,
        /// Keys the model has and the checkpoint lacks.
        missing: Vec<String>,
        /// Keys the checkpoint has and the model lacks.
        unexpected: Vec<String>,
    },
    /// A tensor whose shape differs from the model's.
    #[error("{origin}: tensor {name:?} has shape {got:?}, the model expects {expected:?}")]
    ShapeMismatch {
        /// The file.
        origin: String,
        /// The tensor's key.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The checkpoint's shape.
        got: Vec<usize>,
    },
    /// A tensor of another element type than the model's.
    #[error("{origin}: tensor {name:?} is {got}, expected {expected}")]
    DtypeMismatch {
        /// The file.
        origin: String,
        /// The tensor's key.
        name: String,
        /// The expected type.
        expected: &'static str,
        /// The stored type.
        got: String,
    },
    /// A batch counter that does not fit the model's counter (negative).
    #[error("{origin}: {name:?} = {value} is not a valid batch count")]
    InvalidCounter {
        /// The file.
        origin: String,
        /// The counter's key.
        name: String,
        /// The stored value.
        value: i64,
    },
    /// The backend failed to read or write a tensor.
    #[error("tensor {name:?}: {source}")]
    Backend {
        /// The tensor's key.
        name: String,
        /// The backend's error.
        source: BackendError,
    },
}

/// A tensor held on the host, as stored in a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum StoredTensor {
    /// 32-bit floats: weights, biases, BatchNorm statistics.
    F32 {
        /// Dimensions, outermost first.
        shape: Vec<usize>,
        /// Row-major values.
        values: Vec<f32>,
    },
    /// 64-bit floats: an ensemble's mean predicted probabilities.
    F64 {
        /// Dimensions, outermost first.
        shape: Vec<usize>,
        /// Row-major values.
        values: Vec<f64>,
    },
    /// 64-bit integers: BatchNorm batch counters (scalars, shape `[]`), labels.
    I64 {
        /// Dimensions, outermost first.
        shape: Vec<usize>,
        /// Row-major values.
        values: Vec<i64>,
    },
}

impl StoredTensor {
    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        match self {
            StoredTensor::F32 { shape, .. }
            | StoredTensor::F64 { shape, .. }
            | StoredTensor::I64 { shape, .. } => shape,
        }
    }

    /// The element type's name in the safetensors header (`F32`, `F64`, `I64`).
    pub fn dtype_name(&self) -> &'static str {
        match self {
            StoredTensor::F32 { .. } => "F32",
            StoredTensor::F64 { .. } => "F64",
            StoredTensor::I64 { .. } => "I64",
        }
    }

    fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            StoredTensor::F32 { values, .. } => {
                values.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            StoredTensor::F64 { values, .. } => {
                values.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            StoredTensor::I64 { values, .. } => {
                values.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        }
    }
}

/// Named host tensors in key order: the content of one checkpoint file.
#[derive(Clone, Debug, PartialEq)]
pub struct StateDict {
    origin: String,
    tensors: BTreeMap<String, StoredTensor>,
}

impl Default for StateDict {
    fn default() -> Self {
        Self::new()
    }
}

impl StateDict {
    /// An empty state dict.
    pub fn new() -> Self {
        Self {
            origin: "in-memory state dict".into(),
            tensors: BTreeMap::new(),
        }
    }

    /// Reads every tensor of `tensors` back to the host, as `F32`.
    pub fn from_tensors<B: Backend, M: NamedTensors<B> + ?Sized>(
        backend: &B,
        tensors: &M,
    ) -> Result<Self, CheckpointError> {
        let mut dict = Self::new();
        let mut failure = None;
        tensors.visit_tensors(&mut |name, _, t| {
            if failure.is_some() {
                return;
            }
            match backend.to_host(t) {
                Ok(values) => {
                    let stored = StoredTensor::F32 {
                        shape: t.dims().to_vec(),
                        values,
                    };
                    dict.tensors.insert(name.to_string(), stored);
                }
                Err(source) => {
                    failure = Some(CheckpointError::Backend {
                        name: name.to_string(),
                        source,
                    })
                }
            }
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(dict),
        }
    }

    /// Reads every tensor of `module` back to the host, with its BatchNorm batch counters as `I64` scalars.
    pub fn from_module<B: Backend, M: Module<B> + ?Sized>(
        backend: &B,
        module: &M,
    ) -> Result<Self, CheckpointError> {
        let mut dict = Self::from_tensors(backend, module)?;
        module.visit_batch_counters(&mut |name, count| {
            dict.insert_counter(name, count);
        });
        Ok(dict)
    }

    /// Adds `<bn>.num_batches_tracked = 0` for every BatchNorm layer (every `<bn>.running_mean`) that has
    /// no counter yet, as PyTorch's strict loading expects one. The counter only matters to PyTorch for a
    /// cumulative average (`momentum=None`), which the paper's networks do not use.
    pub fn add_missing_batch_counters(&mut self) {
        let layers: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_suffix("running_mean"))
            .map(|prefix| format!("{prefix}{BATCH_COUNTER_SUFFIX}"))
            .collect();
        for name in layers {
            self.tensors.entry(name).or_insert(StoredTensor::I64 {
                shape: vec![],
                values: vec![0],
            });
        }
    }

    /// Inserts or replaces a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: StoredTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Inserts a batch counter as PyTorch stores it: an `I64` scalar.
    pub fn insert_counter(&mut self, name: impl Into<String>, count: u64) {
        let value = i64::try_from(count).unwrap_or(i64::MAX);
        self.insert(
            name,
            StoredTensor::I64 {
                shape: vec![],
                values: vec![value],
            },
        );
    }

    /// Removes and returns the tensor stored under `name`.
    pub fn remove(&mut self, name: &str) -> Option<StoredTensor> {
        self.tensors.remove(name)
    }

    /// Moves the values an average holds out of its saved state into a state dict, keyed by tensor name,
    /// leaving the state with the names, roles, shapes, count and rule: the small part, which a text
    /// format holds well.
    pub fn take_average_values(state: &mut AverageState) -> Self {
        let mut dict = Self::new();
        for tensor in &mut state.tensors {
            if let Some(values) = tensor.values.take() {
                let shape = tensor.shape.clone();
                dict.insert(tensor.name.clone(), StoredTensor::F32 { shape, values });
            }
        }
        dict
    }

    /// Puts the values taken by [`StateDict::take_average_values`] back into the average's state, checking
    /// that every stored tensor is one of the state's, as `F32` of the state's shape. Tensors the state
    /// expects but the file lacks are left empty, which [`WeightAverage::from_state`] reports.
    ///
    /// [`WeightAverage::from_state`]: swa_core::averaging::WeightAverage::from_state
    pub fn restore_average_values(
        mut self,
        state: &mut AverageState,
    ) -> Result<(), CheckpointError> {
        for tensor in &mut state.tensors {
            match self.tensors.remove(&tensor.name) {
                None => {}
                Some(StoredTensor::F32 { shape, values }) if shape == tensor.shape => {
                    tensor.values = Some(values)
                }
                Some(StoredTensor::F32 { shape, .. }) => {
                    return Err(CheckpointError::ShapeMismatch {
                        origin: self.origin,
                        name: tensor.name.clone(),
                        expected: tensor.shape.clone(),
                        got: shape,
                    })
                }
                Some(other) => {
                    return Err(CheckpointError::DtypeMismatch {
                        origin: self.origin,
                        name: tensor.name.clone(),
                        expected: "F32",
                        got: other.dtype_name().into(),
                    })
                }
            }
        }
        if self.tensors.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::KeyMismatch {
                origin: self.origin,
                missing: Vec::new(),
                unexpected: self.tensors.into_keys().collect(),
            })
        }
    }

    /// Takes the values out of saved SWAG moments, leaving the sizes for `state.json`, under the keys of the
    /// authors' `SWAG` module: `<name>_mean`, `<name>_sq_mean` and `<name>_cov_mat_sqrt` (`[rank, numel]`,
    /// oldest deviation first). The state's ring is rotated to that order (`next_column` then points at
    /// the oldest column again), which changes no sample and no later update.
    pub fn take_swag_values(state: &mut SwagState) -> Self {
        let mut dict = Self::new();
        let held = state.tensors.first().map_or(0, |t| t.columns.len());
        let full = held == state.max_rank;
        let oldest = if full { state.next_column } else { 0 };
        for tensor in &mut state.tensors {
            let numel = tensor.shape.iter().product::<usize>();
            let held_here = tensor.columns.len();
            tensor.columns.rotate_left(oldest.min(held_here));
            let rows = tensor.columns.len();
            let deviations: Vec<f32> = std::mem::take(&mut tensor.columns).concat();
            let shape = tensor.shape.clone();
            dict.insert(
                format!("{}_mean", tensor.name),
                StoredTensor::F32 {
                    shape: shape.clone(),
                    values: std::mem::take(&mut tensor.mean),
                },
            );
            dict.insert(
                format!("{}_sq_mean", tensor.name),
                StoredTensor::F32 {
                    shape,
                    values: std::mem::take(&mut tensor.sq_mean),
                },
            );
            dict.insert(
                format!("{}_cov_mat_sqrt", tensor.name),
                StoredTensor::F32 {
                    shape: vec![rows, numel],
                    values: deviations,
                },
            );
        }
        state.next_column = if full {
            0
        } else {
            held % state.max_rank.max(1)
        };
        dict
    }

    /// Puts the values taken by [`StateDict::take_swag_values`] back into the moments' state, checking
    /// every key, shape and element type; [`SwagMoments::from_state`] then checks that the sizes agree.
    ///
    /// [`SwagMoments::from_state`]: swa_core::swag::SwagMoments::from_state
    pub fn restore_swag_values(mut self, state: &mut SwagState) -> Result<(), CheckpointError> {
        let mut missing = Vec::new();
        for tensor in &mut state.tensors {
            let numel = tensor.shape.iter().product::<usize>();
            let mut take = |key: String,
                            rows: Option<usize>|
             -> Result<Option<Vec<f32>>, CheckpointError> {
                match self.tensors.remove(&key) {
                    None => {
                        missing.push(key);
                        Ok(None)
                    }
                    Some(StoredTensor::F32 { shape, values }) => {
                        let fits = match rows {
                            None => shape == tensor.shape,
                            Some(max) => shape.len() == 2 && shape[0] <= max && shape[1] == numel,
                        };
                        if fits {
                            Ok(Some(values))
                        } else {
                            let expected = match rows {
                                None => tensor.shape.clone(),
                                Some(max) => vec![max, numel],
                            };
                            Err(CheckpointError::ShapeMismatch {
                                origin: self.origin.clone(),
                                name: key,
                                expected,
                                got: shape,
                            })
                        }
                    }
                    Some(other) => Err(CheckpointError::DtypeMismatch {
                        origin: self.origin.clone(),
                        name: key,
                        expected: "F32",
                        got: other.dtype_name().into(),
                    }),
                }
            };
            if let Some(values) = take(format!("{}_mean", tensor.name), None)? {
                tensor.mean = values;
            }
            if let Some(values) = take(format!("{}_sq_mean", tensor.name), None)? {
                tensor.sq_mean = values;
            }
            if let Some(values) = take(
                format!("{}_cov_mat_sqrt", tensor.name),
                Some(state.max_rank),
            )? {
                tensor.columns = values.chunks(numel.max(1)).map(<[f32]>::to_vec).collect();
            }
        }
        if missing.is_empty() && self.tensors.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::KeyMismatch {
                origin: self.origin,
                missing,
                unexpected: self.tensors.into_keys().collect(),
            })
        }
    }

    /// The tensor stored under `name`.
    pub fn get(&self, name: &str) -> Option<&StoredTensor> {
        self.tensors.get(name)
    }

    /// The tensors, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &StoredTensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Where the tensors came from (a file path, or `in-memory state dict`), for error messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The safetensors encoding of the tensors.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        let format_error = |message: String| CheckpointError::Format {
            origin: self.origin.clone(),
            message,
        };
        let bytes: Vec<(&String, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, t)| (name, t.to_le_bytes()))
            .collect();
        let mut views = Vec::with_capacity(bytes.len());
        for ((name, data), tensor) in bytes.iter().zip(self.tensors.values()) {
            let dtype = match tensor {
                StoredTensor::F32 { .. } => Dtype::F32,
                StoredTensor::F64 { .. } => Dtype::F64,
                StoredTensor::I64 { .. } => Dtype::I64,
            };
            let view = TensorView::new(dtype, tensor.shape().to_vec(), data)
                .map_err(|e| format_error(format!("tensor {name:?}: {e}")))?;
            views.push((name.as_str(), view));
        }
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::tensor::serialize(views, Some(metadata))
            .map_err(|e| format_error(e.to_string()))
    }

    /// Decodes a safetensors file's bytes; `origin` names them in errors. Only `F32`, `F64` and `I64`
    /// tensors are accepted.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self, CheckpointError> {
        let format_error = |message: String| CheckpointError::Format {
            origin: origin.to_string(),
            message,
        };
        let file = SafeTensors::deserialize(bytes).map_err(|e| format_error(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.iter() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let stored = match view.dtype() {
                Dtype::F32 => StoredTensor::F32 {
                    shape,
                    values: data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                },
                Dtype::F64 => StoredTensor::F64 {
                    shape,
                    values: data
                        .chunks_exact(8)
                        .map(|c| {
                            f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect(),
                },
                Dtype::I64 => StoredTensor::I64 {
                    shape,
                    values: data
                        .chunks_exact(8)
                        .map(|c| {
                            i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect(),
                },
                other => {
                    return Err(CheckpointError::DtypeMismatch {
                        origin: origin.to_string(),
                        name: name.to_string(),
                        expected: "F32, F64 or I64",
                        got: format!("{other:?}"),
                    })
                }
            };
            tensors.insert(name.to_string(), stored);
        }
        Ok(Self {
            origin: origin.to_string(),
            tensors,
        })
    }

    /// The bytes `torch.save` writes for a state dict of these tensors (its zip layout), in key order.
    pub fn to_pytorch_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        pth::encode(self.tensors.iter().map(|(name, t)| (name.as_str(), t))).map_err(|e| {
            CheckpointError::PytorchEncode {
                origin: self.origin.clone(),
                message: e.to_string(),
            }
        })
    }

    /// Writes the tensors to `path` atomically (temporary file in the same directory, fsync, rename): in
    /// PyTorch's format ([`StateDict::to_pytorch_bytes`]) when the path ends in `.pth` or `.pt`, as
    /// safetensors ([`StateDict::to_bytes`]) otherwise.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let bytes = if is_pytorch_path(path) {
            self.to_pytorch_bytes()?
        } else {
            self.to_bytes()?
        };
        write_atomically(path, &bytes)
    }

    /// Reads a checkpoint file: safetensors, or a PyTorch checkpoint (recognised by its first bytes: a
    /// zip archive, a pickle stream or a tar archive; see [`StateDict::from_pytorch_file`]).
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        use std::io::Read;
        let io_error = |source| CheckpointError::Io {
            action: "reading",
            path: path.to_path_buf(),
            source,
        };
        // Only the first bytes decide the format: a PyTorch checkpoint is then read lazily by its reader
        // rather than loaded whole here first.
        let mut file = std::fs::File::open(path).map_err(io_error)?;
        let mut head = Vec::with_capacity(FORMAT_PROBE_BYTES);
        (&mut file)
            .take(FORMAT_PROBE_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(io_error)?;
        if is_pytorch_file(&head) {
            return Self::from_pytorch_file(path);
        }
        let mut bytes = head;
        file.read_to_end(&mut bytes).map_err(io_error)?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Reads the tensors of a PyTorch checkpoint written by `torch.save`: a `state_dict`, or a dictionary
    /// holding one under `state_dict` or `model`, with any `module.` prefix (`nn.DataParallel`) dropped.
    /// Floating-point tensors are read as `F32` (`F64` kept as it is), integer ones as `I64`; half-precision
    /// tensors are refused with their name (convert the model with `.float()` before saving).
    pub fn from_pytorch_file(path: &Path) -> Result<Self, CheckpointError> {
        let origin = path.display().to_string();
        let format = |message: String| CheckpointError::PytorchFormat {
            origin: origin.clone(),
            message,
        };
        let reader = pytorch_reader::PytorchReader::new(path).map_err(|e| format(e.to_string()))?;
        let mut tensors = reader.into_tensors();
        // Training checkpoints nest the state dict; keep the nested one when there is one.
        for nest in ["state_dict.", "model."] {
            if tensors.keys().any(|k| k.starts_with(nest)) {
                tensors.retain(|k, _| k.starts_with(nest));
                tensors = tensors
                    .into_iter()
                    .map(|(k, t)| (k[nest.len()..].to_string(), t))
                    .collect();
                break;
            }
        }
        if !tensors.is_empty() && tensors.keys().all(|k| k.starts_with("module.")) {
            tensors = tensors
                .into_iter()
                .map(|(k, t)| (k["module.".len()..].to_string(), t))
                .collect();
        }
        let tensors: Vec<_> = tensors
            .into_iter()
            .map(|(k, t)| (current_densenet_name(&k).unwrap_or(k), t))
            .collect();
        let mut dict = StateDict {
            origin: origin.clone(),
            tensors: BTreeMap::new(),
        };
        for (name, tensor) in tensors {
            let shape = tensor.shape().to_vec();
            let dtype = tensor.dtype();
            let bytes = tensor
                .read()
                .map_err(|e| format(format!("tensor {name:?}: {e}")))?;
            let expected = tensor.byte_len();
            if bytes.len() != expected {
                return Err(format(format!(
                    "tensor {name:?} has {} bytes, its shape {shape:?} and type {dtype:?} need \
                     {expected}",
                    bytes.len()
                )));
            }
            use pytorch_reader::DType;
            let stored = match dtype {
                DType::F32 => StoredTensor::F32 {
                    shape,
                    values: le_values(&bytes, f32::from_le_bytes),
                },
                DType::F64 => StoredTensor::F64 {
                    shape,
                    values: le_values(&bytes, f64::from_le_bytes),
                },
                DType::I64 => StoredTensor::I64 {
                    shape,
                    values: le_values(&bytes, i64::from_le_bytes),
                },
                DType::I32 => StoredTensor::I64 {
                    shape,
                    values: le_values(&bytes, i32::from_le_bytes)
                        .into_iter()
                        .map(i64::from)
                        .collect(),
                },
                other => {
                    return Err(CheckpointError::DtypeMismatch {
                        origin,
                        name,
                        expected: "float32, float64, int64 or int32",
                        got: format!("{other:?}"),
                    })
                }
            };
            dict.tensors.insert(name, stored);
        }
        dict.count_batches_of_legacy_checkpoint();
        Ok(dict)
    }

    /// Gives every BatchNorm a batch counter of 0 when the file holds no counter at all: checkpoints
    /// written before PyTorch 0.4.1 (torchvision's published DenseNet weights among them) have none, and
    /// PyTorch loads them with every counter at 0. A file with some counters is left as it is, so that a
    /// missing one is still reported.
    fn count_batches_of_legacy_checkpoint(&mut self) {
        if !self
            .tensors
            .keys()
            .any(|k| k.ends_with(BATCH_COUNTER_SUFFIX))
        {
            self.add_missing_batch_counters();
        }
    }

    /// Copies the stored tensors into `tensors`, after checking that the keys are exactly the model's
    /// (batch counters of the model's BatchNorm layers are accepted and ignored: a [`NamedTensors`] set has
    /// none) and that every shape and type matches. Nothing is written when a check fails.
    pub fn copy_into_tensors<B: Backend, M: NamedTensors<B> + ?Sized>(
        &self,
        backend: &B,
        tensors: &mut M,
    ) -> Result<(), CheckpointError> {
        let mut counters = BTreeSet::new();
        tensors.visit_tensors(&mut |name, role, _| {
            if role == TensorRole::BatchNormStatistic {
                if let Some(prefix) = name.strip_suffix("running_mean") {
                    counters.insert(format!("{prefix}{BATCH_COUNTER_SUFFIX}"));
                }
            }
        });
        self.check_tensors(tensors, &counters, false)?;
        self.write_tensors(backend, tensors)
    }

    /// Copies the stored tensors and BatchNorm batch counters into `module`, after checking that the keys
    /// are exactly the module's and that every shape and type matches. Nothing is written when a check fails.
    pub fn copy_into_module<B: Backend, M: Module<B> + ?Sized>(
        &self,
        backend: &B,
        module: &mut M,
    ) -> Result<(), CheckpointError> {
        let mut counters = BTreeSet::new();
        module.visit_batch_counters(&mut |name, _| {
            counters.insert(name.to_string());
        });
        self.check_tensors(module, &counters, true)?;
        let mut counts = Vec::new();
        for name in &counters {
            match self.tensors.get(name) {
                Some(StoredTensor::I64 { shape, values })
                    if shape.is_empty() && values.len() == 1 =>
                {
                    let count =
                        u64::try_from(values[0]).map_err(|_| CheckpointError::InvalidCounter {
                            origin: self.origin.clone(),
                            name: name.clone(),
                            value: values[0],
                        })?;
                    counts.push((name.as_str(), count));
                }
                Some(StoredTensor::I64 { shape, .. }) => {
                    return Err(CheckpointError::ShapeMismatch {
                        origin: self.origin.clone(),
                        name: name.clone(),
                        expected: vec![],
                        got: shape.clone(),
                    })
                }
                Some(other) => {
                    return Err(CheckpointError::DtypeMismatch {
                        origin: self.origin.clone(),
                        name: name.clone(),
                        expected: "I64",
                        got: other.dtype_name().into(),
                    })
                }
                // `check_tensors` already reported missing counters.
                None => {}
            }
        }
        self.write_tensors(backend, module)?;
        let counts: BTreeMap<&str, u64> = counts.into_iter().collect();
        module.visit_batch_counters_mut(&mut |name, count| {
            if let Some(&stored) = counts.get(name) {
                *count = stored;
            }
        });
        Ok(())
    }

    /// Checks keys, shapes and types of the model's tensors. `counters` are the batch counter keys the
    /// model accepts; with `counters_required` they are also expected in the file.
    fn check_tensors<B: Backend, M: NamedTensors<B> + ?Sized>(
        &self,
        tensors: &M,
        counters: &BTreeSet<String>,
        counters_required: bool,
    ) -> Result<(), CheckpointError> {
        let mut expected = BTreeSet::new();
        let mut missing = Vec::new();
        let mut first_error = None;
        tensors.visit_tensors(&mut |name, _, t| {
            expected.insert(name.to_string());
            match self.tensors.get(name) {
                None => missing.push(name.to_string()),
                Some(StoredTensor::F32 { shape, .. }) => {
                    if shape.as_slice() != t.dims() && first_error.is_none() {
                        first_error = Some(CheckpointError::ShapeMismatch {
                            origin: self.origin.clone(),
                            name: name.to_string(),
                            expected: t.dims().to_vec(),
                            got: shape.clone(),
                        });
                    }
                }
                Some(other) => {
                    if first_error.is_none() {
                        first_error = Some(CheckpointError::DtypeMismatch {
                            origin: self.origin.clone(),
                            name: name.to_string(),
                            expected: "F32",
                            got: other.dtype_name().into(),
                        });
                    }
                }
            }
        });
        if counters_required {
            missing.extend(
                counters
                    .iter()
                    .filter(|c| !self.tensors.contains_key(c.as_str()))
                    .cloned(),
            );
        }
        let unexpected: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !expected.contains(k.as_str()) && !counters.contains(k.as_str()))
            .cloned()
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(CheckpointError::KeyMismatch {
                origin: self.origin.clone(),
                missing,
                unexpected,
            });
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Uploads every stored `F32` tensor into the model's tensor of the same name (checked beforehand).
    fn write_tensors<B: Backend, M: NamedTensors<B> + ?Sized>(
        &self,
        backend: &B,
        tensors: &mut M,
    ) -> Result<(), CheckpointError> {
        let mut failure = None;
        tensors.visit_tensors_mut(&mut |name, _, t| {
            if failure.is_some() {
                return;
            }
            if let Some(StoredTensor::F32 { shape, values }) = self.tensors.get(name) {
                let result = backend
                    .from_host(values, shape)
                    .and_then(|src| backend.copy_(t, &src));
                if let Err(source) = result {
                    failure = Some(CheckpointError::Backend {
                        name: name.to_string(),
                        source,
                    });
                }
            }
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Writes `bytes` to `path` so that readers see either the old file or the whole new one: a temporary
/// file in the same directory (so the rename stays on one file system), flushed to disk, then renamed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io {
            action,
            path,
            source,
        }
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".checkpoint-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io("creating a temporary file in", dir))?;
    temp.write_all(bytes)
        .map_err(io("writing a temporary file for", path))?;
    temp.as_file()
        .sync_all()
        .map_err(io("flushing a temporary file for", path))?;
    temp.persist(path)
        .map_err(|e| io("renaming a temporary file to", path)(e.error))?;
    // The rename itself is durable only once the directory is flushed (on systems that allow opening one).
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Saves a module's tensors and BatchNorm batch counters to `path` (atomically), in PyTorch's format for a
/// `.pth` or `.pt` path and as safetensors otherwise ([`StateDict::save`]).
pub fn save_module<B: Backend, M: Module<B> + ?Sized>(
    backend: &B,
    module: &M,
    path: &Path,
) -> Result<(), CheckpointError> {
    StateDict::from_module(backend, module)?.save(path)
}

/// Loads a checkpoint into a module: tensors and BatchNorm batch counters, with key, shape and type checks.
pub fn load_module<B: Backend, M: Module<B> + ?Sized>(
    backend: &B,
    module: &mut M,
    path: &Path,
) -> Result<(), CheckpointError> {
    StateDict::load(path)?.copy_into_module(backend, module)
}

/// Saves any set of named tensors (an averaged model, for instance) to `path` (atomically). A zero batch
/// counter is written for every BatchNorm layer, as PyTorch's strict loading expects one (see
/// [`StateDict::add_missing_batch_counters`]).
pub fn save_tensors<B: Backend, M: NamedTensors<B> + ?Sized>(
    backend: &B,
    tensors: &M,
    path: &Path,
) -> Result<(), CheckpointError> {
    let mut dict = StateDict::from_tensors(backend, tensors)?;
    dict.add_missing_batch_counters();
    dict.save(path)
}

/// Loads a checkpoint into any set of named tensors, with key, shape and type checks (batch counters in the
/// file are accepted and ignored).
pub fn load_tensors<B: Backend, M: NamedTensors<B> + ?Sized>(
    backend: &B,
    tensors: &mut M,
    path: &Path,
) -> Result<(), CheckpointError> {
    StateDict::load(path)?.copy_into_tensors(backend, tensors)
}

/// The current name of a tensor of torchvision's published DenseNet weights, which name the children of
/// a dense layer `norm.1`, `conv.1`, `norm.2`, `conv.2` where torchvision's modules now say `norm1`,
/// `conv1`, …: `…denselayer<i>.norm.1.weight` becomes `…denselayer<i>.norm1.weight`, the renaming
/// torchvision's own loader applies. `None` for every other name.
fn current_densenet_name(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let [.., layer, child, index, tensor] = parts.as_slice() else {
        return None;
    };
    let is_dense_layer = layer
        .strip_prefix("denselayer")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let legacy = is_dense_layer
        && matches!(*child, "norm" | "relu" | "conv")
        && matches!(*index, "1" | "2")
        && matches!(*tensor, "weight" | "bias" | "running_mean" | "running_var");
    legacy.then(|| {
        let prefix = parts[..parts.len() - 3].join(".");
        format!("{prefix}.{child}{index}.{tensor}")
    })
}
