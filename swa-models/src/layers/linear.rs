//! Fully connected layer.

use rand::Rng;
use swa_core::backend::{Backend, BackendError, BackendResult, HasShape};
use swa_core::params::{NamedTensors, TensorRole};

use super::init::{torch_default_bound, uniform};
use super::ForwardCache;
use crate::module::{ForwardInput, ForwardMode, Module, Param};

/// PyTorch's `nn.Linear`: `y = x·Wᵀ + b` on `x: [N, in]`, with `weight` `[out, in]` and `bias` `[out]`.
#[derive(Debug)]
pub struct Linear<B: Backend> {
    weight: Param<B>,
    bias: Param<B>,
    input: ForwardCache<B::Tensor>,
}

impl<B: Backend> Linear<B> {
    /// A layer with PyTorch's default initialisation: weight and bias from `U(−1/√in, 1/√in)`.
    pub fn new<R: Rng + ?Sized>(
        backend: &B,
        in_features: usize,
        out_features: usize,
        rng: &mut R,
    ) -> BackendResult<Self> {
        if in_features == 0 || out_features == 0 {
            return Err(BackendError::InvalidArgument {
                op: "Linear::new",
                message: format!(
                    "feature counts must be positive, got {in_features} → {out_features}"
                ),
            });
        }
        let bound = torch_default_bound(in_features);
        let weight = uniform(rng, in_features * out_features, bound);
        let bias = uniform(rng, out_features, bound);
        Self::from_tensors(
            backend.from_host(&weight, &[out_features, in_features])?,
            backend.from_host(&bias, &[out_features])?,
        )
    }

    /// A layer with the given weight `[out, in]` and bias `[out]`.
    pub fn from_tensors(weight: B::Tensor, bias: B::Tensor) -> BackendResult<Self> {
        let dims = weight.dims();
        if dims.len() != 2 || bias.dims() != [dims[0]] {
            return Err(BackendError::ShapeMismatch {
                op: "Linear::from_tensors",
                expected: format!(
                    "a weight [out, in] and a bias [out], bias {:?}",
                    bias.dims()
                ),
                got: dims.to_vec(),
            });
        }
        Ok(Self {
            weight: Param::new(weight),
            bias: Param::new(bias),
            input: ForwardCache::new(),
        })
    }

    /// The weight `[out, in]` and its gradient.
    pub fn weight(&self) -> &Param<B> {
        &self.weight
    }

    /// The bias `[out]` and its gradient.
    pub fn bias(&self) -> &Param<B> {
        &self.bias
    }
}

impl<B: Backend> NamedTensors<B> for Linear<B> {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        f("weight", TensorRole::Parameter, &self.weight.value);
        f("bias", TensorRole::Parameter, &self.bias.value);
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        f("weight", TensorRole::Parameter, &mut self.weight.value);
        f("bias", TensorRole::Parameter, &mut self.bias.value);
    }
}

impl<B: Backend> Module<B> for Linear<B> {
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let mut y = backend.matmul(x.tensor(), &self.weight.value, false, true)?;
        backend.add_row_bias_(&mut y, &self.bias.value)?;
        self.input.keep_input(backend, x, mode)?;
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let x = self.input.take("Linear::backward")?;
        self.weight
            .accumulate_grad(backend, backend.matmul(dy, &x, true, false)?)?;
        self.bias.accumulate_grad(backend, backend.sum_rows(dy)?)?;
        backend.matmul(dy, &self.weight.value, false, false)
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>)) {
        f("weight", &mut self.weight);
        f("bias", &mut self.bias);
    }

    fn zero_grads(&mut self) {
        self.weight.grad = None;
        self.bias.grad = None;
        self.input.clear();
    }
}
