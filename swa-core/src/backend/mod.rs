//! The tensor backend: every operation that training, averaging and evaluation need, behind one trait.
//!
//! Tensors are handles owned by a backend. On the CPU a handle is the `ndarray` array itself; on a GPU it
//! names a device buffer, and operations may run asynchronously: [`Backend::to_host`] is the one explicit
//! point where values come back, and [`Backend::synchronize`] waits for queued work. Handles are not
//! `Clone`, because a copied GPU handle would alias the same buffer: deep copies go through
//! [`Backend::duplicate`].
//!
//! All tensors are `f32`, row-major; images are `NCHW`. Convolution weights are `[out, in, kh, kw]` and
//! linear weights `[out, in]`, the layouts of PyTorch, so that checkpoints are interchangeable.
//!
//! The reference semantics of every operation are those of [`cpu::CpuBackend`]; other backends are tested
//! against it.

#[cfg(feature = "cpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "cpu")))]
pub mod cpu;
mod decorator;

pub use decorator::{
    Decorator, ForwardConv, ForwardDense, ForwardElementwise, ForwardLoss, ForwardNorm, ForwardPool,
};

/// The [`Backend`] trait with its operation families and [`HasShape`], for code that calls operations
/// on a concrete backend: `use swa_core::backend::prelude::*;`.
pub mod prelude {
    pub use super::{
        Backend, ConvOps, DenseOps, ElementwiseOps, HasShape, LossOps, NormOps, PoolOps,
    };
}

use serde::{Deserialize, Serialize};

/// Errors raised by backend operations. Shape errors name the operation and both shapes.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum BackendError {
    /// Operands whose shapes do not fit the operation.
    #[error("{op}: shape mismatch: expected {expected}, got {got:?}")]
    ShapeMismatch {
        /// The operation that was called.
        op: &'static str,
        /// What the operation expected, in words.
        expected: String,
        /// The shape it was given.
        got: Vec<usize>,
    },
    /// An argument outside its valid range (a stride of 0, a label out of range, …).
    #[error("{op}: invalid argument: {message}")]
    InvalidArgument {
        /// The operation that was called.
        op: &'static str,
        /// What was wrong and what was expected.
        message: String,
    },
    /// The backend has no device to run on (for example, no GPU adapter).
    #[error("no device available: {0}")]
    NoDevice(String),
    /// The device failed while running an operation (out of memory, device lost, …).
    #[error("device error: {0}")]
    Device(String),
}

/// Result of backend operations.
pub type BackendResult<T> = Result<T, BackendError>;

/// Anything that knows its own shape.
pub trait HasShape {
    /// The tensor's dimensions, outermost first.
    fn dims(&self) -> &[usize];
    /// The number of elements.
    fn numel(&self) -> usize {
        self.dims().iter().product()
    }
}

/// Geometry of a 2-D convolution with square kernels (the only kind the paper's networks use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conv2dSpec {
    /// Step between output positions, in input pixels.
    pub stride: usize,
    /// Zero padding added on every side of the input.
    pub padding: usize,
}

impl Conv2dSpec {
    /// Output height or width for an input extent and a kernel extent.
    pub fn output_extent(&self, input: usize, kernel: usize) -> Option<usize> {
        let padded = input + 2 * self.padding;
        if self.stride == 0 || padded < kernel {
            return None;
        }
        Some((padded - kernel) / self.stride + 1)
    }
}

/// Gradients of a convolution with respect to its input, weight and bias.
#[derive(Debug)]
pub struct Conv2dGrads<T> {
    /// Gradient with respect to the input, when it was asked for (the first layer does not need it).
    pub input: Option<T>,
    /// Gradient with respect to the weight, same shape as the weight.
    pub weight: T,
    /// Gradient with respect to the bias, when the layer has one.
    pub bias: Option<T>,
}

/// Per-channel statistics of a training-mode batch norm, kept for its backward pass.
#[derive(Debug)]
pub struct BatchNormSaved<T> {
    /// Batch mean per channel, `[C]`.
    pub mean: T,
    /// `1 / sqrt(biased batch variance + eps)` per channel, `[C]`.
    pub inv_std: T,
}

/// Gradients of batch norm.
#[derive(Debug)]
pub struct BatchNormGrads<T> {
    /// Gradient with respect to the input.
    pub input: T,
    /// Gradient with respect to the scale (`weight` in PyTorch), `[C]`.
    pub gamma: T,
    /// Gradient with respect to the shift (`bias` in PyTorch), `[C]`.
    pub beta: T,
}

/// Loss and gradient of the mean softmax cross-entropy over a batch.
#[derive(Debug)]
pub struct CrossEntropy<T> {
    /// The mean loss, a tensor of shape `[1]` so that reading it back stays explicit.
    pub loss: T,
    /// Gradient of the mean loss with respect to the logits, `[N, classes]`.
    pub grad: T,
}

/// Hyper-parameters of one SGD step, with PyTorch's semantics:
/// `d = g + wd·p; buf = momentum·buf + (1 − dampening)·d; d = nesterov ? d + momentum·buf : buf; p −= lr·d`.
///
/// A momentum buffer that starts at zero gives PyTorch's first step exactly when `dampening` is 0.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdStep {
    /// Learning rate of this step.
    pub lr: f32,
    /// Momentum factor.
    pub momentum: f32,
    /// L2 penalty added to the gradient.
    pub weight_decay: f32,
    /// Dampening of the momentum buffer's update.
    pub dampening: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// The tensor operations that training, averaging and evaluation need.
///
/// The trait itself holds what the averages and the optimiser use: creation, transfer and the in-place
/// updates of weights. The operations of network layers come in families, one supertrait each, so that a
/// backend implements every family in the module that holds its kernels: [`ElementwiseOps`],
/// [`DenseOps`], [`ConvOps`], [`NormOps`], [`PoolOps`] and [`LossOps`]. Code generic over `B: Backend`
/// calls all of them; code that names a concrete backend imports the families with [`prelude`].
///
/// Implementations must be deterministic: the same inputs and seeds give the same outputs (bit-identical
/// on the CPU for a fixed thread count).
pub trait Backend:
    Clone
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
    + ElementwiseOps<<Self as Backend>::Tensor>
    + DenseOps<<Self as Backend>::Tensor>
    + ConvOps<<Self as Backend>::Tensor>
    + NormOps<<Self as Backend>::Tensor>
    + PoolOps<<Self as Backend>::Tensor>
    + LossOps<<Self as Backend>::Tensor>
{
    /// A handle to a tensor owned by this backend.
    type Tensor: HasShape + std::fmt::Debug + Send + Sync;

    /// A short human-readable name (for logs and benchmark tables), e.g. `cpu (2 threads)`.
    fn name(&self) -> String;

    // ---------------------------------------------------------------- creation and transfer

    /// Uploads host values (row-major) as a tensor of `shape`.
    // `from_host` names the direction of the transfer, the twin of `to_host`; it needs the backend (`self`).
    #[allow(clippy::wrong_self_convention)]
    fn from_host(&self, data: &[f32], shape: &[usize]) -> BackendResult<Self::Tensor>;
    /// A tensor of zeros.
    fn zeros(&self, shape: &[usize]) -> BackendResult<Self::Tensor>;
    /// Reads a tensor back to the host, waiting for any queued work that writes it.
    fn to_host(&self, tensor: &Self::Tensor) -> BackendResult<Vec<f32>>;
    /// A deep copy.
    fn duplicate(&self, tensor: &Self::Tensor) -> BackendResult<Self::Tensor>;
    /// The same values under another shape with the same number of elements.
    fn reshape(&self, tensor: Self::Tensor, shape: &[usize]) -> BackendResult<Self::Tensor>;
    /// Waits until all queued work has finished.
    fn synchronize(&self) -> BackendResult<()>;
    /// Bytes the backend can still allocate, when it can tell (for callers that refuse work that would
    /// not fit, such as SWAG's `K + 2` copies of the parameters, before spending time on it). `None`, the
    /// default, means unknown: the allocation itself then reports running out.
    fn memory_available(&self) -> Option<u64> {
        None
    }

    // ---------------------------------------------------------------- in-place updates

    /// Sets every element to `value`.
    fn fill_(&self, tensor: &mut Self::Tensor, value: f32) -> BackendResult<()>;
    /// `dst = src`.
    fn copy_(&self, dst: &mut Self::Tensor, src: &Self::Tensor) -> BackendResult<()>;
    /// `dst += weight · (src − dst)`: the SWA running mean (`weight = 1/(n+1)`), EMA (`weight = 1 − decay`)
    /// and the merge of two averages all reduce to it.
    fn lerp_(&self, dst: &mut Self::Tensor, src: &Self::Tensor, weight: f32) -> BackendResult<()>;
    /// [`Backend::lerp_`] over many tensor pairs with one weight. Backends may fuse this into one pass.
    fn lerp_many_(
        &self,
        dsts: &mut [&mut Self::Tensor],
        srcs: &[&Self::Tensor],
        weight: f32,
    ) -> BackendResult<()> {
        same_pair_count("lerp_many_", dsts.len(), srcs.len())?;
        for (dst, src) in dsts.iter_mut().zip(srcs) {
            self.lerp_(dst, src, weight)?;
        }
        Ok(())
    }
    /// `dst += alpha · x`.
    fn axpy_(&self, dst: &mut Self::Tensor, alpha: f32, x: &Self::Tensor) -> BackendResult<()>;
    /// `tensor *= factor`.
    fn scale_(&self, tensor: &mut Self::Tensor, factor: f32) -> BackendResult<()>;
    /// One fused SGD step on a parameter, its gradient and its momentum buffer (see [`SgdStep`]).
    fn sgd_step_(
        &self,
        param: &mut Self::Tensor,
        grad: &Self::Tensor,
        momentum: &mut Self::Tensor,
        step: &SgdStep,
    ) -> BackendResult<()>;
}

/// A slice along one axis of a tensor: the tensor seen as `[outer, extent, inner]` around the axis, and
/// the indices `start..start + len` of `extent`. The geometry of [`ElementwiseOps::narrow`] and of the
/// writes into a slice, checked once for every backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisSlice {
    /// The product of the dimensions before the axis.
    pub outer: usize,
    /// The tensor's extent along the axis.
    pub extent: usize,
    /// The product of the dimensions after the axis.
    pub inner: usize,
    /// The first index of the slice along the axis.
    pub start: usize,
    /// The slice's extent along the axis.
    pub len: usize,
}

impl AxisSlice {
    /// The slice `start..start + len` along `axis` of a tensor of shape `dims`; an error naming `op`
    /// when the axis or the range falls outside the shape.
    pub fn new(
        op: &'static str,
        dims: &[usize],
        axis: usize,
        start: usize,
        len: usize,
    ) -> BackendResult<Self> {
        let Some(&extent) = dims.get(axis) else {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!("axis {axis} of a tensor of shape {dims:?}"),
            });
        };
        if start.checked_add(len).is_none_or(|end| end > extent) {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!(
                    "indices {start}..{start}+{len} along axis {axis} of a tensor of shape {dims:?}"
                ),
            });
        }
        Ok(Self {
            outer: dims[..axis].iter().product(),
            extent,
            inner: dims[axis + 1..].iter().product(),
            start,
            len,
        })
    }

    /// The slice of a tensor of shape `dst` along `axis` from `start` that a tensor of shape `src`
    /// fills: `src` must have `dst`'s shape except along the axis.
    pub fn filled_by(
        op: &'static str,
        dst: &[usize],
        axis: usize,
        start: usize,
        src: &[usize],
    ) -> BackendResult<Self> {
        let len = src.get(axis).copied().unwrap_or(0);
        let fits = src.len() == dst.len()
            && src
                .iter()
                .zip(dst)
                .enumerate()
                .all(|(i, (s, d))| i == axis || s == d);
        if !fits {
            let mut expected = dst.to_vec();
            if let Some(extent) = expected.get_mut(axis) {
                *extent = len;
            }
            return Err(BackendError::ShapeMismatch {
                op,
                expected: format!("{expected:?} (the destination's shape but along axis {axis})"),
                got: src.to_vec(),
            });
        }
        Self::new(op, dst, axis, start, len)
    }

    /// The number of elements in the slice.
    pub fn numel(&self) -> usize {
        self.outer * self.len * self.inner
    }
}

/// An error naming `op` unless an operation over pairs got as many destinations as sources
/// ([`Backend::lerp_many_`]).
pub fn same_pair_count(op: &'static str, dsts: usize, srcs: usize) -> BackendResult<()> {
    if dsts == srcs {
        Ok(())
    } else {
        Err(BackendError::InvalidArgument {
            op,
            message: format!("{dsts} destinations but {srcs} sources"),
        })
    }
}

/// The number of elements per image of a tensor of shape `x` scaled by a per-image vector of shape
/// `scales` ([`ElementwiseOps::scale_per_image`]): an error naming `op` unless `scales` is `[N]` for an
/// `x` of shape `[N, …]`.
pub fn per_image_extent(op: &'static str, x: &[usize], scales: &[usize]) -> BackendResult<usize> {
    match (x.split_first(), scales) {
        (Some((&images, rest)), &[count]) if count == images => Ok(rest.iter().product()),
        _ => Err(BackendError::ShapeMismatch {
            op,
            expected: format!(
                "one scale per image of a tensor of shape {x:?}: [{}]",
                x.first().copied().unwrap_or(0)
            ),
            got: scales.to_vec(),
        }),
    }
}

/// Element-wise operations of network layers on tensors `T`, producing new tensors, and the copies of
/// slices along one axis that let a layer read and write channel ranges of a concatenation (the dense
/// blocks of DenseNet) and of the parameters acting on them.
pub trait ElementwiseOps<T> {
    /// `a + b` (same shapes): residual connections.
    fn add(&self, a: &T, b: &T) -> BackendResult<T>;
    /// `a ⊙ b` (same shapes): dropout masks.
    fn mul(&self, a: &T, b: &T) -> BackendResult<T>;
    /// `x` with every element of image `n` (index `n` along the leading axis) multiplied by
    /// `scales[n]`; `scales` has shape `[N]` for an `x` of shape `[N, …]`. Shake-Shake's per-image
    /// mixing coefficients, in one pass and without a broadcast tensor.
    fn scale_per_image(&self, x: &T, scales: &T) -> BackendResult<T>;
    /// `max(x, 0)`.
    fn relu(&self, x: &T) -> BackendResult<T>;
    /// [`ElementwiseOps::relu`] in place, for a pass that keeps nothing for a backward pass: no second
    /// tensor is allocated and written.
    fn relu_(&self, x: &mut T) -> BackendResult<()>;
    /// `dy` where the ReLU's output `y` is positive, else 0.
    fn relu_backward(&self, y: &T, dy: &T) -> BackendResult<T>;
    /// A dropout mask of `shape`: each element is `1/(1−p)` when [`dropout_keeps`] keeps it, else 0.
    /// Counter-based, so every backend draws the same mask from the same seed.
    fn dropout_mask(&self, shape: &[usize], p: f32, seed: u64) -> BackendResult<T>;
    /// A copy of the elements of `x` whose index along `axis` lies in `start..start + len` (PyTorch's
    /// `x.narrow(axis, start, len).contiguous()`).
    fn narrow(&self, x: &T, axis: usize, start: usize, len: usize) -> BackendResult<T>;
    /// Writes `src` into the slice of `dst` along `axis` that starts at `start` and is as long as `src`
    /// is along the axis (PyTorch's `dst.narrow(axis, start, len).copy_(src)`); `src` has `dst`'s shape
    /// on every other axis.
    fn narrow_assign_(&self, dst: &mut T, axis: usize, start: usize, src: &T) -> BackendResult<()>;
    /// Adds `src` to that slice of `dst` instead (`dst.narrow(axis, start, len).add_(src)`).
    fn narrow_add_(&self, dst: &mut T, axis: usize, start: usize, src: &T) -> BackendResult<()>;
}

/// Dense layers on tensors `T`.
pub trait DenseOps<T> {
    /// Matrix product of 2-D tensors: `op(a) · op(b)`, where `op` transposes when asked.
    fn matmul(&self, a: &T, b: &T, transpose_a: bool, transpose_b: bool) -> BackendResult<T>;
    /// `x[n, j] += bias[j]` for a 2-D `x`.
    fn add_row_bias_(&self, x: &mut T, bias: &T) -> BackendResult<()>;
    /// Column sums of a 2-D tensor: `[n, m] → [m]` (the gradient of a row bias).
    fn sum_rows(&self, x: &T) -> BackendResult<T>;
}

/// Convolutions on tensors `T`.
pub trait ConvOps<T> {
    /// 2-D convolution (cross-correlation, as in PyTorch) of `x: [N, Cin, H, W]` with
    /// `weight: [Cout, Cin, K, K]` and an optional `bias: [Cout]`.
    fn conv2d(&self, x: &T, weight: &T, bias: Option<&T>, spec: Conv2dSpec) -> BackendResult<T>;
    /// Gradients of [`ConvOps::conv2d`] given the output gradient `dy`.
    fn conv2d_backward(
        &self,
        x: &T,
        weight: &T,
        dy: &T,
        spec: Conv2dSpec,
        need_input_grad: bool,
        need_bias_grad: bool,
    ) -> BackendResult<Conv2dGrads<T>>;
}

/// Batch norm on tensors `T`, over N, H and W per channel.
pub trait NormOps<T> {
    /// Training-mode batch norm of `x: [N, C, H, W]` (or `[N, C]`): normalises with the batch statistics and
    /// updates the running statistics in place, as PyTorch does:
    /// `running = (1 − momentum)·running + momentum·batch`, the variance unbiased (`n/(n−1)`).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train(
        &self,
        x: &T,
        gamma: &T,
        beta: &T,
        running_mean: &mut T,
        running_var: &mut T,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(T, BatchNormSaved<T>)>;
    /// Evaluation-mode batch norm with the running statistics.
    fn batch_norm_eval(
        &self,
        x: &T,
        gamma: &T,
        beta: &T,
        running_mean: &T,
        running_var: &T,
        eps: f32,
    ) -> BackendResult<T>;
    /// `max(batch_norm_eval(x, …), 0)` in one pass over `x`: an evaluation-mode batch norm followed by a
    /// ReLU, as pre-activation blocks run them, without the intermediate tensor. Equal, element for
    /// element, to [`NormOps::batch_norm_eval`] followed by [`ElementwiseOps::relu`].
    fn batch_norm_relu_eval(
        &self,
        x: &T,
        gamma: &T,
        beta: &T,
        running_mean: &T,
        running_var: &T,
        eps: f32,
    ) -> BackendResult<T>;
    /// Gradients of training-mode batch norm.
    fn batch_norm_backward(
        &self,
        x: &T,
        gamma: &T,
        saved: &BatchNormSaved<T>,
        dy: &T,
    ) -> BackendResult<BatchNormGrads<T>>;
    /// [`NormOps::batch_norm_train`] followed by a ReLU, `max(bn(x), 0)`, in one pass over the batch:
    /// the same values as the two ops bit for bit, without writing and reading back the intermediate.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu_train(
        &self,
        x: &T,
        gamma: &T,
        beta: &T,
        running_mean: &mut T,
        running_var: &mut T,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(T, BatchNormSaved<T>)>;
    /// Gradients of [`NormOps::batch_norm_relu_train`] from the gradient `dz` of its output. The ReLU's
    /// mask is recomputed from the BatchNorm's input, scale, shift and batch statistics, exactly as the
    /// forward pass computed it, so a layer keeps only that input for both: one activation fewer than a
    /// BatchNorm and a ReLU each keeping their own, and the same gradients bit for bit.
    fn batch_norm_relu_backward(
        &self,
        x: &T,
        gamma: &T,
        beta: &T,
        saved: &BatchNormSaved<T>,
        dz: &T,
    ) -> BackendResult<BatchNormGrads<T>>;
}

/// Pooling on tensors `T`.
pub trait PoolOps<T> {
    /// Max pooling with a square window `kernel`, step `stride` and `padding` on every side, as PyTorch's
    /// `max_pool2d` (floor mode): the padding never wins a window, and is at most half the window so that
    /// every window holds at least one input.
    fn max_pool2d(&self, x: &T, kernel: usize, stride: usize, padding: usize) -> BackendResult<T>;
    /// Gradient of max pooling: each window's `dy` goes to the first position holding the window's maximum.
    fn max_pool2d_backward(
        &self,
        x: &T,
        dy: &T,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> BackendResult<T>;
    /// Average pooling with a square window `kernel` and step `kernel`, no padding.
    fn avg_pool2d(&self, x: &T, kernel: usize) -> BackendResult<T>;
    /// Gradient of average pooling, for an input of `input_shape`.
    fn avg_pool2d_backward(&self, dy: &T, kernel: usize, input_shape: &[usize])
        -> BackendResult<T>;
}

/// Losses and predictions on tensors `T`.
pub trait LossOps<T> {
    /// Mean softmax cross-entropy of `logits: [N, classes]` against `labels` (one per row), and its gradient.
    fn softmax_cross_entropy(&self, logits: &T, labels: &[u32]) -> BackendResult<CrossEntropy<T>>;
    /// Row-wise softmax of `logits: [N, classes]` (for ensembling predictions).
    fn softmax(&self, logits: &T) -> BackendResult<T>;
}

/// Whether dropout keeps element `index` for `seed` and drop probability `p`.
///
/// A counter-based hash (PCG's output permutation), so that the CPU and the GPU draw identical masks with no
/// shared generator state. The GPU kernels implement the same arithmetic in WGSL.
pub fn dropout_keeps(seed: u64, index: u32, p: f32) -> bool {
    let stream = pcg_hash((seed as u32) ^ pcg_hash((seed >> 32) as u32));
    let h = pcg_hash(index ^ stream);
    // 24 high bits give a uniform in [0, 1) exactly representable in f32.
    ((h >> 8) as f32) * (1.0 / 16_777_216.0) >= p
}

/// PCG-RXS-M-XS 32-bit hash (Jarzynski & Olano, "Hash Functions for GPU Rendering", 2020).
pub fn pcg_hash(input: u32) -> u32 {
    let state = input.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}
