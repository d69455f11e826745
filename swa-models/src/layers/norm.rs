//! Batch normalisation over `N, H, W` per channel.

use swa_core::backend::{
    Backend, BackendError, BackendResult, BatchNormGrads, BatchNormSaved, HasShape,
};
use swa_core::params::{NamedTensors, TensorRole};

use super::norm_sync::BatchNormSync;
use super::ForwardCache;
use crate::module::{ForwardInput, ForwardMode, Module, Param};

/// PyTorch's `nn.BatchNorm2d`: parameters `weight` (scale, initially 1) and `bias` (shift, initially 0),
/// buffers `running_mean` (initially 0) and `running_var` (initially 1), and the `num_batches_tracked`
/// counter, visited through [`Module::visit_batch_counters`].
///
/// Training uses the batch statistics and moves the running ones by `momentum` (PyTorch's convention: the
/// weight of the new batch, 0.1 by default); evaluation uses the running statistics. A layer given a
/// [`BatchNormSync`] ([`BatchNorm2d::set_synchronization`]) takes the statistics of its training passes
/// over all ranks' batches of a data-parallel run, as PyTorch's `SyncBatchNorm`.
#[derive(Debug)]
pub struct BatchNorm2d<B: Backend> {
    weight: Param<B>,
    bias: Param<B>,
    running_mean: B::Tensor,
    running_var: B::Tensor,
    num_batches_tracked: u64,
    momentum: f32,
    eps: f32,
    /// The input, its batch statistics, and whether a ReLU fused into the pass followed the
    /// normalisation ([`BatchNorm2d::forward_relu`]).
    cache: ForwardCache<(B::Tensor, BatchNormSaved<B::Tensor>, bool)>,
    /// The ranks whose batches a training pass normalises over; `None` normalises this process's batch.
    synchronization: Option<BatchNormSync>,
}

impl<B: Backend> BatchNorm2d<B> {
    /// PyTorch's default momentum.
    pub const DEFAULT_MOMENTUM: f32 = 0.1;
    /// PyTorch's default epsilon.
    pub const DEFAULT_EPS: f32 = 1e-5;

    /// A freshly initialised layer over `channels` channels with PyTorch's defaults.
    pub fn new(backend: &B, channels: usize) -> BackendResult<Self> {
        if channels == 0 {
            return Err(BackendError::InvalidArgument {
                op: "BatchNorm2d::new",
                message: "the channel count must be positive".into(),
            });
        }
        Ok(Self {
            weight: Param::new(backend.from_host(&vec![1.0; channels], &[channels])?),
            bias: Param::new(backend.zeros(&[channels])?),
            running_mean: backend.zeros(&[channels])?,
            running_var: backend.from_host(&vec![1.0; channels], &[channels])?,
            num_batches_tracked: 0,
            momentum: Self::DEFAULT_MOMENTUM,
            eps: Self::DEFAULT_EPS,
            cache: ForwardCache::new(),
            synchronization: None,
        })
    }

    /// The same layer with another momentum (the weight of a new batch in the running statistics).
    pub fn with_momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }

    /// The same layer with another epsilon.
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// The layer's own momentum, used in [`ForwardMode::Train`].
    pub fn momentum(&self) -> f32 {
        self.momentum
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// The scale and its gradient.
    pub fn weight(&self) -> &Param<B> {
        &self.weight
    }

    /// The shift and its gradient.
    pub fn bias(&self) -> &Param<B> {
        &self.bias
    }

    /// The running mean.
    pub fn running_mean(&self) -> &B::Tensor {
        &self.running_mean
    }

    /// The running (unbiased) variance.
    pub fn running_var(&self) -> &B::Tensor {
        &self.running_var
    }

    /// How many batches have updated the running statistics (PyTorch's `num_batches_tracked`).
    pub fn num_batches_tracked(&self) -> u64 {
        self.num_batches_tracked
    }

    /// Makes training passes ([`ForwardMode::Train`] and their backward passes) normalise over the
    /// batches of `synchronization`'s ranks, or, with `None`, over this process's batch again.
    /// Evaluation and BatchNorm recomputation are not affected.
    pub fn set_synchronization(&mut self, synchronization: Option<BatchNormSync>) {
        self.synchronization = synchronization;
    }

    /// Whether training passes normalise over several ranks' batches.
    pub fn is_synchronized(&self) -> bool {
        self.synchronization.is_some()
    }

    /// The backward pass of [`batch_norm_train`] in [`ForwardMode::Train`].
    fn batch_norm_backward(
        &self,
        backend: &B,
        x: &B::Tensor,
        gamma: &B::Tensor,
        saved: &BatchNormSaved<B::Tensor>,
        dy: &B::Tensor,
    ) -> BackendResult<BatchNormGrads<B::Tensor>> {
        match &self.synchronization {
            Some(sync) => sync.backward(backend, x, gamma, saved, dy),
            None => backend.batch_norm_backward(x, gamma, saved, dy),
        }
    }

    /// This layer in evaluation mode followed by a ReLU, in one pass over `x` (`max(y, 0)` of what
    /// [`ForwardMode::Eval`] gives, element for element); nothing is cached.
    pub fn forward_eval_relu(&self, backend: &B, x: &B::Tensor) -> BackendResult<B::Tensor> {
        backend.batch_norm_relu_eval(
            x,
            &self.weight.value,
            &self.bias.value,
            &self.running_mean,
            &self.running_var,
            self.eps,
        )
    }
}

impl<B: Backend> NamedTensors<B> for BatchNorm2d<B> {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &B::Tensor)) {
        f("weight", TensorRole::Parameter, &self.weight.value);
        f("bias", TensorRole::Parameter, &self.bias.value);
        f(
            "running_mean",
            TensorRole::BatchNormStatistic,
            &self.running_mean,
        );
        f(
            "running_var",
            TensorRole::BatchNormStatistic,
            &self.running_var,
        );
    }

    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut B::Tensor)) {
        f("weight", TensorRole::Parameter, &mut self.weight.value);
        f("bias", TensorRole::Parameter, &mut self.bias.value);
        f(
            "running_mean",
            TensorRole::BatchNormStatistic,
            &mut self.running_mean,
        );
        f(
            "running_var",
            TensorRole::BatchNormStatistic,
            &mut self.running_var,
        );
    }
}

/// A batch norm's output and, when computed from the batch, the batch statistics its backward pass needs.
pub(super) type Normalised<B> = (
    <B as Backend>::Tensor,
    Option<BatchNormSaved<<B as Backend>::Tensor>>,
);

impl<B: Backend> BatchNorm2d<B> {
    /// Normalises `x`; with batch statistics (training and recomputation) also returns them.
    fn normalise(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        mode: ForwardMode,
    ) -> BackendResult<Normalised<B>> {
        let momentum = match mode {
            ForwardMode::Eval => {
                let y = backend.batch_norm_eval(
                    x,
                    &self.weight.value,
                    &self.bias.value,
                    &self.running_mean,
                    &self.running_var,
                    self.eps,
                )?;
                return Ok((y, None));
            }
            ForwardMode::Train { .. } => self.momentum,
            ForwardMode::RecomputeBatchNorm { momentum, .. } => momentum,
        };
        let (y, saved) = batch_norm_train(
            self.synchronization.as_ref(),
            backend,
            x,
            &self.weight.value,
            &self.bias.value,
            &mut self.running_mean,
            &mut self.running_var,
            momentum,
            self.eps,
            mode,
        )?;
        self.num_batches_tracked += 1;
        Ok((y, Some(saved)))
    }
}

impl<B: Backend> BatchNorm2d<B> {
    /// The layer followed by a ReLU, `max(bn(x), 0)`: what a container runs for a BatchNorm directly
    /// followed by a ReLU. With batch statistics it is one pass over the activations
    /// ([`NormOps::batch_norm_relu_train`](swa_core::backend::NormOps::batch_norm_relu_train)), and in
    /// training the ReLU keeps nothing: this layer's [`Module::backward`], given the gradient of the
    /// ReLU's output, recomputes the ReLU's mask from the input it keeps anyway. Outputs, statistics and
    /// gradients are those of the two layers run one after the other, bit for bit.
    pub fn forward_relu(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        if self.synchronization.is_some() && matches!(mode, ForwardMode::Train { .. }) {
            return Err(BackendError::InvalidArgument {
                op: "BatchNorm2d::forward_relu",
                message:
                    "synchronised BatchNorm runs the BatchNorm and its ReLU as separate layers"
                        .into(),
            });
        }
        let momentum = match mode {
            ForwardMode::Eval => return self.forward_eval_relu(backend, x.tensor()),
            ForwardMode::Train { .. } => self.momentum,
            ForwardMode::RecomputeBatchNorm { momentum, .. } => momentum,
        };
        let (z, saved) = backend.batch_norm_relu_train(
            x.tensor(),
            &self.weight.value,
            &self.bias.value,
            &mut self.running_mean,
            &mut self.running_var,
            momentum,
            self.eps,
        )?;
        self.num_batches_tracked += 1;
        self.cache
            .try_keep_with(mode, || Ok((x.into_owned(backend)?, saved, true)))?;
        Ok(z)
    }
}

/// Training-mode batch norm, over the ranks' batches when `synchronization` is given and `mode` is
/// [`ForwardMode::Train`]; otherwise the backend's, unchanged.
#[allow(clippy::too_many_arguments)]
fn batch_norm_train<B: Backend>(
    synchronization: Option<&BatchNormSync>,
    backend: &B,
    x: &B::Tensor,
    gamma: &B::Tensor,
    beta: &B::Tensor,
    running_mean: &mut B::Tensor,
    running_var: &mut B::Tensor,
    momentum: f32,
    eps: f32,
    mode: ForwardMode,
) -> BackendResult<(B::Tensor, BatchNormSaved<B::Tensor>)> {
    match (synchronization, mode) {
        (Some(sync), ForwardMode::Train { .. }) => sync.train(
            backend,
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            momentum,
            eps,
        ),
        _ => backend.batch_norm_train(x, gamma, beta, running_mean, running_var, momentum, eps),
    }
}

/// Adds `g` to the slice of a parameter's gradient along `axis` from `start`, starting from zeros of
/// the parameter's shape when it has no gradient yet.
pub(super) fn accumulate_grad_slice<B: Backend>(
    backend: &B,
    param: &mut Param<B>,
    axis: usize,
    start: usize,
    g: &B::Tensor,
) -> BackendResult<()> {
    let grad = match &mut param.grad {
        Some(grad) => grad,
        None => param.grad.insert(backend.zeros(param.value.dims())?),
    };
    backend.narrow_add_(grad, axis, start, g)
}

/// The parameters or statistics of the channels `start..start + len`.
fn channel_slice<B: Backend>(
    backend: &B,
    tensor: &B::Tensor,
    start: usize,
    len: usize,
) -> BackendResult<B::Tensor> {
    backend.narrow(tensor, 0, start, len)
}

impl<B: Backend> BatchNorm2d<B> {
    /// Normalises `x`, which holds the channels `start..start + c` of this layer's input (`c` = `x`'s
    /// channel count), with those channels' scale, shift and statistics: the layer applied to a
    /// concatenation, one piece at a time (each channel's normalisation depends on that channel
    /// alone). In the modes with batch statistics the running statistics of those channels move as a
    /// whole pass would move them; the batch counter does not (the caller counts the pass once, with
    /// [`BatchNorm2d::count_batch`]). Returns the batch statistics of the piece in those modes.
    pub(super) fn normalise_channels(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        start: usize,
        mode: ForwardMode,
    ) -> BackendResult<Normalised<B>> {
        let channels = x.dims().get(1).copied().unwrap_or(0);
        let gamma = channel_slice(backend, &self.weight.value, start, channels)?;
        let beta = channel_slice(backend, &self.bias.value, start, channels)?;
        let mut mean = channel_slice(backend, &self.running_mean, start, channels)?;
        let mut var = channel_slice(backend, &self.running_var, start, channels)?;
        let momentum = match mode {
            ForwardMode::Eval => {
                let y = backend.batch_norm_eval(x, &gamma, &beta, &mean, &var, self.eps)?;
                return Ok((y, None));
            }
            ForwardMode::Train { .. } => self.momentum,
            ForwardMode::RecomputeBatchNorm { momentum, .. } => momentum,
        };
        let (y, saved) = batch_norm_train(
            self.synchronization.as_ref(),
            backend,
            x,
            &gamma,
            &beta,
            &mut mean,
            &mut var,
            momentum,
            self.eps,
            mode,
        )?;
        backend.narrow_assign_(&mut self.running_mean, 0, start, &mean)?;
        backend.narrow_assign_(&mut self.running_var, 0, start, &var)?;
        Ok((y, Some(saved)))
    }

    /// Counts one pass with batch statistics in `num_batches_tracked`, after a pass made of
    /// [`BatchNorm2d::normalise_channels`] calls.
    pub(super) fn count_batch(&mut self, mode: ForwardMode) {
        if mode != ForwardMode::Eval {
            self.num_batches_tracked += 1;
        }
    }

    /// The backward pass of [`BatchNorm2d::normalise_channels`] for the piece `x` from channel `start`
    /// with its batch statistics `saved`: accumulates the gradients of those channels' scale and shift
    /// and returns the piece's input gradient.
    pub(super) fn backward_channels(
        &mut self,
        backend: &B,
        x: &B::Tensor,
        start: usize,
        saved: &BatchNormSaved<B::Tensor>,
        dy: &B::Tensor,
    ) -> BackendResult<B::Tensor> {
        let channels = x.dims().get(1).copied().unwrap_or(0);
        let gamma = channel_slice(backend, &self.weight.value, start, channels)?;
        let grads = self.batch_norm_backward(backend, x, &gamma, saved, dy)?;
        accumulate_grad_slice(backend, &mut self.weight, 0, start, &grads.gamma)?;
        accumulate_grad_slice(backend, &mut self.bias, 0, start, &grads.beta)?;
        Ok(grads.input)
    }
}

impl<B: Backend> Module<B> for BatchNorm2d<B> {
    fn forward_input(
        &mut self,
        backend: &B,
        x: ForwardInput<'_, B>,
        mode: ForwardMode,
    ) -> BackendResult<B::Tensor> {
        let (y, batch_statistics) = self.normalise(backend, x.tensor(), mode)?;
        if let Some(saved) = batch_statistics {
            self.cache
                .try_keep_with(mode, || Ok((x.into_owned(backend)?, saved, false)))?;
        }
        Ok(y)
    }

    /// Back-propagates the gradient of this layer's output, or after [`BatchNorm2d::forward_relu`] of
    /// the ReLU's output.
    fn backward(&mut self, backend: &B, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        let (x, saved, relu) = self.cache.take("BatchNorm2d::backward")?;
        let grads = if relu {
            backend.batch_norm_relu_backward(
                &x,
                &self.weight.value,
                &self.bias.value,
                &saved,
                dy,
            )?
        } else {
            self.batch_norm_backward(backend, &x, &self.weight.value, &saved, dy)?
        };
        self.weight.accumulate_grad(backend, grads.gamma)?;
        self.bias.accumulate_grad(backend, grads.beta)?;
        Ok(grads.input)
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&str, &mut Param<B>)) {
        f("weight", &mut self.weight);
        f("bias", &mut self.bias);
    }

    fn zero_grads(&mut self) {
        self.weight.grad = None;
        self.bias.grad = None;
        self.cache.clear();
    }

    fn visit_batch_counters(&self, f: &mut dyn FnMut(&str, u64)) {
        f("num_batches_tracked", self.num_batches_tracked);
    }

    fn visit_batch_counters_mut(&mut self, f: &mut dyn FnMut(&str, &mut u64)) {
        f("num_batches_tracked", &mut self.num_batches_tracked);
    }

    fn as_batch_norm(&self) -> Option<&BatchNorm2d<B>> {
        Some(self)
    }

    fn as_batch_norm_mut(&mut self) -> Option<&mut BatchNorm2d<B>> {
        Some(self)
    }

    fn visit_batch_norms_mut(&mut self, f: &mut dyn FnMut(&mut BatchNorm2d<B>)) {
        f(self);
    }
}
