//! Backends that wrap another backend and change some of its operations (count them, time them, log
//! them) while every other operation runs on the wrapped backend as it is.
//!
//! A decorator implements [`Decorator`] and, for each operation family it leaves alone, the family's
//! marker trait ([`ForwardElementwise`], …): the family's operations then forward to
//! [`Decorator::inner`]. It implements the families it changes itself. [`Backend`] follows: storage,
//! transfer and in-place updates always forward.

use super::{
    Backend, BackendResult, BatchNormGrads, BatchNormSaved, Conv2dGrads, Conv2dSpec, ConvOps,
    CrossEntropy, DenseOps, ElementwiseOps, LossOps, NormOps, PoolOps, SgdStep,
};

/// A backend that runs on another one, sharing its tensors.
pub trait Decorator: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// The wrapped backend.
    type Inner: Backend;
    /// What the decorator does, for [`Backend::name`]: `"<LABEL> over <inner name>"`.
    const LABEL: &'static str;
    /// The wrapped backend.
    fn inner(&self) -> &Self::Inner;
}

/// The tensor type of a decorator: the wrapped backend's.
type InnerTensor<D> = <<D as Decorator>::Inner as Backend>::Tensor;

/// Forward every [`ElementwiseOps`] operation to [`Decorator::inner`].
pub trait ForwardElementwise: Decorator {}
/// Forward every [`DenseOps`] operation to [`Decorator::inner`].
pub trait ForwardDense: Decorator {}
/// Forward every [`ConvOps`] operation to [`Decorator::inner`].
pub trait ForwardConv: Decorator {}
/// Forward every [`NormOps`] operation to [`Decorator::inner`].
pub trait ForwardNorm: Decorator {}
/// Forward every [`PoolOps`] operation to [`Decorator::inner`].
pub trait ForwardPool: Decorator {}
/// Forward every [`LossOps`] operation to [`Decorator::inner`].
pub trait ForwardLoss: Decorator {}

impl<D> Backend for D
where
    D: Decorator
        + ElementwiseOps<InnerTensor<D>>
        + DenseOps<InnerTensor<D>>
        + ConvOps<InnerTensor<D>>
        + NormOps<InnerTensor<D>>
        + PoolOps<InnerTensor<D>>
        + LossOps<InnerTensor<D>>,
{
    type Tensor = InnerTensor<D>;

    fn name(&self) -> String {
        format!("{} over {}", D::LABEL, self.inner().name())
    }
    fn from_host(&self, data: &[f32], shape: &[usize]) -> BackendResult<Self::Tensor> {
        self.inner().from_host(data, shape)
    }
    fn zeros(&self, shape: &[usize]) -> BackendResult<Self::Tensor> {
        self.inner().zeros(shape)
    }
    fn to_host(&self, tensor: &Self::Tensor) -> BackendResult<Vec<f32>> {
        self.inner().to_host(tensor)
    }
    fn duplicate(&self, tensor: &Self::Tensor) -> BackendResult<Self::Tensor> {
        self.inner().duplicate(tensor)
    }
    fn reshape(&self, tensor: Self::Tensor, shape: &[usize]) -> BackendResult<Self::Tensor> {
        self.inner().reshape(tensor, shape)
    }
    fn synchronize(&self) -> BackendResult<()> {
        self.inner().synchronize()
    }
    fn memory_available(&self) -> Option<u64> {
        self.inner().memory_available()
    }
    fn fill_(&self, tensor: &mut Self::Tensor, value: f32) -> BackendResult<()> {
        self.inner().fill_(tensor, value)
    }
    fn copy_(&self, dst: &mut Self::Tensor, src: &Self::Tensor) -> BackendResult<()> {
        self.inner().copy_(dst, src)
    }
    fn lerp_(&self, dst: &mut Self::Tensor, src: &Self::Tensor, weight: f32) -> BackendResult<()> {
        self.inner().lerp_(dst, src, weight)
    }
    fn lerp_many_(
        &self,
        dsts: &mut [&mut Self::Tensor],
        srcs: &[&Self::Tensor],
        weight: f32,
    ) -> BackendResult<()> {
        self.inner().lerp_many_(dsts, srcs, weight)
    }
    fn axpy_(&self, dst: &mut Self::Tensor, alpha: f32, x: &Self::Tensor) -> BackendResult<()> {
        self.inner().axpy_(dst, alpha, x)
    }
    fn scale_(&self, tensor: &mut Self::Tensor, factor: f32) -> BackendResult<()> {
        self.inner().scale_(tensor, factor)
    }
    fn sgd_step_(
        &self,
        param: &mut Self::Tensor,
        grad: &Self::Tensor,
        momentum: &mut Self::Tensor,
        step: &SgdStep,
    ) -> BackendResult<()> {
        self.inner().sgd_step_(param, grad, momentum, step)
    }
}

impl<D: ForwardElementwise> ElementwiseOps<InnerTensor<D>> for D {
    fn add(&self, a: &InnerTensor<D>, b: &InnerTensor<D>) -> BackendResult<InnerTensor<D>> {
        self.inner().add(a, b)
    }
    fn mul(&self, a: &InnerTensor<D>, b: &InnerTensor<D>) -> BackendResult<InnerTensor<D>> {
        self.inner().mul(a, b)
    }
    fn scale_per_image(
        &self,
        x: &InnerTensor<D>,
        scales: &InnerTensor<D>,
    ) -> BackendResult<InnerTensor<D>> {
        self.inner().scale_per_image(x, scales)
    }
    fn relu(&self, x: &InnerTensor<D>) -> BackendResult<InnerTensor<D>> {
        self.inner().relu(x)
    }
    fn relu_(&self, x: &mut InnerTensor<D>) -> BackendResult<()> {
        self.inner().relu_(x)
    }
    fn relu_backward(
        &self,
        y: &InnerTensor<D>,
        dy: &InnerTensor<D>,
    ) -> BackendResult<InnerTensor<D>> {
        self.inner().relu_backward(y, dy)
    }
    fn dropout_mask(&self, shape: &[usize], p: f32, seed: u64) -> BackendResult<InnerTensor<D>> {
        self.inner().dropout_mask(shape, p, seed)
    }
    fn narrow(
        &self,
        x: &InnerTensor<D>,
        axis: usize,
        start: usize,
        len: usize,
    ) -> BackendResult<InnerTensor<D>> {
        self.inner().narrow(x, axis, start, len)
    }
    fn narrow_assign_(
        &self,
        dst: &mut InnerTensor<D>,
        axis: usize,
        start: usize,
        src: &InnerTensor<D>,
    ) -> BackendResult<()> {
        self.inner().narrow_assign_(dst, axis, start, src)
    }
    fn narrow_add_(
        &self,
        dst: &mut InnerTensor<D>,
        axis: usize,
        start: usize,
        src: &InnerTensor<D>,
    ) -> BackendResult<()> {
        self.inner().narrow_add_(dst, axis, start, src)
    }
}

impl<D: ForwardDense> DenseOps<InnerTensor<D>> for D {
    fn matmul(
        &self,
        a: &InnerTensor<D>,
        b: &InnerTensor<D>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> BackendResult<InnerTensor<D>> {
        self.inner().matmul(a, b, transpose_a, transpose_b)
    }
    fn add_row_bias_(&self, x: &mut InnerTensor<D>, bias: &InnerTensor<D>) -> BackendResult<()> {
        self.inner().add_row_bias_(x, bias)
    }
    fn sum_rows(&self, x: &InnerTensor<D>) -> BackendResult<InnerTensor<D>> {
        self.inner().sum_rows(x)
    }
}

impl<D: ForwardConv> ConvOps<InnerTensor<D>> for D {
    fn conv2d(
        &self,
        x: &InnerTensor<D>,
        weight: &InnerTensor<D>,
        bias: Option<&InnerTensor<D>>,
        spec: Conv2dSpec,
    ) -> BackendResult<InnerTensor<D>> {
        self.inner().conv2d(x, weight, bias, spec)
    }
    fn conv2d_backward(
        &self,
        x: &InnerTensor<D>,
        weight: &InnerTensor<D>,
        dy: &InnerTensor<D>,
        spec: Conv2dSpec,
        need_input_grad: bool,
        need_bias_grad: bool,
    ) -> BackendResult<Conv2dGrads<InnerTensor<D>>> {
        self.inner()
            .conv2d_backward(x, weight, dy, spec, need_input_grad, need_bias_grad)
    }
}

impl<D: ForwardNorm> NormOps<InnerTensor<D>> for D {
    fn batch_norm_train(
        &self,
        x: &InnerTensor<D>,
        gamma: &InnerTensor<D>,
        beta: &InnerTensor<D>,
        running_mean: &mut InnerTensor<D>,
        running_var: &mut InnerTensor<D>,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(InnerTensor<D>, BatchNormSaved<InnerTensor<D>>)> {
        self.inner()
            .batch_norm_train(x, gamma, beta, running_mean, running_var, momentum, eps)
    }
    fn batch_norm_eval(
        &self,
        x: &InnerTensor<D>,
        gamma: &InnerTensor<D>,
        beta: &InnerTensor<D>,
        running_mean: &InnerTensor<D>,
        running_var: &InnerTensor<D>,
        eps: f32,
    ) -> BackendResult<InnerTensor<D>> {
        self.inner()
            .batch_norm_eval(x, gamma, beta, running_mean, running_var, eps)
    }
    fn batch_norm_relu_eval(
        &self,
        x: &InnerTensor<D>,
        gamma: &InnerTensor<D>,
        beta: &InnerTensor<D>,
        running_mean: &InnerTensor<D>,
        running_var: &InnerTensor<D>,
        eps: f32,
    ) -> BackendResult<InnerTensor<D>> {
        self.inner()
            .batch_norm_relu_eval(x, gamma, beta, running_mean, running_var, eps)
    }
    fn batch_norm_backward(
        &self,
        x: &InnerTensor<D>,
        gamma: &InnerTensor<D>,
        saved: &BatchNormSaved<InnerTensor<D>>,
        dy: &InnerTensor<D>,
    ) -> BackendResult<BatchNormGrads<InnerTensor<D>>> {
        self.inner().batch_norm_backward(x, gamma, saved, dy)
    }
    fn batch_norm_relu_train(
        &self,
        x: &InnerTensor<D>,
        gamma: &InnerTensor<D>,
        beta: &InnerTensor<D>,
        running_mean: &mut InnerTensor<D>,
        running_var: &mut InnerTensor<D>,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(InnerTensor<D>, BatchNormSaved<InnerTensor<D>>)> {
        self.inner()
            .batch_norm_relu_train(x, gamma, beta, running_mean, running_var, momentum, eps)
    }
    fn batch_norm_relu_backward(
        &self,
        x: &InnerTensor<D>,
        gamma: &InnerTensor<D>,
        beta: &InnerTensor<D>,
        saved: &BatchNormSaved<InnerTensor<D>>,
        dz: &InnerTensor<D>,
    ) -> BackendResult<BatchNormGrads<InnerTensor<D>>> {
        self.inner()
            .batch_norm_relu_backward(x, gamma, beta, saved, dz)
    }
}

impl<D: ForwardPool> PoolOps<InnerTensor<D>> for D {
    fn max_pool2d(
        &self,
        x: &InnerTensor<D>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> BackendResult<InnerTensor<D>> {
        self.inner().max_pool2d(x, kernel, stride, padding)
    }
    fn max_pool2d_backward(
        &self,
        x: &InnerTensor<D>,
        dy: &InnerTensor<D>,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> BackendResult<InnerTensor<D>> {
        self.inner()
            .max_pool2d_backward(x, dy, kernel, stride, padding)
    }
    fn avg_pool2d(&self, x: &InnerTensor<D>, kernel: usize) -> BackendResult<InnerTensor<D>> {
        self.inner().avg_pool2d(x, kernel)
    }
    fn avg_pool2d_backward(
        &self,
        dy: &InnerTensor<D>,
        kernel: usize,
        input_shape: &[usize],
    ) -> BackendResult<InnerTensor<D>> {
        self.inner().avg_pool2d_backward(dy, kernel, input_shape)
    }
}

impl<D: ForwardLoss> LossOps<InnerTensor<D>> for D {
    fn softmax_cross_entropy(
        &self,
        logits: &InnerTensor<D>,
        labels: &[u32],
    ) -> BackendResult<CrossEntropy<InnerTensor<D>>> {
        self.inner().softmax_cross_entropy(logits, labels)
    }
    fn softmax(&self, logits: &InnerTensor<D>) -> BackendResult<InnerTensor<D>> {
        self.inner().softmax(logits)
    }
}
