//! [`GpuBackend`]: construction, information, and the [`Backend`] implementation.

use std::sync::Arc;

use swa_core::backend::{same_pair_count, Backend, BackendError, BackendResult, HasShape, SgdStep};

use crate::context::{Context, Dispatch, GpuTensor, Params, PoolStats, Variant};
use crate::device::{self, GpuOptions};
use crate::kernels;
use crate::tiles::GemmTiles;
use crate::uniforms::{ElementwiseParams, LerpManyParams};

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
        let n = tensor.numel();
        if n == 0 {
            return Ok(());
        }
        let params = Params::of(&ElementwiseParams {
            a: value,
            ..ElementwiseParams::count("fill_", n)?
        });
        self.ctx.encode(&[Dispatch::new(
            &kernels::FILL,
            params,
            vec![tensor],
            self.ctx.grid_1d(n),
        )])
    }

    fn copy_(&self, dst: &mut GpuTensor, src: &GpuTensor) -> BackendResult<()> {
        same_shape("copy_", dst, src)?;
        self.copy_buffer(dst, src);
        Ok(())
    }

    fn lerp_(&self, dst: &mut GpuTensor, src: &GpuTensor, weight: f32) -> BackendResult<()> {
        self.lerp_many_(&mut [dst], &[src], weight)
    }

    /// The SWA update over all pairs: up to eight pairs per dispatch, bound side by side and treated as
    /// one concatenated range, and all dispatches in one compute pass with no submission in between.
    fn lerp_many_(
        &self,
        dsts: &mut [&mut GpuTensor],
        srcs: &[&GpuTensor],
        weight: f32,
    ) -> BackendResult<()> {
        let op = "lerp_many_";
        same_pair_count(op, dsts.len(), srcs.len())?;
        let mut pairs = Vec::with_capacity(dsts.len());
        for (dst, src) in dsts.iter().zip(srcs) {
            same_shape("lerp_", dst, src)?;
            if dst.numel() > 0 {
                pairs.push((&**dst, *src));
            }
        }
        let per_dispatch = (self.ctx.limits.max_storage_buffers_per_shader_stage as usize / 2)
            .clamp(1, kernels::LERP_MANY_MAX_PAIRS);
        let mut dispatches = Vec::new();
        let mut rest = &pairs[..];
        while !rest.is_empty() {
            // Take pairs while the concatenated count stays within 32-bit indexing.
            let mut take = 0;
            let mut total = 0usize;
            while take < per_dispatch.min(rest.len()) {
                let next = total + rest[take].0.numel();
                if take > 0 && next > u32::MAX as usize {
                    break;
                }
                total = next;
                take += 1;
            }
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let mut uniform = LerpManyParams {
                weight,
                total: u32_extent(op, "element count", total)?,
                pairs: take as u32,
                ..LerpManyParams::default()
            };
            let mut end = 0usize;
            let mut buffers = Vec::with_capacity(2 * take);
            for (i, (dst, src)) in chunk.iter().enumerate() {
                end += dst.numel();
                uniform.ends[i / 4][i % 4] = end as u32;
                buffers.push(*dst);
                buffers.push(*src);
            }
            let params = Params::of(&uniform);
            let mut dispatch = Dispatch::new(
                &kernels::LERP_MANY_KERNELS[take - 1],
                params,
                buffers,
                self.ctx.grid_1d(total),
            );
            dispatch.variant = Variant::LerpMany { pairs: take };
            dispatches.push(dispatch);
        }
        self.ctx.encode(&dispatches)
    }

    fn axpy_(&self, dst: &mut GpuTensor, alpha: f32, x: &GpuTensor) -> BackendResult<()> {
        same_shape("axpy_", dst, x)?;
        let n = dst.numel();
        if n == 0 {
            return Ok(());
        }
        let params = Params::of(&ElementwiseParams {
            a: alpha,
            ..ElementwiseParams::count("axpy_", n)?
        });
        self.ctx.encode(&[Dispatch::new(
            &kernels::AXPY,
            params,
            vec![dst, x],
            self.ctx.grid_1d(n),
        )])
    }

    fn scale_(&self, tensor: &mut GpuTensor, factor: f32) -> BackendResult<()> {
        let n = tensor.numel();
        if n == 0 {
            return Ok(());
        }
        let params = Params::of(&ElementwiseParams {
            a: factor,
            ..ElementwiseParams::count("scale_", n)?
        });
        self.ctx.encode(&[Dispatch::new(
            &kernels::SCALE,
            params,
            vec![tensor],
            self.ctx.grid_1d(n),
        )])
    }

    fn sgd_step_(
        &self,
        param: &mut GpuTensor,
        grad: &GpuTensor,
        momentum: &mut GpuTensor,
        step: &SgdStep,
    ) -> BackendResult<()> {
        same_shape("sgd_step_", param, grad)?;
        same_shape("sgd_step_", param, momentum)?;
        let n = param.numel();
        if n == 0 {
            return Ok(());
        }
        let params = Params::of(&ElementwiseParams {
            a: step.lr,
            b: step.momentum,
            c: step.weight_decay,
            d: step.dampening,
            flag: u32::from(step.nesterov),
            ..ElementwiseParams::count("sgd_step_", n)?
        });
        self.ctx.encode(&[Dispatch::new(
            &kernels::SGD,
            params,
            vec![param, grad, momentum],
            self.ctx.grid_1d(n),
        )])
    }
}
