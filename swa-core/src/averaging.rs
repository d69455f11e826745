//! Weight averages over named tensors: the SWA running mean, EMA or a custom rule, and the count-weighted
//! merge of two equal-weight averages.
//!
//! An average ([`WeightAverage`], PyTorch's `AveragedModel`) is created from a model (its first snapshot),
//! lives on the model's backend, and is updated from later snapshots of the same model. A [`WeightRule`]
//! gives each new snapshot its weight, where `n` (PyTorch's `n_averaged`, [`WeightAveraging::count`]) is the
//! number of snapshots already averaged:
//!
//! - [`WeightRule::Equal`], SWA and PyTorch's default `avg_fn`: the running mean `avg += (w − avg)/(n + 1)`.
//!   [`WeightAverage::merge`] combines the averages of two disjoint sets of snapshots, weighting each by its
//!   count, for SWA averaged in several processes;
//! - [`WeightRule::Ema`]: the exponential moving average `avg = decay·avg + (1 − decay)·w`;
//! - [`WeightRule::Custom`]: any weight computed from `n` by a function.
//!
//! Every rule copies the first snapshot and reduces each update to [`Backend::lerp_`], so averages run on
//! any backend without reading values back.
//!
//! # Buffers
//!
//! Tensors that are not trained parameters ([`TensorRole::BatchNormStatistic`]) are treated by the
//! [`BufferPolicy`] the caller chooses when creating the average, never silently:
//!
//! | [`BufferPolicy`] | BN statistics in the average | PyTorch equivalent |
//! |---|---|---|
//! | [`Average`](BufferPolicy::Average) | averaged like parameters | `AveragedModel(use_buffers=True)` |
//! | [`CopyLatest`](BufferPolicy::CopyLatest) | copied from the latest snapshot | `AveragedModel(use_buffers=False)`, which copies the model's buffers on every `update_parameters` |
//! | [`RecomputeLater`](BufferPolicy::RecomputeLater) | not held; [`WeightAveraging::copy_into`] leaves the model's untouched | the original SWA code, which averages `parameters()` only and recomputes BN with `bn_update` |
//!
//! With `CopyLatest` and `RecomputeLater` the averaged weights need their BN statistics recomputed on
//! training data (PyTorch's `update_bn`) before evaluation.
//!
//! # Checkpoints
//!
//! [`WeightAveraging::to_state`] reads an average back to the host as an [`AverageState`] (names, shapes,
//! values, the count `n_averaged`, the rule, the buffer policy) that `serde` can write, and
//! [`WeightAverage::from_state`] restores it, so a resumed run keeps averaging with the right weights.
//!
//! # Example
//!
//! SWA over a toy network with one weight, one bias and a BatchNorm running mean, on the CPU:
//!
//! ```
//! # // The example needs the CPU backend, the default feature `cpu`.
//! # #[cfg(feature = "cpu")]
//! # mod example {
//! use swa_core::averaging::{BufferPolicy, WeightAverage, WeightAveraging};
//! use swa_core::{Backend, CpuBackend, CpuTensor, NamedTensors, TensorRole};
//!
//! struct Toy {
//!     weight: CpuTensor,
//!     bias: CpuTensor,
//!     running_mean: CpuTensor,
//! }
//!
//! impl NamedTensors<CpuBackend> for Toy {
//!     fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &CpuTensor)) {
//!         f("fc.weight", TensorRole::Parameter, &self.weight);
//!         f("fc.bias", TensorRole::Parameter, &self.bias);
//!         f("bn.running_mean", TensorRole::BatchNormStatistic, &self.running_mean);
//!     }
//!     fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut CpuTensor)) {
//!         f("fc.weight", TensorRole::Parameter, &mut self.weight);
//!         f("fc.bias", TensorRole::Parameter, &mut self.bias);
//!         f("bn.running_mean", TensorRole::BatchNormStatistic, &mut self.running_mean);
//!     }
//! }
//!
//! # pub fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = CpuBackend::with_threads(1);
//! let snapshot = |w: f32| -> Result<Toy, swa_core::BackendError> {
//!     Ok(Toy {
//!         weight: backend.from_host(&[w, 2.0 * w, 3.0 * w, 4.0 * w], &[2, 2])?,
//!         bias: backend.from_host(&[w, -w], &[2])?,
//!         running_mean: backend.from_host(&[10.0 * w], &[1])?,
//!     })
//! };
//!
//! // Three snapshots with w = 1, 2, 6: their mean has w = 3.
//! let mut swa = WeightAverage::swa(&backend, &snapshot(1.0)?, BufferPolicy::CopyLatest)?;
//! swa.update(&backend, &snapshot(2.0)?)?;
//! swa.update(&backend, &snapshot(6.0)?)?;
//! assert_eq!(swa.count(), 3); // PyTorch's n_averaged
//!
//! // Write the average into a model, as evaluating PyTorch's AveragedModel does.
//! let mut model = snapshot(0.0)?;
//! swa.copy_into(&backend, &mut model)?;
//! assert_eq!(backend.to_host(&model.weight)?, vec![3.0, 6.0, 9.0, 12.0]);
//! assert_eq!(backend.to_host(&model.running_mean)?, vec![60.0]); // CopyLatest: the last snapshot's
//!
//! // The count survives a checkpoint.
//! let state = swa.to_state(&backend)?;
//! let restored = WeightAverage::from_state(&backend, &state)?;
//! assert_eq!(restored.count(), 3);
//! # Ok(())
//! # }
//! # }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # #[cfg(feature = "cpu")]
//! # example::run()?;
//! # Ok(())
//! # }
//! ```

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError};
use crate::params::{LayoutError, NamedTensors, RoleFilter, TensorLayout, TensorRole};

/// How an average treats tensors that are not trained parameters ([`TensorRole::BatchNormStatistic`]).
#[doc(alias = "use_buffers")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferPolicy {
    /// Averaged with the same weights as parameters (PyTorch's `use_buffers=True`).
    Average,
    /// Copied from the latest snapshot (PyTorch's `use_buffers=False`, which syncs buffers on every update).
    CopyLatest,
    /// Not held by the average: [`WeightAveraging::copy_into`] leaves the model's statistics untouched and
    /// the caller recomputes them on training data (the original SWA code's `bn_update`).
    RecomputeLater,
}

/// The weight an average gives each new snapshot: with `n` snapshots already averaged, the `(n + 1)`-th is
/// blended in as `avg += weight·(w − avg)`. The first snapshot is always copied.
///
/// The rule is part of a run's configuration and of a checkpoint, and `serde` writes it as
/// `{"kind": "equal"}` or `{"kind": "ema", "decay": 0.999}`. A [`Custom`](Self::Custom) rule is a
/// function, which no file can hold: writing one fails with an error naming it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WeightRule {
    /// Equal weights, the running mean of SWA: weight `1/(n + 1)` (PyTorch's default `avg_fn`).
    #[default]
    Equal,
    /// The exponential moving average `avg = decay·avg + (1 − decay)·w`: weight `1 − decay`.
    #[doc(alias = "EMA")]
    Ema {
        /// The weight kept from the previous average, in `[0, 1]`. Decay 0 keeps the latest snapshot and
        /// decay 1 the first, both bit-exactly.
        decay: f32,
    },
    /// A weight computed from the count by a user-supplied function (PyTorch's custom `avg_fn`).
    #[serde(skip_deserializing, serialize_with = "refuse_to_write_custom_rule")]
    Custom(CustomRule),
}

impl WeightRule {
    /// Checks the rule's parameters: an EMA decay must lie in `[0, 1]`.
    pub fn validate(&self) -> Result<(), AveragingError> {
        match *self {
            WeightRule::Ema { decay } if !(0.0..=1.0).contains(&decay) => {
                Err(AveragingError::InvalidDecay { decay })
            }
            _ => Ok(()),
        }
    }

    /// The weight of the next snapshot when `averaged` snapshots are already in the average. Fails when a
    /// custom rule's weight is not in `[0, 1]`, or when the count overflows.
    pub fn weight(&self, averaged: u64) -> Result<f32, AveragingError> {
        match *self {
            WeightRule::Equal => {
                let next = averaged
                    .checked_add(1)
                    .ok_or(AveragingError::CountOverflow { op: "update" })?;
                // 1/(n + 1) rounded once from f64.
                Ok((1.0 / next as f64) as f32)
            }
            WeightRule::Ema { decay } => Ok((1.0 - f64::from(decay)) as f32),
            WeightRule::Custom(custom) => {
                let weight = (custom.weight)(averaged);
                if (0.0..=1.0).contains(&weight) {
                    Ok(weight)
                } else {
                    Err(AveragingError::InvalidWeight {
                        rule: custom.name,
                        averaged,
                        weight,
                    })
                }
            }
        }
    }
}

/// A named weight rule given by a function: `weight(n)` is the weight of the next snapshot when `n ≥ 1`
/// snapshots are already averaged, and must lie in `[0, 1]`.
///
/// Two custom rules are equal when both their names and their functions are.
///
/// ```
/// use swa_core::averaging::{CustomRule, WeightRule};
///
/// // A running mean that weighs later snapshots more: weight 2/(n + 2).
/// let rule = WeightRule::Custom(CustomRule::new("linear_ramp", |n| 2.0 / (n as f32 + 2.0)));
/// assert_eq!(rule.weight(2).unwrap(), 0.5);
/// ```
#[derive(Clone, Copy)]
pub struct CustomRule {
    /// Names the rule in errors and in `Debug` output.
    pub name: &'static str,
    /// The weight of the next snapshot given the number already averaged.
    pub weight: fn(u64) -> f32,
}

impl CustomRule {
    /// A rule named `name` with weights from `weight`.
    pub fn new(name: &'static str, weight: fn(u64) -> f32) -> Self {
        Self { name, weight }
    }
}

impl PartialEq for CustomRule {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && std::ptr::fn_addr_eq(self.weight, other.weight)
    }
}

impl std::fmt::Debug for CustomRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CustomRule").field(&self.name).finish()
    }
}

fn refuse_to_write_custom_rule<S: serde::Serializer>(
    rule: &CustomRule,
    _: S,
) -> Result<S::Ok, S::Error> {
    Err(serde::ser::Error::custom(format!(
        "the custom weight rule `{}` is a function and cannot be written to a file; \
         configurations and checkpoints hold only the `equal` and `ema` rules",
        rule.name
    )))
}

/// Errors of averaging. Layout errors name the operation, the tensor or its position, and what was
/// expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AveragingError {
    /// A model or average whose tensors are not the average's: other names, roles or shapes, another
    /// order or another number of tensors (all of them, BN statistics included), or, on creation, a name
    /// visited twice.
    #[error("{op}: {source}")]
    Layout {
        /// The operation (`new`, `update`, `copy_into`, `merge`).
        op: &'static str,
        /// What differs, with the average's value and the one given.
        #[source]
        source: LayoutError,
    },
    /// An EMA decay outside `[0, 1]`.
    #[error("EMA decay {decay} is outside [0, 1]")]
    InvalidDecay {
        /// The decay given.
        decay: f32,
    },
    /// Two averages that cannot be merged.
    #[error("{op}: {message}")]
    Incompatible {
        /// The operation.
        op: &'static str,
        /// What differs.
        message: String,
    },
    /// A saved state that is inconsistent (count 0, values that do not fill a shape, …).
    #[error("from_state: tensor `{name}`: {message}")]
    InvalidState {
        /// The tensor concerned, or `n_averaged` for the count.
        name: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// A merge of averages that do not both follow [`WeightRule::Equal`].
    #[error("merge: only equal-weight averages merge by count, not one following {rule:?}")]
    MergeNeedsEqualWeights {
        /// The rule that is not [`WeightRule::Equal`].
        rule: WeightRule,
    },
    /// A custom rule that gave a weight outside `[0, 1]`.
    #[error("custom weight rule `{rule}` gave weight {weight} after {averaged} snapshots, expected a value in [0, 1]")]
    InvalidWeight {
        /// The rule's name.
        rule: &'static str,
        /// The number of snapshots already averaged.
        averaged: u64,
        /// The weight it gave.
        weight: f32,
    },
    /// More snapshots than a `u64` counts.
    #[error("{op}: the snapshot count overflows u64")]
    CountOverflow {
        /// The operation.
        op: &'static str,
    },
    /// A backend operation failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// One named tensor of a saved average, on the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorState {
    /// The tensor's name (a PyTorch `state_dict` key).
    pub name: String,
    /// Whether it is a parameter or a BN statistic.
    pub role: TensorRole,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Its values, row-major; `None` for BN statistics under [`BufferPolicy::RecomputeLater`].
    pub values: Option<Vec<f32>>,
}

/// An average read back to the host, for checkpoints: everything needed to continue averaging.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AverageState {
    /// The rule giving each new snapshot its weight.
    pub rule: WeightRule,
    /// How BN statistics are treated.
    pub buffer_policy: BufferPolicy,
    /// The number of snapshots averaged (PyTorch's `n_averaged`).
    pub n_averaged: u64,
    /// The tensors, in the model's visiting order.
    pub tensors: Vec<TensorState>,
}

/// A weight average over named tensors on a backend.
///
/// The models passed to [`update`](Self::update) and [`copy_into`](Self::copy_into) must visit the same
/// names, roles and shapes in the same order as the model the average was created from; otherwise they
/// fail with a typed error and change nothing.
#[doc(alias = "AveragedModel")]
pub trait WeightAveraging<B: Backend> {
    /// Averages one more snapshot of the model in (PyTorch's `update_parameters`).
    #[doc(alias = "update_parameters")]
    fn update(&mut self, backend: &B, model: &dyn NamedTensors<B>) -> Result<(), AveragingError>;

    /// The number of snapshots averaged so far, including the first (PyTorch's `n_averaged`).
    #[doc(alias = "n_averaged")]
    fn count(&self) -> u64;

    /// Writes the averaged tensors into a model: parameters always, BN statistics unless the buffer policy
    /// is [`BufferPolicy::RecomputeLater`].
    fn copy_into(&self, backend: &B, model: &mut dyn NamedTensors<B>)
        -> Result<(), AveragingError>;

    /// The rule giving each new snapshot its weight.
    fn rule(&self) -> WeightRule;

    /// How BN statistics are treated.
    fn buffer_policy(&self) -> BufferPolicy;

    /// The names of the tensors, in visiting order.
    fn names(&self) -> Vec<&str>;

    /// The averaged tensor of a name, if the average holds it (BN statistics under
    /// [`BufferPolicy::RecomputeLater`] are not held).
    fn tensor(&self, name: &str) -> Option<&B::Tensor>;

    /// Reads the average back to the host for a checkpoint.
    fn to_state(&self, backend: &B) -> Result<AverageState, AveragingError>;
}

/// The tensors of an average and how they are treated; the averaging rules live in the public types.
#[derive(Debug)]
struct Slots<B: Backend> {
    /// The names, roles and shapes of all the model's tensors, BN statistics included.
    layout: TensorLayout,
    /// One per entry of `layout`; `None` for BN statistics under [`BufferPolicy::RecomputeLater`].
    tensors: Vec<Option<B::Tensor>>,
    buffer_policy: BufferPolicy,
}

fn holds(role: TensorRole, policy: BufferPolicy) -> bool {
    role == TensorRole::Parameter || policy != BufferPolicy::RecomputeLater
}

/// Attributes a layout error to the operation that met it.
fn layout_error(op: &'static str) -> impl Fn(LayoutError) -> AveragingError {
    move |source| AveragingError::Layout { op, source }
}

impl<B: Backend> Slots<B> {
    /// Deep copies of the model's tensors: the first snapshot. The layout is read first, so that a
    /// repeated name fails before anything is copied.
    fn capture(
        backend: &B,
        model: &dyn NamedTensors<B>,
        buffer_policy: BufferPolicy,
    ) -> Result<Self, AveragingError> {
        let layout = TensorLayout::of_model(model, RoleFilter::All).map_err(layout_error("new"))?;
        let mut tensors = Vec::with_capacity(layout.len());
        // Nothing to pair the tensors with: the copies are what is built.
        layout.zip_visit(model, std::iter::repeat(()), |entry, (), tensor| {
            let copy = if holds(entry.role, buffer_policy) {
                Some(backend.duplicate(tensor)?)
            } else {
                None
            };
            tensors.push(copy);
            Ok::<_, AveragingError>(())
        })?;
        Ok(Slots {
            layout,
            tensors,
            buffer_policy,
        })
    }

    /// Checks that a model visits the same names, roles and shapes as the average, before anything is
    /// written, so that a mismatch leaves both unchanged.
    fn check_model(
        &self,
        op: &'static str,
        model: &dyn NamedTensors<B>,
    ) -> Result<(), AveragingError> {
        self.layout.check_model(model).map_err(layout_error(op))
    }

    fn check_same_layout(&self, op: &'static str, other: &Slots<B>) -> Result<(), AveragingError> {
        if self.buffer_policy != other.buffer_policy {
            return Err(AveragingError::Incompatible {
                op,
                message: format!(
                    "buffer policies differ: {:?} and {:?}",
                    self.buffer_policy, other.buffer_policy
                ),
            });
        }
        self.layout
            .check_same(&other.layout)
            .map_err(layout_error(op))
    }

    /// `avg += weight · (snapshot − avg)` for parameters (and BN statistics under `Average`); BN statistics
    /// under `CopyLatest` are copied. `weight = 1` copies and `weight = 0` keeps, bit-exactly.
    fn blend(
        &mut self,
        backend: &B,
        model: &dyn NamedTensors<B>,
        weight: f32,
    ) -> Result<(), AveragingError> {
        let buffer_policy = self.buffer_policy;
        self.layout
            .zip_visit(model, &mut self.tensors, |entry, held, snapshot| {
                let Some(avg) = held.as_mut() else {
                    return Ok(());
                };
                match (entry.role, buffer_policy) {
                    (TensorRole::BatchNormStatistic, BufferPolicy::CopyLatest) => {
                        backend.copy_(avg, snapshot)
                    }
                    _ if weight == 1.0 => backend.copy_(avg, snapshot),
                    _ if weight == 0.0 => Ok(()),
                    _ => backend.lerp_(avg, snapshot, weight),
                }
            })?;
        Ok(())
    }

    fn write_into(
        &self,
        backend: &B,
        model: &mut dyn NamedTensors<B>,
    ) -> Result<(), AveragingError> {
        self.check_model("copy_into", model)?;
        self.layout
            .zip_visit_mut(model, &self.tensors, |_, held, dst| match held {
                Some(src) => backend.copy_(dst, src),
                None => Ok(()),
            })?;
        Ok(())
    }

    /// `self += weight · (other − self)` for every held tensor; BN statistics under `CopyLatest` keep
    /// `self`'s.
    fn merge_from(
        &mut self,
        backend: &B,
        other: &Slots<B>,
        weight: f32,
    ) -> Result<(), AveragingError> {
        self.check_same_layout("merge", other)?;
        let buffer_policy = self.buffer_policy;
        let mut dsts = Vec::new();
        let mut srcs = Vec::new();
        let pairs = self.layout.entries().iter().zip(&mut self.tensors);
        for ((entry, mine), theirs) in pairs.zip(&other.tensors) {
            if entry.role == TensorRole::BatchNormStatistic
                && buffer_policy == BufferPolicy::CopyLatest
            {
                continue;
            }
            if let (Some(dst), Some(src)) = (mine.as_mut(), theirs.as_ref()) {
                dsts.push(dst);
                srcs.push(src);
            }
        }
        backend.lerp_many_(&mut dsts, &srcs, weight)?;
        Ok(())
    }

    fn names(&self) -> Vec<&str> {
        self.layout.names()
    }

    fn tensor(&self, name: &str) -> Option<&B::Tensor> {
        let position = self.layout.position(name)?;
        self.tensors.get(position)?.as_ref()
    }

    fn to_state(
        &self,
        backend: &B,
        rule: WeightRule,
        n_averaged: u64,
    ) -> Result<AverageState, AveragingError> {
        let mut tensors = Vec::with_capacity(self.tensors.len());
        for (entry, held) in self.layout.entries().iter().zip(&self.tensors) {
            let values = match held {
                Some(t) => Some(backend.to_host(t)?),
                None => None,
            };
            tensors.push(TensorState {
                name: entry.name.clone(),
                role: entry.role,
                shape: entry.shape.clone(),
                values,
            });
        }
        Ok(AverageState {
            rule,
            buffer_policy: self.buffer_policy,
            n_averaged,
            tensors,
        })
    }

    fn from_state(backend: &B, state: &AverageState) -> Result<Self, AveragingError> {
        if state.n_averaged == 0 {
            return Err(AveragingError::InvalidState {
                name: "n_averaged".to_owned(),
                message: "the count is 0, but an average holds at least its first snapshot"
                    .to_owned(),
            });
        }
        let mut layout = TensorLayout::new(RoleFilter::All);
        let mut tensors = Vec::with_capacity(state.tensors.len());
        for t in &state.tensors {
            let invalid = |message: String| AveragingError::InvalidState {
                name: t.name.clone(),
                message,
            };
            // A layout of all roles refuses only a repeated name.
            if layout.push(&t.name, t.role, &t.shape).is_err() {
                return Err(invalid("the name appears more than once".to_owned()));
            }
            let expected_held = holds(t.role, state.buffer_policy);
            let tensor = match (&t.values, expected_held) {
                (Some(values), true) => {
                    let numel = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                    if numel != Some(values.len()) {
                        return Err(invalid(format!(
                            "{} values do not fill shape {:?}",
                            values.len(),
                            t.shape
                        )));
                    }
                    Some(backend.from_host(values, &t.shape)?)
                }
                (None, false) => None,
                (Some(_), false) => {
                    return Err(invalid(format!(
                        "holds values, but a {:?} under {:?} is not held",
                        t.role, state.buffer_policy
                    )))
                }
                (None, true) => {
                    return Err(invalid(format!(
                        "has no values, but a {:?} under {:?} must be held",
                        t.role, state.buffer_policy
                    )))
                }
            };
            tensors.push(tensor);
        }
        Ok(Slots {
            layout,
            tensors,
            buffer_policy: state.buffer_policy,
        })
    }
}

/// A weight average of a model's snapshots: PyTorch's `AveragedModel`, with the weight of each new snapshot
/// given by a [`WeightRule`].
///
/// The first snapshot is copied (count 1); the `(n + 1)`-th is blended in as `avg += weight·(w − avg)` with
/// the rule's weight for `n` snapshots already averaged. Under [`WeightRule::Equal`] each averaged tensor is
/// the arithmetic mean of the snapshots, computed in the tensors' `f32`; its rounding error grows at most
/// linearly in `n` (about `n/2 · ε · max|w|`, ε = 2⁻²⁴) and in practice like `√n`.
#[doc(alias = "AveragedModel")]
#[doc(alias = "SwaAverage")]
#[doc(alias = "EmaAverage")]
#[doc(alias = "swa_n")]
#[derive(Debug)]
pub struct WeightAverage<B: Backend> {
    slots: Slots<B>,
    rule: WeightRule,
    count: u64,
}

impl<B: Backend> WeightAverage<B> {
    /// An average following `rule` whose first snapshot is `model` (count 1), with BN statistics treated
    /// by `buffer_policy`. Fails with [`AveragingError::InvalidDecay`] for an EMA decay outside `[0, 1]`.
    pub fn new(
        backend: &B,
        model: &dyn NamedTensors<B>,
        rule: WeightRule,
        buffer_policy: BufferPolicy,
    ) -> Result<Self, AveragingError> {
        rule.validate()?;
        Ok(WeightAverage {
            slots: Slots::capture(backend, model, buffer_policy)?,
            rule,
            count: 1,
        })
    }

    /// The SWA running mean ([`WeightRule::Equal`]) whose first snapshot is `model`: PyTorch's
    /// `AveragedModel` with its default averaging function.
    pub fn swa(
        backend: &B,
        model: &dyn NamedTensors<B>,
        buffer_policy: BufferPolicy,
    ) -> Result<Self, AveragingError> {
        Self::new(backend, model, WeightRule::Equal, buffer_policy)
    }

    /// The exponential moving average ([`WeightRule::Ema`]) with `decay ∈ [0, 1]` whose first snapshot is
    /// `model`.
    #[doc(alias = "get_ema_multi_avg_fn")]
    pub fn ema(
        backend: &B,
        model: &dyn NamedTensors<B>,
        decay: f32,
        buffer_policy: BufferPolicy,
    ) -> Result<Self, AveragingError> {
        Self::new(backend, model, WeightRule::Ema { decay }, buffer_policy)
    }

    /// Merges the average of a disjoint set of snapshots into this one: `self += n_b/(n_a + n_b)·(other −
    /// self)`, `n_a` and `n_b` the two counts, so the result is the mean of all `n_a + n_b` snapshots and the
    /// count becomes `n_a + n_b`. BN statistics under `CopyLatest` keep this average's.
    ///
    /// Only equal-weight averages merge by count: for EMA or a custom rule the weight of each snapshot
    /// depends on its position in one sequence, which two separate averages do not share, so both must
    /// follow [`WeightRule::Equal`] ([`AveragingError::MergeNeedsEqualWeights`] otherwise). Both must also
    /// hold the same names, roles and shapes and use the same buffer policy.
    pub fn merge(&mut self, backend: &B, other: &WeightAverage<B>) -> Result<(), AveragingError> {
        for rule in [self.rule, other.rule] {
            if rule != WeightRule::Equal {
                return Err(AveragingError::MergeNeedsEqualWeights { rule });
            }
        }
        let total = self
            .count
            .checked_add(other.count)
            .ok_or(AveragingError::CountOverflow { op: "merge" })?;
        let weight = (other.count as f64 / total as f64) as f32;
        self.slots.merge_from(backend, &other.slots, weight)?;
        self.count = total;
        Ok(())
    }

    /// Restores an average saved with [`WeightAveraging::to_state`], following the rule recorded in it.
    pub fn from_state(backend: &B, state: &AverageState) -> Result<Self, AveragingError> {
        state.rule.validate()?;
        Ok(WeightAverage {
            slots: Slots::from_state(backend, state)?,
            rule: state.rule,
            count: state.n_averaged,
        })
    }
}

impl<B: Backend> WeightAveraging<B> for WeightAverage<B> {
    fn update(&mut self, backend: &B, model: &dyn NamedTensors<B>) -> Result<(), AveragingError> {
        self.slots.check_model("update", model)?;
        let next = self
            .count
            .checked_add(1)
            .ok_or(AveragingError::CountOverflow { op: "update" })?;
        let weight = self.rule.weight(self.count)?;
        self.slots.blend(backend, model, weight)?;
        self.count = next;
        Ok(())
    }

    fn count(&self) -> u64 {
        self.count
    }

    fn copy_into(
        &self,
        backend: &B,
        model: &mut dyn NamedTensors<B>,
    ) -> Result<(), AveragingError> {
        self.slots.write_into(backend, model)
    }

    fn rule(&self) -> WeightRule {
        self.rule
    }

    fn buffer_policy(&self) -> BufferPolicy {
        self.slots.buffer_policy
    }

    fn names(&self) -> Vec<&str> {
        self.slots.names()
    }

    fn tensor(&self, name: &str) -> Option<&B::Tensor> {
        self.slots.tensor(name)
    }

    fn to_state(&self, backend: &B) -> Result<AverageState, AveragingError> {
        self.slots.to_state(backend, self.rule, self.count)
    }
}
