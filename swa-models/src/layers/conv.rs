//! 2-D convolution.

use rand::Rng;
use swa_core::backend::{Backend, BackendError, BackendResult, Conv2dSpec, HasShape};
use swa_core::params::{NamedTensors, TensorRole};

use super::init::{normal, torch_default_bound, uniform, ConvInit};
use super::BatchNorm2d;
use super::ForwardCache;
use crate::module::{ForwardInput, ForwardMode, Module, Param};

/// The shape and initialisation of a [`Conv2d`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Side of the square kernel.
    pub kernel_size: usize,
    /// Step between output positions.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Whether the layer adds a learned bias.
    pub bias: bool,
    /// How weights and bias are drawn.
    pub init: ConvInit,
}

impl Conv2dConfig {
    /// A `kernel_size × kernel_size` convolution with stride 1, no padding, a bias and PyTorch's default
    /// initialisation (PyTorch's `nn.Conv2d(in, out, k)`).
    pub fn new(in_channels: usize, out_channels: usize, kernel_size: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel_size,
            stride: 1,
            padding: 0,
            bias: true,
            init: ConvInit::TorchDefault,
        }
    }

    /// The same configuration with another stride.
    pub fn stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }

    /// The same configuration with another padding.
    pub fn padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }

    /// The same configuration with or without a bias.
    pub fn bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// The same configuration with another initialisation.
    pub fn init(mut self, init: ConvInit) -> Self {
        self.init = init;
        self
    }
}

/// A 2-D convolution, PyTorch's `nn.Conv2d`: tensors `weight` `[out, in, k, k]` and, optionally, `bias`
/// `[out]`.
#[derive(Debug)]
pub struct Conv2d<B: Backend> {
    weight: Param<B>,
    bias: Option<Param<B>>,
    spec: Conv2dSpec,
    input_grad_required: bool,
    input: ForwardCache<B::Tensor>,
}

impl<B: Backend> Conv2d<B> {
    /// A convolution initialised on the host from `rng` and uploaded to `backend`.
    pub fn new<R: Rng + ?Sized>(
        backend: &B,
        config: Conv2dConfig,
        rng: &mut R,
    ) -> BackendResult<Self> {
        let Conv2dConfig {
            in_channels,
            out_channels,
            kernel_size: k,
            stride,
            padding,
            bias,
            init,
        } = config;
        if in_channels == 0 || out_channels == 0 || k == 0 || stride == 0 {
            return Err(BackendError::InvalidArgument {
                op: "Conv2d::new",
                message: format!(
                    "channels, kernel size and stride must be positive, got {config:?}"
                ),
            });
        }
        let shape = [out_channels, in_channels, k, k];
        let numel = out_channels * in_channels * k * k;
        let (weight, bias) = match init {
            ConvInit::HeNormalFanOut => {
                let std = (2.0 / (k * k * out_channels) as f32).sqrt();
                let weight = normal(rng, numel, std);
                (weight, bias.then(|| vec![0.0; out_channels]))
            }
            ConvInit::HeNormalFanIn => {
                let std = (2.0 / (k * k * in_channels) as f32).sqrt();
                let weight = normal(rng, numel, std);
                (weight, bias.then(|| vec![0.0; out_channels]))
            }
            ConvInit::TorchDefault => {
                let bound = torch_default_bound(in_channels * k * k);
                let weight = uniform(rng, numel, bound);
                (weight, bias.then(|| uniform(rng, out_channels, bound)))
            }
        };
        let weight = backend.from_host(&weight, &shape)?;
        let bias = bias
            .map(|b| backend.from_host(&b, &[out_channels]))
            .transpose()?;
        Self::from_tensors(weight, bias, Conv2dSpec { stride, padding })
    }

    /// A convolution with the given weight `[out, in, k, k]` and optional bias `[out]`.
    pub fn from_tensors(
        weight: B::Tensor,
        bias: Option<B::Tensor>,
        spec: Conv2dSpec,
    ) -> BackendResult<Self> {
        let dims = weight.dims();
        if dims.len() != 4 || dims[2] != dims[3] {
            return Err(BackendError::ShapeMismatch {
                op: "Conv2d::from_tensors",
                expected: "a weight [out, in, k, k]".into(),
                got: dims.to_vec(),
            });
        }
        if let Some(b) = &bias {
            if b.dims() != [dims[0]] {
                return Err(BackendError::ShapeMismatch {
                    op: "Conv2d::from_tensors",
                    expected: format!("a bias [{}]", dims[0]),
                    got: b.dims().to_vec(),
                });
            }
        }
        Ok(Self {
            weight: Param::new(weight),
            bias: bias.map(Param::new),
            spec,
            input_grad_required: true,
            input: ForwardCache::new(),
        })
    }

    /// The weight `[out, in, k, k]` and its gradient.
    pub fn weight(&self) -> &Param<B> {
        &self.weight
    }

    /// The bias `[out]` and its gradient, when the layer has one.
    pub fn bias(&self) -> Option<&Param<B>> {
        self.bias.as_ref()
    }

    /// Stride and padding.
    pub fn spec(&self) -> Conv2dSpec {
        self.spec
    }

    /// The convolution that computes, in one pass, this convolution followed by `norm` in evaluation
    /// mode: each output channel's weights scaled by `γ / √(running_var + ε)` and its bias
    /// `(b − running_mean) · γ / √(running_var + ε) + β`.
    ///
    /// Equal to the two layers in exact arithmetic; in floating point the outputs differ by rounding
    /// only (a few units in the last place of the weights and of the sums). Both parts are computed by
    /// the backend's own evaluation-mode BatchNorm, so the folding runs where the tensors are: the
    /// weights, seen as `[1, out, in·k·k, 1]`, are normalised with a zero mean and shift, which scales
    /// each output channel by exactly the factor the BatchNorm would apply; the bias, seen as
    /// `[1, out]`, is normalised as the BatchNorm normalises the convolution's output.
    pub fn fold_batch_norm(&self, backend: &B, norm: &BatchNorm2d<B>) -> BackendResult<Self> {
        let dims = self.weight.value.dims().to_vec();
        let out = dims[0];
        let per_output: usize = dims[1..].iter().product();
        if norm.running_mean().dims() != [out] {
            return Err(BackendError::ShapeMismatch {
                op: "Conv2d::fold_batch_norm",
                expected: format!("a BatchNorm over the convolution's {out} output channels"),
                got: norm.running_mean().dims().to_vec(),
            });
        }
        let zeros = backend.zeros(&[out])?;
        let weight = backend.reshape(
            backend.duplicate(&self.weight.value)?,
            &[1, out, per_output, 1],
        )?;
        let weight = backend.batch_norm_eval(
            &weight,
            &norm.weight().value,
            &zeros,
            &zeros,
            norm.running_var(),
            norm.eps(),
        )?;
        let bias = match &self.bias {
            Some(bias) => backend.reshape(backend.duplicate(&bias.value)?, &[1, out])?,
            None => backend.zeros(&[1, out])?,
        };
        let bias = backend.batch_norm_eval(
            &bias,
            &norm.weight().value,
            &norm.bias().value,
            norm.running_mean(),
            norm.running_var(),
            norm.eps(),
        )?;
        Self::from_tensors(
            backend.reshape(weight, &dims)?,
            Some(backend.reshape(bias, &[out])?),
            self.spec,
        )
    }

    fn convolve(&self, backend: &B, x: &B::Tensor) -> BackendResult<B::Tensor> {
        backend.conv2d(
            x,
            &self.weight.value,
            self.bias.as_ref().map(|b| &b.value),
            self.spec,
        )
    }
}

impl<B: Backend> Conv2d<B> {
    /// The convolution of `x`, which holds the input channels `start..start + c` of this layer's input,
    /// with the weights of those channels: one term of the layer applied to a concatenation, which is
    /// the sum of these terms over its pieces. The bias, which belongs to no piece, is refused.
    pub(super) fn convolve_channels(
        &self,
        backend: &B,
        x: &B::Tensor,
        start: usize,
    ) -> BackendResult<B::Tensor> {
        let weight = self.weight_of_channels(backend, x, start)?;
        backend.conv2d(x, &weight, None, self.spec)
    }

    /// The backward pass of [`Conv2d::convolve_channels`] for the piece `x` from channel `start`:
    /// accumulates the gradient of those channels' weights and returns the piece's input gradient.
    pub(super) fn backward_channels(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        start: usize,
        dy: &B::Tensor,
    ) -> BackendResult<B::Tensor> {
        let weight = self.weight_of_channels(backend, x, start)?;
        let grads = backend.conv2d_backward(x, &weight, dy, self.spec, true, false)?;
        super::norm::accumulate_grad_slice(backend, &mut self.weight, 1, start, &grads.weight)?;
        grads.input.ok_or_else(|| {
            BackendError::Device(
                "conv2d_backward returned no input gradient where one was asked for".into(),
            )
        })
    }

    /// The weights `[out, c, k, k]` of the input channels of `x` from `start`.
    fn weight_of_channels(
        &self,
        backend: &B,
        x: &B::Tensor,
        start: usize,
    ) -> BackendResult<B::Tensor> {
        if self.bias.is_some() {
            return Err(BackendError::InvalidArgument {
                op: "Conv2d::convolve_channels",
                message: "a convolution with a bias cannot be applied piece by piece".into(),
            });
        }
        let channels = x.dims().get(1).copied().unwrap_or(0);
        backend.narrow(&self.weight.value, 1, start, channels)
    }
}

impl<B: Backend> NamedTensors<B> for Conv2d<B> {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        f("weight", TensorRole::Parameter, &self.weight.value);
        if let Some(bias) = &self.bias {
            f("bias", TensorRole::Parameter, &bias.value);
        }
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        f("weight", TensorRole::Parameter, &mut self.weight.value);
        if let Some(bias) = &mut self.bias {
            f("bias", TensorRole::Parameter, &mut bias.value);
        }
    }
}

impl<B: Backend> Module<B> for Conv2d<B> {
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let y = self.convolve(backend, x.tensor())?;
        self.input.keep_input(backend, x, mode)?;
        Ok(y)
    }

    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let x = self.input.take("Conv2d::backward")?;
        let grads = backend.conv2d_backward(
            &x,
            &self.weight.value,
            dy,
            self.spec,
            self.input_grad_required,
            self.bias.is_some(),
        )?;
        self.weight.accumulate_grad(backend, grads.weight)?;
        if let (Some(bias), Some(g)) = (&mut self.bias, grads.bias) {
            bias.accumulate_grad(backend, g)?;
        }
        match grads.input {
            Some(dx) => Ok(dx),
            None => backend.zeros(&[0]),
        }
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>)) {
        f("weight", &mut self.weight);
        if let Some(bias) = &mut self.bias {
            f("bias", bias);
        }
    }

    fn zero_grads(&mut self) {
        self.weight.grad = None;
        if let Some(bias) = &mut self.bias {
            bias.grad = None;
        }
        self.input.clear();
    }

    fn require_input_grad(&mut self, required: bool) {
        self.input_grad_required = required;
    }

    fn as_conv2d(&self) -> Option<&Conv2d<B>> {
        Some(self)
    }
}
