//! Pooling and flattening.

use swa_core::backend::{Backend, BackendError, BackendResult, HasShape};
use swa_core::params::{NamedTensors, TensorRole};

use super::activation::no_tensors;
use super::ForwardCache;
use crate::module::{ForwardInput, ForwardMode, Module, Param};

/// Max pooling over square windows (PyTorch's `nn.MaxPool2d(kernel, stride, padding)`).
#[derive(Debug)]
pub struct MaxPool2d<B: Backend> {
    kernel: usize,
    stride: usize,
    padding: usize,
    input: ForwardCache<B::Tensor>,
}

impl<B: Backend> MaxPool2d<B> {
    /// Max pooling with a `kernel × kernel` window moved by `stride`, no padding.
    pub fn new(kernel: usize, stride: usize) -> BackendResult<Self> {
        Self::padded(kernel, stride, 0)
    }

    /// Max pooling with `padding` on every side that never wins a window (at most half the window), as
    /// the stem of the ImageNet ResNets and DenseNets: `MaxPool2d::padded(3, 2, 1)`.
    pub fn padded(kernel: usize, stride: usize, padding: usize) -> BackendResult<Self> {
        if kernel == 0 || stride == 0 || 2 * padding > kernel {
            return Err(BackendError::InvalidArgument {
                op: "MaxPool2d::padded",
                message: format!(
                    "kernel {kernel} and stride {stride} must be positive and padding {padding} at \
                     most half the kernel"
                ),
            });
        }
        Ok(Self {
            kernel,
            stride,
            padding,
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
        let y = backend.max_pool2d(x.tensor(), self.kernel, self.stride, self.padding)?;
        self.input.keep_input(backend, x, mode)?;
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let x = self.input.take("MaxPool2d::backward")?;
        backend.max_pool2d_backward(&x, dy, self.kernel, self.stride, self.padding)
    }

    fn visit_params_mut(&mut self, _f: &mut dyn FnMut(&str, &mut Param<B>)) {}

    fn zero_grads(&mut self) {
        self.input.clear();
    }
}

/// Average pooling over non-overlapping square windows (PyTorch's `F.avg_pool2d(x, kernel)`), or over
/// whole planes (PyTorch's `nn.AdaptiveAvgPool2d(1)` on square planes).
#[derive(Debug)]
pub struct AvgPool2d<B: Backend> {
    /// `None`: the whole plane, whatever its size.
    kernel: Option<usize>,
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
            kernel: Some(kernel),
            input_shape: ForwardCache::new(),
            _backend: std::marker::PhantomData,
        })
    }

    /// The average of each whole plane, `[N, C, H, W] → [N, C, 1, 1]`, for any square plane: the ImageNet
    /// networks' pooling, which lets them take any input size. Non-square planes are refused with an
    /// error naming their size.
    pub fn global() -> Self {
        Self {
            kernel: None,
            input_shape: ForwardCache::new(),
            _backend: std::marker::PhantomData,
        }
    }

    /// The window for an input of `shape`.
    fn kernel_for(&self, shape: &[usize]) -> BackendResult<usize> {
        match (self.kernel, shape) {
            (Some(kernel), _) => Ok(kernel),
            (None, &[_, _, height, width]) if height == width => Ok(height),
            (None, _) => Err(BackendError::ShapeMismatch {
                op: "AvgPool2d::global",
                expected: "an input [N, C, H, W] with square planes".into(),
                got: shape.to_vec(),
            }),
        }
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
        let y = backend.avg_pool2d(x, self.kernel_for(x.dims())?)?;
        self.input_shape.keep_with(mode, || x.dims().to_vec());
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let shape = self.input_shape.take("AvgPool2d::backward")?;
        backend.avg_pool2d_backward(dy, self.kernel_for(&shape)?, &shape)
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
