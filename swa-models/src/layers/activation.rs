//! Layers without parameters that act element by element: ReLU and dropout.

use swa_core::backend::{Backend, BackendError, BackendResult, HasShape};
use swa_core::params::{NamedTensors, TensorRole};

use super::{mix_seed, no_cached_forward};
use crate::module::{ForwardMode, Module, Param};

/// Implements [`NamedTensors`] and the parameter visit for a layer that has no tensors.
macro_rules! no_tensors {
    ($layer:ident) => {
        impl<B: Backend> NamedTensors<B> for $layer<B> {
            fn visit_tensors(&self, _f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {}
            fn visit_tensors_mut(&mut self, _f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {}
        }
    };
}
pub(super) use no_tensors;

/// `max(x, 0)`, PyTorch's `nn.ReLU`.
///
/// It keeps its input for `backward`: `x > 0` exactly where `max(x, 0) > 0`, so the input gives the same
/// gradient mask as the output, and an input handed over by [`Module::forward_owned`] costs no copy.
#[derive(Debug)]
pub struct ReLU<B: Backend> {
    cached_input: Option<B::Tensor>,
}

impl<B: Backend> ReLU<B> {
    /// A ReLU.
    pub fn new() -> Self {
        Self { cached_input: None }
    }
}

impl<B: Backend> Default for ReLU<B> {
    fn default() -> Self {
        Self::new()
    }
}

no_tensors!(ReLU);

impl<B: Backend> Module<B> for ReLU<B> {
    fn forward(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let y = backend.relu(x)?;
        if let ForwardMode::Train { .. } = mode {
            self.cached_input = Some(backend.duplicate(x)?);
        }
        Ok(y)
    }

    fn forward_owned(
        &mut self,
        backend: &B,
        x: B::Tensor,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let y = backend.relu(&x)?;
        if let ForwardMode::Train { .. } = mode {
            self.cached_input = Some(x);
        }
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let x = self
            .cached_input
            .take()
            .ok_or_else(|| no_cached_forward("ReLU::backward"))?;
        backend.relu_backward(&x, dy)
    }

    fn visit_params_mut(&mut self, _f: &mut dyn FnMut(&str, &mut Param<B>)) {}

    fn zero_grads(&mut self) {
        self.cached_input = None;
    }
}

/// Inverted dropout, PyTorch's `nn.Dropout(p)`: in training and BatchNorm recomputation each element is
/// zeroed with probability `p` and the rest scaled by `1/(1−p)`; in evaluation it is the identity.
///
/// The mask comes from [`dropout_mask`](swa_core::backend::ElementwiseOps::dropout_mask) with the pass's
/// seed mixed with this layer's `layer_id` (see [`mix_seed`]), so two dropout layers of one network draw
/// different masks in the same step, and the same seed reproduces the same masks on every backend.
#[derive(Debug)]
pub struct Dropout<B: Backend> {
    p: f32,
    layer_id: u64,
    cached_mask: Option<B::Tensor>,
}

impl<B: Backend> Dropout<B> {
    /// A dropout layer with drop probability `p` in `[0, 1)` and an id unique within its network.
    pub fn new(p: f32, layer_id: u64) -> BackendResult<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(BackendError::InvalidArgument {
                op: "Dropout::new",
                message: format!("drop probability {p} is outside [0, 1)"),
            });
        }
        Ok(Self {
            p,
            layer_id,
            cached_mask: None,
        })
    }

    /// The drop probability.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// The seed of this layer's mask for a pass seeded with `seed`.
    pub fn mask_seed(&self, seed: u64) -> u64 {
        mix_seed(seed, self.layer_id)
    }
}

no_tensors!(Dropout);

impl<B: Backend> Module<B> for Dropout<B> {
    fn forward(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let seed = match mode {
            ForwardMode::Eval => return backend.duplicate(x),
            ForwardMode::Train { seed } | ForwardMode::RecomputeBatchNorm { seed, .. } => seed,
        };
        if self.p == 0.0 {
            if let ForwardMode::Train { .. } = mode {
                self.cached_mask = None;
            }
            return backend.duplicate(x);
        }
        let mask = backend.dropout_mask(x.dims(), self.p, self.mask_seed(seed))?;
        let y = backend.mul(x, &mask)?;
        if let ForwardMode::Train { .. } = mode {
            self.cached_mask = Some(mask);
        }
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        if self.p == 0.0 {
            return backend.duplicate(dy);
        }
        let mask = self
            .cached_mask
            .take()
            .ok_or_else(|| no_cached_forward("Dropout::backward"))?;
        backend.mul(dy, &mask)
    }

    fn visit_params_mut(&mut self, _f: &mut dyn FnMut(&str, &mut Param<B>)) {}

    fn zero_grads(&mut self) {
        self.cached_mask = None;
    }
}
