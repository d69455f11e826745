//! Layers without parameters that act element by element: ReLU and dropout.

use swa_core::backend::{Backend, BackendError, BackendResult, HasShape};
use swa_core::params::{NamedTensors, TensorRole};

use super::{mix_seed, ForwardCache};
use crate::module::{ForwardInput, ForwardMode, Module, Param};

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
    input: ForwardCache<B::Tensor>,
}

impl<B: Backend> ReLU<B> {
    /// A ReLU.
    pub fn new() -> Self {
        Self {
            input: ForwardCache::new(),
        }
    }
}

impl<B: Backend> Default for ReLU<B> {
    fn default() -> Self {
        Self::new()
    }
}

no_tensors!(ReLU);

impl<B: Backend> Module<B> for ReLU<B> {
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        // Outside training nothing is kept for a backward pass, so an input handed over is rectified
        // where it lies instead of into a second tensor.
        let x = match (x, mode) {
            (
                ForwardInput::Owned(mut x),
                ForwardMode::Eval | ForwardMode::RecomputeBatchNorm { .. },
            ) => {
                backend.relu_(&mut x)?;
                return Ok(x);
            }
            (x, _) => x,
        };
        let y = backend.relu(x.tensor())?;
        self.input.keep_input(backend, x, mode)?;
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let x = self.input.take("ReLU::backward")?;
        backend.relu_backward(&x, dy)
    }

    fn visit_params_mut(&mut self, _f: &mut dyn FnMut(&str, &mut Param<B>)) {}

    fn zero_grads(&mut self) {
        self.input.clear();
    }

    fn is_relu(&self) -> bool {
        true
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
    mask: ForwardCache<B::Tensor>,
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
            mask: ForwardCache::new(),
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
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let seed = match mode {
            ForwardMode::Train { seed } | ForwardMode::RecomputeBatchNorm { seed, .. }
                if self.p > 0.0 =>
            {
                seed
            }
            // The identity: evaluation, or nothing to drop (and so no mask to keep).
            _ => return x.into_owned(backend),
        };
        let x = x.tensor();
        let mask = backend.dropout_mask(x.dims(), self.p, self.mask_seed(seed))?;
        let y = backend.mul(x, &mask)?;
        self.mask.keep_with(mode, || mask);
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        if self.p == 0.0 {
            return backend.duplicate(dy);
        }
        let mask = self.mask.take("Dropout::backward")?;
        backend.mul(dy, &mask)
    }

    fn visit_params_mut(&mut self, _f: &mut dyn FnMut(&str, &mut Param<B>)) {}

    fn zero_grads(&mut self) {
        self.mask.clear();
    }
}
