//! The module interface every layer and network implements.
//!
//! There is no autograd graph: each module caches what its backward pass needs during a training forward
//! pass, and `backward` accumulates its parameters' gradients and returns the gradient of its input. This is
//! all the paper's feed-forward networks need, and it keeps a training step free of graph bookkeeping.

use swa_core::backend::{Backend, BackendResult, HasShape};
use swa_core::params::{NamedTensors, TensorRole};

use crate::error::TrainError;
use crate::layers::{BatchNorm2d, Conv2d};

/// How a forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ForwardMode {
    /// Training: batch statistics in BatchNorm (running statistics updated with the layer's own momentum),
    /// dropout active with masks drawn from `seed`, activations cached for `backward`.
    Train {
        /// Seed of this step's dropout masks; each dropout layer derives its own stream from it.
        seed: u64,
    },
    /// Evaluation: running statistics in BatchNorm, no dropout, nothing cached.
    Eval,
    /// BatchNorm recomputation for averaged weights (PyTorch's `update_bn`): batch statistics, and running
    /// statistics updated with this `momentum` instead of the layer's own; dropout as in training; nothing
    /// cached. A momentum of `b / (n + b)` for a batch of `b` after `n` samples gives the exact average.
    RecomputeBatchNorm {
        /// Weight of this batch's statistics in the running statistics.
        momentum: f32,
        /// Seed of this pass's dropout masks.
        seed: u64,
    },
}

/// The input of a forward pass: borrowed from a caller that still needs it, or handed over.
///
/// A module reads either through [`ForwardInput::tensor`]; one that must keep the input past the pass
/// takes it with [`ForwardInput::into_owned`], which copies only a borrowed input.
#[derive(Debug)]
pub enum ForwardInput<'a, B: Backend> {
    /// An input the caller keeps.
    Borrowed(&'a B::Tensor),
    /// An input the caller has no further use for.
    Owned(B::Tensor),
}

impl<B: Backend> ForwardInput<'_, B> {
    /// The input tensor.
    pub fn tensor(&self) -> &B::Tensor {
        match self {
            ForwardInput::Borrowed(x) => x,
            ForwardInput::Owned(x) => x,
        }
    }

    /// The input as a tensor of its own: an owned one as it is, a borrowed one copied.
    pub fn into_owned(self, backend: &B) -> BackendResult<B::Tensor> {
        match self {
            ForwardInput::Borrowed(x) => backend.duplicate(x),
            ForwardInput::Owned(x) => Ok(x),
        }
    }
}

/// A trainable parameter: its value and, after a backward pass, its accumulated gradient.
#[derive(Debug)]
pub struct Param<B: Backend> {
    /// The current value.
    pub value: B::Tensor,
    /// The gradient accumulated since the last [`Module::zero_grads`], `None` before the first backward pass.
    pub grad: Option<B::Tensor>,
}

impl<B: Backend> Param<B> {
    /// A parameter with no gradient yet.
    pub fn new(value: B::Tensor) -> Self {
        Self { value, grad: None }
    }

    /// Adds `g` to the accumulated gradient (taking it as the gradient when there is none).
    pub fn accumulate_grad(&mut self, backend: &B, g: B::Tensor) -> BackendResult<()> {
        match &mut self.grad {
            Some(acc) => backend.axpy_(acc, 1.0, &g),
            None => {
                self.grad = Some(g);
                Ok(())
            }
        }
    }
}

/// A layer or a network.
///
/// [`NamedTensors`] (the supertrait) visits parameters *and* BatchNorm buffers with their PyTorch names;
/// [`Module::visit_params_mut`] visits only the trainable parameters, with their gradients, for optimisers.
pub trait Module<B: Backend>: NamedTensors<B> + Send {
    /// Runs the module on `x`, borrowed or owned: the one forward pass a module implements.
    ///
    /// A module that keeps its input for `backward` keeps an owned input itself and copies only a borrowed
    /// one (see [`ForwardCache::keep_input`](crate::layers::ForwardCache::keep_input)); containers hand
    /// each child's output to the next child as [`ForwardInput::Owned`]. Callers use [`Module::forward`]
    /// or [`Module::forward_owned`].
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor>;

    /// Runs the module on `x`, which the caller keeps.
    fn forward(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        self.forward_input(backend, ForwardInput::Borrowed(x), mode)
    }

    /// Runs the module on an input the caller has no further use for, so that a module which keeps its
    /// input for `backward` can keep this one instead of copying it.
    fn forward_owned(
        &mut self,
        backend: &B,
        x: B::Tensor,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        self.forward_input(backend, ForwardInput::Owned(x), mode)
    }

    /// Back-propagates `dy` (the gradient of the loss with respect to the last training forward's output):
    /// accumulates parameter gradients and returns the gradient with respect to that forward's input.
    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor>;

    /// Visits every trainable parameter with its name, in the same order as [`NamedTensors`] visits them.
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>));

    /// Drops accumulated gradients and cached activations.
    fn zero_grads(&mut self) {
        self.visit_params_mut(&mut |_, p| p.grad = None);
    }

    /// Says whether [`Module::backward`] must compute the gradient of the input.
    ///
    /// The first layer of a network has no use for it, and skipping it saves a full transposed
    /// convolution per step. When told `false`, a module may return an empty tensor of shape `[0]` from
    /// `backward` instead; modules that cannot skip the work ignore the hint.
    fn require_input_grad(&mut self, _required: bool) {}

    /// Visits the number of training batches each BatchNorm layer has seen (PyTorch's
    /// `num_batches_tracked` buffer), named `<layer>.num_batches_tracked`. Modules without BatchNorm visit
    /// nothing.
    fn visit_batch_counters(&self, _f: &mut dyn FnMut(&str, u64)) {}

    /// Visits the BatchNorm batch counters mutably (to restore them from a checkpoint).
    fn visit_batch_counters_mut(&mut self, _f: &mut dyn FnMut(&str, &mut u64)) {}

    /// Visits every BatchNorm layer, to configure it (as [`BatchNorm2d::set_synchronization`] does).
    /// Containers pass the visit on to their children; a layer without BatchNorm has nothing to visit.
    fn visit_batch_norms_mut(&mut self, _f: &mut dyn FnMut(&mut BatchNorm2d<B>)) {}

    /// This module as a convolution, so that a container can fold the BatchNorm that follows it into
    /// its weights for evaluation ([`Conv2d::fold_batch_norm`]); `None` for every other module.
    fn as_conv2d(&self) -> Option<&Conv2d<B>> {
        None
    }

    /// This module as a BatchNorm, the other half of [`Module::as_conv2d`]; `None` for every other
    /// module.
    fn as_batch_norm(&self) -> Option<&BatchNorm2d<B>> {
        None
    }

    /// This module as a BatchNorm to run, so that a container can fuse the ReLU directly after it into
    /// its pass in training ([`BatchNorm2d::forward_relu`]); `None` for every other module.
    fn as_batch_norm_mut(&mut self) -> Option<&mut BatchNorm2d<B>> {
        None
    }

    /// Whether this module is a plain ReLU, so that a container can run the BatchNorm before it and
    /// the ReLU as one pass ([`BatchNorm2d::forward_relu`] in training,
    /// [`BatchNorm2d::forward_eval_relu`] in evaluation); `false` for every other module.
    fn is_relu(&self) -> bool {
        false
    }
}

/// Prefixes a child's names with `prefix.`, as PyTorch's `state_dict` does.
pub fn child_name(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The number of trainable scalars of a module (PyTorch's `sum(p.numel() for p in model.parameters())`).
pub fn parameter_count<B: Backend, M: NamedTensors<B> + ?Sized>(module: &M) -> usize {
    let mut total = 0;
    module.visit_tensors(&mut |_, role, t| {
        if role == TensorRole::Parameter {
            total += t.numel();
        }
    });
    total
}

/// The values of `model`'s tensors of `role`, in visiting order, one after the other.
pub(crate) fn read_tensors<B: Backend>(
    backend: &B,
    model: &dyn Module<B>,
    role: TensorRole,
) -> Result<Vec<f32>, TrainError> {
    let mut values = Vec::new();
    let mut failure = None;
    model.visit_tensors(&mut |name, tensor_role, tensor| {
        if tensor_role != role || failure.is_some() {
            return;
        }
        match backend.to_host(tensor) {
            Ok(v) => values.extend_from_slice(&v),
            Err(source) => {
                failure = Some(TrainError::Backend {
                    context: format!("reading `{name}`"),
                    source,
                })
            }
        }
    });
    failure.map_or(Ok(values), Err)
}

/// Sets `model`'s tensors of `role` from `values`, laid out as [`read_tensors`] reads them.
pub(crate) fn write_tensors<B: Backend>(
    backend: &B,
    model: &mut dyn Module<B>,
    role: TensorRole,
    values: &[f32],
) -> Result<(), TrainError> {
    let mut offset = 0;
    let mut failure = None;
    model.visit_tensors_mut(&mut |name, tensor_role, tensor| {
        if tensor_role != role || failure.is_some() {
            return;
        }
        let len = tensor.numel();
        let Some(slice) = values.get(offset..offset + len) else {
            failure = Some(TrainError::StateMismatch(format!(
                "{} values for the {role:?} tensors, which end past `{name}`",
                values.len()
            )));
            return;
        };
        offset += len;
        match backend.from_host(slice, tensor.dims()) {
            Ok(t) => *tensor = t,
            Err(source) => {
                failure = Some(TrainError::Backend {
                    context: format!("setting `{name}`"),
                    source,
                })
            }
        }
    });
    match failure {
        Some(failure) => Err(failure),
        None if offset != values.len() => Err(TrainError::StateMismatch(format!(
            "{} values for {offset} values of {role:?} tensors",
            values.len()
        ))),
        None => Ok(()),
    }
}
