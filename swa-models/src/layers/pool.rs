//! Pooling and flattening.

use swa_core::backend::{Backend, BackendError, BackendResult, HasShape};
use swa_core::params::{NamedTensors, TensorRole};

use super::activation::no_tensors;
use super::ForwardCache;
use crate::module::{ForwardInput, ForwardMode, Module, Param};

/// Max pooling over square windows, no padding (PyTorch's `nn.MaxPool2d(kernel, stride)`).
#[derive(Debug)]
pub struct MaxPool2d<B: Backend> {
    kernel: usize,
    stride: usize,
    input: ForwardCache<B::Tensor>,
}

impl<B: Backend> MaxPool2d<B> {
    /// Max pooling with a `kernel × kernel` window moved by `stride`.
    pub fn new(kernel: usize, stride: usize) -> BackendResult<Self> {
        if kernel == 0 || stride == 0 {
            return Err(BackendError::InvalidArgument {
                op: "MaxPool2d::new",
                message: format!("kernel {kernel} and stride {stride} must be positive"),
            });
        }
        Ok(Self {
            kernel,
            stride,
            input: ForwardCache::new(),
        })
    }
}

no_tensors!(MaxPool2d);

impl<B: Backend> Module<B> for MaxPool2d<B> {
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let y = backend.max_pool2d(x.tensor(), self.kernel, self.stride)?;
        self.input.keep_input(backend, x, mode)?;
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let x = self.input.take("MaxPool2d::backward")?;
        backend.max_pool2d_backward(&x, dy, self.kernel, self.stride)
    }

    fn visit_params_mut(&mut self, _f: &mut dyn FnMut(&str, &mut Param<B>)) {}

    fn zero_grads(&mut self) {
        self.input.clear();
    }
}

/// Average pooling over non-overlapping square windows (PyTorch's `F.avg_pool2d(x, kernel)`).
#[derive(Debug)]
pub struct AvgPool2d<B: Backend> {
    kernel: usize,
    input_shape: ForwardCache<Vec<usize>>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend> AvgPool2d<B> {
    /// Average pooling with a `kernel × kernel` window moved by `kernel`.
    pub fn new(kernel: usize) -> BackendResult<Self> {
        if kernel == 0 {
            return Err(BackendError::InvalidArgument {
                op: "AvgPool2d::new",
                message: "the kernel must be positive".into(),
            });
        }
        Ok(Self {
            kernel,
            input_shape: ForwardCache::new(),
            _backend: std::marker::PhantomData,
        })
    }
}

no_tensors!(AvgPool2d);

impl<B: Backend> Module<B> for AvgPool2d<B> {
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let x = x.tensor();
        let y = backend.avg_pool2d(x, self.kernel)?;
        self.input_shape.keep_with(mode, || x.dims().to_vec());
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let shape = self.input_shape.take("AvgPool2d::backward")?;
        backend.avg_pool2d_backward(dy, self.kernel, &shape)
    }

    fn visit_params_mut(&mut self, _f: &mut dyn FnMut(&str, &mut Param<B>)) {}

    fn zero_grads(&mut self) {
        self.input_shape.clear();
    }
}

/// Flattens every dimension after the first: `[N, C, H, W] → [N, C·H·W]` (PyTorch's `flatten(1)`).
#[derive(Debug)]
pub struct Flatten<B: Backend> {
    input_shape: ForwardCache<Vec<usize>>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend> Flatten<B> {
    /// A flattening layer.
    pub fn new() -> Self {
        Self {
            input_shape: ForwardCache::new(),
            _backend: std::marker::PhantomData,
        }
    }
}

impl<B: Backend> Default for Flatten<B> {
    fn default() -> Self {
        Self::new()
    }
}

no_tensors!(Flatten);

impl<B: Backend> Module<B> for Flatten<B> {
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let dims = x.tensor().dims().to_vec();
        let Some((&batch, rest)) = dims.split_first() else {
            return Err(BackendError::ShapeMismatch {
                op: "Flatten::forward",
                expected: "a tensor of rank at least 1".into(),
                got: dims,
            });
        };
        let features = rest.iter().product();
        let y = backend.reshape(x.into_owned(backend)?, &[batch, features])?;
        self.input_shape.keep_with(mode, || dims);
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let shape = self.input_shape.take("Flatten::backward")?;
        backend.reshape(backend.duplicate(dy)?, &shape)
    }

    fn visit_params_mut(&mut self, _f: &mut dyn FnMut(&str, &mut Param<B>)) {}

    fn zero_grads(&mut self) {
        self.input_shape.clear();
    }
}
