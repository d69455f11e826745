//! [`GpuBackend`]: construction, information, and the [`Backend`] implementation.

use std::sync::Arc;

use swa_core::backend::{
    Backend, BackendError, BackendResult, BatchNormGrads, BatchNormSaved, Conv2dGrads, Conv2dSpec,
    CrossEntropy, HasShape, SgdStep,
};

use crate::context::{Context, GpuTensor, PoolStats};
use crate::device::{self, GpuOptions};
use crate::tiles::GemmTiles;

/// The WGSL compute backend. Cloning is cheap: clones share one device, buffer pool and pipeline cache.
///
/// Operations are encoded into a batch and run asynchronously; [`Backend::to_host`] and
/// [`Backend::synchronize`] submit the batch and wait. Errors the device reports while running a batch
/// surface as [`BackendError::Device`] from the next of those calls.
#[derive(Clone)]
pub struct GpuBackend {
    pub(crate) ctx: Arc<Context>,
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBackend")
            .field("adapter", &self.ctx.info.name)
            .field("device_type", &self.ctx.info.device_type)
            .field("backend", &self.ctx.info.backend)
            .finish()
    }
}

impl GpuBackend {
    /// Opens the adapter the options select, with the adapter's own limits.
    ///
    /// Fails with [`BackendError::NoDevice`], listing the adapters it saw, when none fits, and with
    /// [`BackendError::InvalidArgument`] when the options' GEMM tiles do not fit the device.
    pub fn new(options: GpuOptions) -> BackendResult<Self> {
        let instance = device::make_instance(options.backends);
        let adapter = device::select_adapter(&instance, &options)?;
        let (device, queue) = device::open_device(&adapter)?;
        Ok(Self {
            ctx: Arc::new(Context::new(&adapter, device, queue, options.gemm_tiles)?),
        })
    }

    /// Opens the adapter named by the `SWA_GPU_ADAPTER` environment variable, or the best one, with the
    /// GEMM tiles of `SWA_GPU_GEMM_TILES` when it is set.
    pub fn from_env() -> BackendResult<Self> {
        Self::new(GpuOptions::from_env()?)
    }

    /// The tile sizes of this device's matrix products.
    pub fn gemm_tiles(&self) -> GemmTiles {
        self.ctx.tiles
    }

    /// The adapter in use.
    pub fn adapter_info(&self) -> wgpu::AdapterInfo {
        self.ctx.info.clone()
    }

    /// The device's limits (the adapter's own).
    pub fn limits(&self) -> wgpu::Limits {
        self.ctx.limits.clone()
    }

    /// Whether the device can time work with timestamp queries (see [`GpuBackend::time_gpu`]).
    pub fn has_timestamp_queries(&self) -> bool {
        self.ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// How much device memory the buffer pool holds.
    pub fn pool_stats(&self) -> PoolStats {
        self.ctx.pool_stats()
    }

    /// Releases the pool's free buffers (for example between training runs of different networks).
    pub fn trim_pool(&self) {
        self.ctx.trim_pool();
    }

    /// The underlying wgpu device and queue, for callers that add their own kernels.
    pub fn device_and_queue(&self) -> (&wgpu::Device, &wgpu::Queue) {
        (&self.ctx.device, &self.ctx.queue)
    }
}

pub(crate) fn same_shape(op: &'static str, a: &GpuTensor, b: &GpuTensor) -> BackendResult<()> {
    if a.dims() == b.dims() {
        Ok(())
    } else {
        Err(BackendError::ShapeMismatch {
            op,
            expected: format!("{:?} (the first operand's shape)", a.dims()),
            got: b.dims().to_vec(),
        })
    }
}

pub(crate) fn u32_extent(op: &'static str, what: &str, value: usize) -> BackendResult<u32> {
    u32::try_from(value).map_err(|_| BackendError::InvalidArgument {
        op,
        message: format!("{what} = {value} exceeds the kernels' 32-bit indexing"),
    })
}

impl Backend for GpuBackend {
    type Tensor = GpuTensor;

    fn name(&self) -> String {
        format!(
            "gpu ({}, {:?})",
            self.ctx.info.name.trim(),
            self.ctx.info.backend
        )
    }

    fn from_host(&self, data: &[f32], shape: &[usize]) -> BackendResult<GpuTensor> {
        let expected: Option<usize> = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if expected != Some(data.len()) {
            return Err(BackendError::ShapeMismatch {
                op: "from_host",
                expected: format!(
                    "{} values for shape {shape:?}",
                    shape.iter().product::<usize>()
                ),
                got: vec![data.len()],
            });
        }
        let tensor = self.ctx.alloc("from_host", shape)?;
        self.ctx
            .upload("from_host", &tensor, bytemuck::cast_slice(data))?;
        Ok(tensor)
    }

    fn zeros(&self, shape: &[usize]) -> BackendResult<GpuTensor> {
        let tensor = self.ctx.alloc("zeros", shape)?;
        self.ctx
            .with_encoder(|encoder| encoder.clear_buffer(&tensor.buffer, 0, None));
        Ok(tensor)
    }

    fn to_host(&self, tensor: &GpuTensor) -> BackendResult<Vec<f32>> {
        let bytes = self
            .ctx
            .download("to_host", &tensor.buffer, tensor.bytes())?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn duplicate(&self, tensor: &GpuTensor) -> BackendResult<GpuTensor> {
        let copy = self.ctx.alloc("duplicate", tensor.dims())?;
        self.copy_buffer(&copy, tensor);
        Ok(copy)
    }

    fn reshape(&self, mut tensor: GpuTensor, shape: &[usize]) -> BackendResult<GpuTensor> {
        let numel: Option<usize> = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(tensor.numel()) {
            return Err(BackendError::ShapeMismatch {
                op: "reshape",
                expected: format!(
                    "{} elements for shape {shape:?}",
                    shape.iter().product::<usize>()
                ),
                got: tensor.dims().to_vec(),
            });
        }
        tensor.shape = shape.to_vec();
        Ok(tensor)
    }

    fn synchronize(&self) -> BackendResult<()> {
        self.ctx.flush();
        self.ctx.wait("synchronize")
    }

    fn fill_(&self, tensor: &mut GpuTensor, value: f32) -> BackendResult<()> {
        self.fill(tensor, value)
    }

    fn copy_(&self, dst: &mut GpuTensor, src: &GpuTensor) -> BackendResult<()> {
        same_shape("copy_", dst, src)?;
        self.copy_buffer(dst, src);
        Ok(())
    }

    fn lerp_(&self, dst: &mut GpuTensor, src: &GpuTensor, weight: f32) -> BackendResult<()> {
        self.lerp_many(&mut [dst], &[src], weight)
    }

    fn lerp_many_(
        &self,
        dsts: &mut [&mut GpuTensor],
        srcs: &[&GpuTensor],
        weight: f32,
    ) -> BackendResult<()> {
        self.lerp_many(dsts, srcs, weight)
    }

    fn axpy_(&self, dst: &mut GpuTensor, alpha: f32, x: &GpuTensor) -> BackendResult<()> {
        self.axpy(dst, alpha, x)
    }

    fn scale_(&self, tensor: &mut GpuTensor, factor: f32) -> BackendResult<()> {
        self.scale(tensor, factor)
    }

    fn sgd_step_(
        &self,
        param: &mut GpuTensor,
        grad: &GpuTensor,
        momentum: &mut GpuTensor,
        step: &SgdStep,
    ) -> BackendResult<()> {
        self.sgd(param, grad, momentum, step)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> BackendResult<GpuTensor> {
        self.binary("add", &crate::kernels::ADD, a, b)
    }

    fn mul(&self, a: &GpuTensor, b: &GpuTensor) -> BackendResult<GpuTensor> {
        self.binary("mul", &crate::kernels::MUL, a, b)
    }

    fn relu(&self, x: &GpuTensor) -> BackendResult<GpuTensor> {
        self.relu_forward(x)
    }

    fn relu_backward(&self, y: &GpuTensor, dy: &GpuTensor) -> BackendResult<GpuTensor> {
        self.binary("relu_backward", &crate::kernels::RELU_BACKWARD, y, dy)
    }

    fn dropout_mask(&self, shape: &[usize], p: f32, seed: u64) -> BackendResult<GpuTensor> {
        self.dropout(shape, p, seed)
    }

    fn matmul(
        &self,
        a: &GpuTensor,
        b: &GpuTensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> BackendResult<GpuTensor> {
        self.matmul_impl(a, b, transpose_a, transpose_b)
    }

    fn add_row_bias_(&self, x: &mut GpuTensor, bias: &GpuTensor) -> BackendResult<()> {
        self.add_row_bias(x, bias)
    }

    fn sum_rows(&self, x: &GpuTensor) -> BackendResult<GpuTensor> {
        self.sum_rows_impl(x)
    }

    fn conv2d(
        &self,
        x: &GpuTensor,
        weight: &GpuTensor,
        bias: Option<&GpuTensor>,
        spec: Conv2dSpec,
    ) -> BackendResult<GpuTensor> {
        self.conv_forward(x, weight, bias, spec)
    }

    fn conv2d_backward(
        &self,
        x: &GpuTensor,
        weight: &GpuTensor,
        dy: &GpuTensor,
        spec: Conv2dSpec,
        need_input_grad: bool,
        need_bias_grad: bool,
    ) -> BackendResult<Conv2dGrads<GpuTensor>> {
        self.conv_backward(x, weight, dy, spec, need_input_grad, need_bias_grad)
    }

    fn batch_norm_train(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        running_mean: &mut GpuTensor,
        running_var: &mut GpuTensor,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(GpuTensor, BatchNormSaved<GpuTensor>)> {
        self.bn_train(x, gamma, beta, running_mean, running_var, momentum, eps)
    }

    fn batch_norm_eval(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        running_mean: &GpuTensor,
        running_var: &GpuTensor,
        eps: f32,
    ) -> BackendResult<GpuTensor> {
        self.bn_eval(x, gamma, beta, running_mean, running_var, eps)
    }

    fn batch_norm_backward(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        saved: &BatchNormSaved<GpuTensor>,
        dy: &GpuTensor,
    ) -> BackendResult<BatchNormGrads<GpuTensor>> {
        self.bn_backward(x, gamma, saved, dy)
    }

    fn max_pool2d(&self, x: &GpuTensor, kernel: usize, stride: usize) -> BackendResult<GpuTensor> {
        self.max_pool(x, kernel, stride)
    }

    fn max_pool2d_backward(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        kernel: usize,
        stride: usize,
    ) -> BackendResult<GpuTensor> {
        self.max_pool_backward(x, dy, kernel, stride)
    }

    fn avg_pool2d(&self, x: &GpuTensor, kernel: usize) -> BackendResult<GpuTensor> {
        self.avg_pool(x, kernel)
    }

    fn avg_pool2d_backward(
        &self,
        dy: &GpuTensor,
        kernel: usize,
        input_shape: &[usize],
    ) -> BackendResult<GpuTensor> {
        self.avg_pool_backward(dy, kernel, input_shape)
    }

    fn softmax_cross_entropy(
        &self,
        logits: &GpuTensor,
        labels: &[u32],
    ) -> BackendResult<CrossEntropy<GpuTensor>> {
        self.cross_entropy(logits, labels)
    }

    fn softmax(&self, logits: &GpuTensor) -> BackendResult<GpuTensor> {
        self.softmax_impl(logits)
    }
}
