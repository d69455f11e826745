//! Named tensors: how a network exposes its parameters and buffers to averaging, optimisers and checkpoints,
//! without any of them knowing the network's shape.
//!
//! Names are PyTorch `state_dict` keys (`layer1.0.conv1.weight`, `bn.running_mean`), so that checkpoints and
//! averages line up with the original SWA code's.

use serde::{Deserialize, Serialize};

use crate::backend::Backend;

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
