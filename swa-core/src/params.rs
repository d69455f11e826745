//! Named tensors: how a network exposes its parameters and buffers to averaging, optimisers and checkpoints,
//! without any of them knowing the network's shape.
//!
//! Names are PyTorch `state_dict` keys (`layer1.0.conv1.weight`, `bn.running_mean`), so that checkpoints and
//! averages line up with the original SWA code's. A [`TensorLayout`] records which names, roles and shapes a
//! model visits, and checks that another model (or layout) visits the same.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, HasShape};

/// What a named tensor is, which decides how averaging treats it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TensorRole {
    /// A trained parameter (weights, biases, BN scale and shift): averaged.
    Parameter,
    /// A BatchNorm running mean or variance: not trained; its treatment is the averager's
    /// [`BufferPolicy`](crate::averaging::BufferPolicy).
    BatchNormStatistic,
}

/// A set of named tensors that can be visited in a fixed order.
///
/// The order must be the same on every call and for every instance of the same network, so that two
/// visits can be zipped.
pub trait NamedTensors<B: Backend> {
    /// Visits every tensor with its name and role.
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor));
    /// Visits every tensor mutably with its name and role.
    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor));
}

/// Which tensors of a model a [`TensorLayout`] covers; the others are skipped when it is built and when
/// models are checked against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RoleFilter {
    /// Every tensor, whatever its role (weight averages, which hold BatchNorm statistics too).
    All,
    /// Only the tensors of one role (SWAG, whose posterior is over [`TensorRole::Parameter`] alone).
    Only(TensorRole),
}

impl RoleFilter {
    /// Whether a tensor of `role` is covered.
    pub fn admits(self, role: TensorRole) -> bool {
        match self {
            RoleFilter::All => true,
            RoleFilter::Only(only) => only == role,
        }
    }
}

/// The tensor a [`LayoutError`] counts in: `tensor`, or `Parameter tensor` for a layout of parameters
/// only, so that a position or a count is not read against all of a model's tensors.
fn kind(roles: &RoleFilter) -> String {
    match roles {
        RoleFilter::All => "tensor".to_owned(),
        RoleFilter::Only(role) => format!("{role:?} tensor"),
    }
}

/// Why a model, or another layout, does not fit a [`TensorLayout`]. Every message names the tensor (or
/// its position) and gives the layout's value and the one found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Two tensors with the same name, which would make lookups by name and checkpoints ambiguous.
    #[error("tensor name `{name}` appears more than once")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// A tensor whose name differs from the layout's at the same position.
    #[error("{} #{index} is named `{got}`, expected `{expected}`", kind(.roles))]
    NameMismatch {
        /// The tensors counted: the position is among these only.
        roles: RoleFilter,
        /// The position in visiting order, among the tensors the layout covers.
        index: usize,
        /// The layout's name.
        expected: String,
        /// The name found.
        got: String,
    },
    /// A tensor whose role differs from the layout's, or (on [`TensorLayout::push`]) a role the layout
    /// does not cover.
    #[error("tensor `{name}` has role {got:?}, expected {expected:?}")]
    RoleMismatch {
        /// The tensor's name.
        name: String,
        /// The layout's role.
        expected: TensorRole,
        /// The role found.
        got: TensorRole,
    },
    /// A tensor whose shape differs from the layout's.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's name.
        name: String,
        /// The layout's shape.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },
    /// Another number of tensors than the layout holds.
    #[error("expected {expected} {}s, got {got}", kind(.roles))]
    CountMismatch {
        /// The tensors counted.
        roles: RoleFilter,
        /// The number of entries of the layout.
        expected: usize,
        /// The number found.
        got: usize,
    },
}

/// One named tensor of a [`TensorLayout`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LayoutEntry {
    /// The tensor's name (a PyTorch `state_dict` key).
    pub name: String,
    /// Its role.
    pub role: TensorRole,
    /// Its dimensions.
    pub shape: Vec<usize>,
}

/// The names, roles and shapes of a model's tensors in visiting order, with no two names alike: what a
/// model must visit, in the same order, to be averaged into, sampled into or merged with state built
/// from another.
///
/// Averages and SWAG moments keep their model's layout and check every model against it
/// ([`check_model`](Self::check_model)) before writing anything, so that a model that does not fit
/// changes nothing.
///
/// ```
/// # #[cfg(feature = "cpu")]
/// # {
/// use swa_core::params::{LayoutError, RoleFilter, TensorLayout};
/// use swa_core::{Backend, CpuBackend, CpuTensor, NamedTensors, TensorRole};
///
/// struct Linear {
///     weight: CpuTensor,
///     bias: CpuTensor,
/// }
///
/// impl NamedTensors<CpuBackend> for Linear {
///     fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &CpuTensor)) {
///         f("fc.weight", TensorRole::Parameter, &self.weight);
///         f("fc.bias", TensorRole::Parameter, &self.bias);
///     }
///     fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut CpuTensor)) {
///         f("fc.weight", TensorRole::Parameter, &mut self.weight);
///         f("fc.bias", TensorRole::Parameter, &mut self.bias);
///     }
/// }
///
/// let backend = CpuBackend::with_threads(1);
/// let linear = |outputs: usize| Linear {
///     weight: backend.zeros(&[outputs, 4]).unwrap(),
///     bias: backend.zeros(&[outputs]).unwrap(),
/// };
/// let layout = TensorLayout::of_model(&linear(3), RoleFilter::All).unwrap();
/// assert_eq!(layout.names(), ["fc.weight", "fc.bias"]);
/// assert_eq!(layout.check_model(&linear(3)), Ok(()));
/// assert_eq!(
///     layout.check_model(&linear(2)),
///     Err(LayoutError::ShapeMismatch {
///         name: "fc.weight".to_owned(),
///         expected: vec![3, 4],
///         got: vec![2, 4],
///     })
/// );
/// # }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TensorLayout {
    roles: RoleFilter,
    entries: Vec<LayoutEntry>,
    /// The position of every name in `entries`: rejects duplicates and finds tensors by name.
    positions: HashMap<String, usize>,
}

impl std::fmt::Debug for TensorLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `positions` only repeats `entries`.
        f.debug_struct("TensorLayout")
            .field("roles", &self.roles)
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl TensorLayout {
    /// An empty layout covering the tensors `roles` admits.
    pub fn new(roles: RoleFilter) -> Self {
        TensorLayout {
            roles,
            entries: Vec::new(),
            positions: HashMap::new(),
        }
    }

    /// The layout of the tensors of `model` that `roles` admits, in visiting order. Fails with
    /// [`LayoutError::DuplicateName`] for a name visited twice.
    pub fn of_model<B: Backend>(
        model: &dyn NamedTensors<B>,
        roles: RoleFilter,
    ) -> Result<Self, LayoutError> {
        let mut layout = TensorLayout::new(roles);
        let mut failure = None;
        model.visit_tensors(&mut |name, role, tensor| {
            if failure.is_none() && roles.admits(role) {
                failure = layout.push(name, role, tensor.dims()).err();
            }
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(layout),
        }
    }

    /// Appends an entry. Fails with [`LayoutError::DuplicateName`] for a name the layout holds, and with
    /// [`LayoutError::RoleMismatch`] for a role it does not cover; the layout is then unchanged.
    pub fn push(
        &mut self,
        name: &str,
        role: TensorRole,
        shape: &[usize],
    ) -> Result<(), LayoutError> {
        if let RoleFilter::Only(only) = self.roles {
            if role != only {
                return Err(LayoutError::RoleMismatch {
                    name: name.to_owned(),
                    expected: only,
                    got: role,
                });
            }
        }
        if self.positions.contains_key(name) {
            return Err(LayoutError::DuplicateName {
                name: name.to_owned(),
            });
        }
        self.positions.insert(name.to_owned(), self.entries.len());
        self.entries.push(LayoutEntry {
            name: name.to_owned(),
            role,
            shape: shape.to_vec(),
        });
        Ok(())
    }

    /// The roles the layout covers.
    pub fn roles(&self) -> RoleFilter {
        self.roles
    }

    /// The entries, in visiting order.
    pub fn entries(&self) -> &[LayoutEntry] {
        &self.entries
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the layout has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The names, in visiting order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// The position of the tensor named `name`, if the layout holds it.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.positions.get(name).copied()
    }

    /// The entry of the tensor named `name`, if the layout holds it.
    pub fn entry(&self, name: &str) -> Option<&LayoutEntry> {
        self.position(name).and_then(|i| self.entries.get(i))
    }

    /// The number of elements over all entries.
    pub fn numel(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// Checks that `model` visits the covered tensors with the layout's names, roles and shapes, in the
    /// layout's order, and no others. Only reads the model, so a caller that checks before writing
    /// leaves everything unchanged on a mismatch.
    ///
    /// The first tensor that differs is reported ([`NameMismatch`](LayoutError::NameMismatch), then
    /// [`RoleMismatch`](LayoutError::RoleMismatch), then [`ShapeMismatch`](LayoutError::ShapeMismatch),
    /// in that order of precedence); a model whose tensors all match but are too few or too many fails
    /// with [`CountMismatch`](LayoutError::CountMismatch).
    pub fn check_model<B: Backend>(&self, model: &dyn NamedTensors<B>) -> Result<(), LayoutError> {
        let mut index = 0;
        let mut failure = None;
        model.visit_tensors(&mut |name, role, tensor| {
            if !self.roles.admits(role) {
                return;
            }
            if failure.is_none() {
                failure = self.check_one(index, name, role, tensor.dims()).err();
            }
            index += 1;
        });
        match failure {
            Some(e) => Err(e),
            None => self.check_count(index),
        }
    }

    /// Checks that `other` holds the same entries in the same order, with the errors of
    /// [`check_model`](Self::check_model) (`expected` is this layout's value, `got` the other's).
    pub fn check_same(&self, other: &TensorLayout) -> Result<(), LayoutError> {
        for (index, entry) in other.entries.iter().enumerate() {
            self.check_one(index, &entry.name, entry.role, &entry.shape)?;
        }
        self.check_count(other.len())
    }

    /// Checks one tensor against entry `index`; a tensor past the last entry is left to the count.
    fn check_one(
        &self,
        index: usize,
        name: &str,
        role: TensorRole,
        shape: &[usize],
    ) -> Result<(), LayoutError> {
        let Some(entry) = self.entries.get(index) else {
            return Ok(());
        };
        if entry.name != name {
            return Err(LayoutError::NameMismatch {
                roles: self.roles,
                index,
                expected: entry.name.clone(),
                got: name.to_owned(),
            });
        }
        if entry.role != role {
            return Err(LayoutError::RoleMismatch {
                name: name.to_owned(),
                expected: entry.role,
                got: role,
            });
        }
        if entry.shape != shape {
            return Err(LayoutError::ShapeMismatch {
                name: name.to_owned(),
                expected: entry.shape.clone(),
                got: shape.to_vec(),
            });
        }
        Ok(())
    }

    fn check_count(&self, got: usize) -> Result<(), LayoutError> {
        if got == self.len() {
            Ok(())
        } else {
            Err(LayoutError::CountMismatch {
                roles: self.roles,
                expected: self.len(),
                got,
            })
        }
    }

    /// Visits the covered tensors of a model already checked against the layout, calling
    /// `f(entry, item, tensor)` with the layout's entry and the next of `items` for each, until the first
    /// error, which is returned: the loop of every operation that reads a model into per-tensor state.
    pub(crate) fn zip_visit<B: Backend, I: IntoIterator, E>(
        &self,
        model: &dyn NamedTensors<B>,
        items: I,
        mut f: impl FnMut(&LayoutEntry, I::Item, &B::Tensor) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut pairs = Pairs::new(self, items);
        model.visit_tensors(&mut |_, role, tensor| {
            pairs.step(role, |entry, item| f(entry, item, tensor));
        });
        pairs.finish()
    }

    /// [`zip_visit`](Self::zip_visit) over the model's tensors mutably: the loop of every operation that
    /// writes per-tensor state into a model.
    pub(crate) fn zip_visit_mut<B: Backend, I: IntoIterator, E>(
        &self,
        model: &mut dyn NamedTensors<B>,
        items: I,
        mut f: impl FnMut(&LayoutEntry, I::Item, &mut B::Tensor) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut pairs = Pairs::new(self, items);
        model.visit_tensors_mut(&mut |_, role, tensor| {
            pairs.step(role, |entry, item| f(entry, item, tensor));
        });
        pairs.finish()
    }
}

/// The state of [`TensorLayout::zip_visit`] and [`TensorLayout::zip_visit_mut`], which differ only in
/// how they visit the model.
struct Pairs<'a, I: Iterator, E> {
    roles: RoleFilter,
    entries: std::slice::Iter<'a, LayoutEntry>,
    items: I,
    failure: Option<E>,
}

impl<'a, I: Iterator, E> Pairs<'a, I, E> {
    fn new(layout: &'a TensorLayout, items: impl IntoIterator<IntoIter = I>) -> Self {
        Pairs {
            roles: layout.roles,
            entries: layout.entries.iter(),
            items: items.into_iter(),
            failure: None,
        }
    }

    /// Pairs one visited tensor with the next entry and item and runs `f` on them, unless the layout
    /// does not cover its role, an earlier call failed, or the entries or items have run out.
    fn step(&mut self, role: TensorRole, f: impl FnOnce(&LayoutEntry, I::Item) -> Result<(), E>) {
        if self.failure.is_some() || !self.roles.admits(role) {
            return;
        }
        if let (Some(entry), Some(item)) = (self.entries.next(), self.items.next()) {
            self.failure = f(entry, item).err();
        }
    }

    fn finish(self) -> Result<(), E> {
        match self.failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
