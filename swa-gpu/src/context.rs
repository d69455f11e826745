//! The device context: buffer pool, pipeline cache and the batch of commands not yet submitted.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use swa_core::backend::{BackendError, BackendResult, HasShape};

use crate::kernels::{Access, Kernel};
use crate::tiles::GemmTiles;

/// Dispatches encoded before the batch is submitted without waiting for a readback; each takes one
/// uniform slot.
const SLOTS_PER_BATCH: u64 = 512;
/// Bytes of one dispatch's parameter block (the shaders' `Params` structs are far smaller).
const PARAM_BYTES: u64 = 256;
/// Threads per workgroup of the one-dimensional kernels.
pub(crate) const WORKGROUP: u32 = 256;

/// Locks a mutex, recovering the data if another thread panicked while holding it (every structure
/// behind these locks stays consistent between statements).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Free device buffers by size class, reused across steps.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    cached_bytes: u64,
    allocated_bytes: u64,
}

/// Rounds a byte count up to its size class: four classes per power of two, so at most a quarter of an
/// allocation is slack while buffers of similar sizes share a class.
pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(256);
    let top = 63 - bytes.leading_zeros();
    let step = 1u64 << top.saturating_sub(2);
    bytes.div_ceil(step) * step
}

/// Allocation statistics of the buffer pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of all buffers the pool ever allocated and still owns or lent.
    pub allocated_bytes: u64,
    /// Bytes of free buffers waiting for reuse.
    pub cached_bytes: u64,
}

/// A tensor on the GPU: a pooled storage buffer and a shape. Dropping it returns the buffer to the pool;
/// work already queued that uses the buffer still runs first, because every later use is ordered after
/// it on the same queue.
pub struct GpuTensor {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) shape: Vec<usize>,
    pool: Arc<Mutex<BufferPool>>,
}

impl std::fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTensor")
            .field("shape", &self.shape)
            .field("buffer_bytes", &self.buffer.size())
            .finish()
    }
}

impl HasShape for GpuTensor {
    fn dims(&self) -> &[usize] {
        &self.shape
    }
}

impl GpuTensor {
    /// Bytes of the tensor's values (the buffer may be larger).
    pub(crate) fn bytes(&self) -> u64 {
        self.numel() as u64 * 4
    }
}

impl Drop for GpuTensor {
    fn drop(&mut self) {
        let mut pool = lock(&self.pool);
        pool.cached_bytes += self.buffer.size();
        pool.free
            .entry(self.buffer.size())
            .or_default()
            .push(self.buffer.clone());
    }
}

struct CachedPipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

#[derive(Default)]
struct Batch {
    encoder: Option<wgpu::CommandEncoder>,
    uniform: Option<wgpu::Buffer>,
    params: Vec<u8>,
    slots: u64,
}

/// A dispatch's uniform parameter block, as the 32-bit words of one of the structs in
/// [`crate::uniforms`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Params(Vec<u32>);

impl Params {
    /// The words of a uniform struct.
    pub(crate) fn of<T: bytemuck::Pod>(uniform: &T) -> Self {
        Self(bytemuck::cast_slice(std::slice::from_ref(uniform)).to_vec())
    }
}

/// How a dispatch specialises its kernel's source. At each dispatch only the variant's short `Debug`
/// form is built, to find the pipeline; the placeholders' values, kilobytes of generated code for the
/// GEMM kernel's unrolled tiles, are built when the pipeline is compiled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Variant {
    /// The source as it is.
    #[default]
    Plain,
    /// The GEMM kernel for a tile shape, an operand mode, a convolution's kernel size (1 for dense
    /// products) and vec4 loads of A and/or B.
    Gemm {
        tiles: GemmTiles,
        mode: u32,
        ksize: u32,
        vec_a: bool,
        vec_b: bool,
    },
    /// The fused averaging kernel for a number of (destination, source) pairs.
    LerpMany { pairs: usize },
}

impl Variant {
    fn substitutions(&self) -> Vec<(&'static str, String)> {
        match *self {
            Variant::Plain => Vec::new(),
            Variant::Gemm {
                tiles,
                mode,
                ksize,
                vec_a,
                vec_b,
            } => tiles.substitutions(mode, ksize, vec_a, vec_b),
            Variant::LerpMany { pairs } => crate::kernels::lerp_many_variant(pairs),
        }
    }
}

/// One kernel launch.
pub(crate) struct Dispatch<'a> {
    pub kernel: &'static Kernel,
    pub variant: Variant,
    pub params: Params,
    pub buffers: Vec<&'a GpuTensor>,
    pub groups: [u32; 3],
}

impl<'a> Dispatch<'a> {
    pub(crate) fn new(
        kernel: &'static Kernel,
        params: Params,
        buffers: Vec<&'a GpuTensor>,
        groups: [u32; 3],
    ) -> Self {
        Self {
            kernel,
            variant: Variant::Plain,
            params,
            buffers,
            groups,
        }
    }
}

/// Everything one device owns. Shared by every clone of a [`GpuBackend`](crate::GpuBackend).
pub(crate) struct Context {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub tiles: GemmTiles,
    pool: Arc<Mutex<BufferPool>>,
    batch: Mutex<Batch>,
    pipelines: Mutex<HashMap<String, Arc<CachedPipeline>>>,
    error: Arc<Mutex<Option<String>>>,
    slot_bytes: u64,
}

impl Context {
    /// A context for `device`, with `tiles` for its matrix products (checked against the device's
    /// limits) or the adapter's default.
    pub(crate) fn new(
        adapter: &wgpu::Adapter,
        device: wgpu::Device,
        queue: wgpu::Queue,
        tiles: Option<GemmTiles>,
    ) -> BackendResult<Self> {
        let error = Arc::new(Mutex::new(None::<String>));
        let sink = Arc::clone(&error);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = lock(&sink);
            if slot.is_none() {
                *slot = Some(e.to_string());
            }
        }));
        let info = adapter.get_info();
        let limits = device.limits();
        let tiles = tiles.unwrap_or_else(|| GemmTiles::for_adapter(&info, &limits));
        tiles.validate(&limits)?;
        let slot_bytes = PARAM_BYTES.max(u64::from(limits.min_uniform_buffer_offset_alignment));
        Ok(Self {
            tiles,
            features: device.features(),
            info,
            limits,
            device,
            queue,
            pool: Arc::default(),
            batch: Mutex::default(),
            pipelines: Mutex::default(),
            error,
            slot_bytes,
        })
    }

    /// The first device error since the last check, as a typed error.
    pub(crate) fn check_error(&self, op: &str) -> BackendResult<()> {
        match lock(&self.error).take() {
            Some(message) => Err(BackendError::Device(format!("{op}: {message}"))),
            None => Ok(()),
        }
    }

    pub(crate) fn pool_stats(&self) -> PoolStats {
        let pool = lock(&self.pool);
        PoolStats {
            allocated_bytes: pool.allocated_bytes,
            cached_bytes: pool.cached_bytes,
        }
    }

    /// Frees every cached buffer (buffers lent to tensors stay).
    pub(crate) fn trim_pool(&self) {
        let mut pool = lock(&self.pool);
        let cached = pool.cached_bytes;
        pool.allocated_bytes -= cached;
        pool.cached_bytes = 0;
        pool.free.clear();
    }

    /// A tensor with unspecified contents, from the pool when a buffer of its size class is free.
    pub(crate) fn alloc(&self, op: &'static str, shape: &[usize]) -> BackendResult<GpuTensor> {
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| BackendError::InvalidArgument {
                op,
                message: format!("shape {shape:?} has more elements than fit in memory"),
            })?;
        let bytes = numel as u64 * 4;
        let binding_limit = self.limits.max_storage_buffer_binding_size;
        if bytes > binding_limit || bytes > self.limits.max_buffer_size {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!(
                    "shape {shape:?} needs {bytes} bytes, over the adapter's limit of {} bytes per buffer",
                    binding_limit.min(self.limits.max_buffer_size)
                ),
            });
        }
        let class = size_class(bytes).min(binding_limit.min(self.limits.max_buffer_size));
        let reused = {
            let mut pool = lock(&self.pool);
            let buffer = pool.free.get_mut(&class).and_then(Vec::pop);
            if buffer.is_some() {
                pool.cached_bytes -= class;
            } else {
                pool.allocated_bytes += class;
            }
            buffer
        };
        let buffer = reused.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("swa-gpu tensor"),
                size: class,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        Ok(GpuTensor {
            buffer,
            shape: shape.to_vec(),
            pool: Arc::clone(&self.pool),
        })
    }

    fn pipeline(
        &self,
        kernel: &'static Kernel,
        variant: Variant,
    ) -> BackendResult<Arc<CachedPipeline>> {
        let key = format!("{}::{} {variant:?}", kernel.family, kernel.entry);
        if let Some(found) = lock(&self.pipelines).get(&key) {
            return Ok(Arc::clone(found));
        }
        let mut source = kernel.source.to_string();
        for (name, value) in &variant.substitutions() {
            source = source.replace(name, value);
        }
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&key),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        entries.extend(
            kernel
                .storage
                .iter()
                .map(|access| wgpu::BindGroupLayoutEntry {
                    binding: access.binding(),
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: matches!(access, Access::Read(_)),
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                }),
        );
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(&key),
                entries: &entries,
            });
        let pipeline_layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(&key),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&key),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(kernel.entry),
                compilation_options: wgpu::PipelineCompilationOptions::default(),
                cache: None,
            });
        self.check_error(&format!("compiling kernel {key}"))?;
        let cached = Arc::new(CachedPipeline { pipeline, layout });
        lock(&self.pipelines).insert(key, Arc::clone(&cached));
        Ok(cached)
    }

    /// Workgroups for one thread per element of `n`, spread over y past the per-dimension limit.
    pub(crate) fn grid_1d(&self, n: usize) -> [u32; 3] {
        let groups = (n as u64).div_ceil(u64::from(WORKGROUP)).max(1);
        let max_x = u64::from(self.limits.max_compute_workgroups_per_dimension.max(1));
        let x = groups.min(max_x);
        let y = groups.div_ceil(x);
        [x as u32, y as u32, 1]
    }

    fn ensure_batch<'b>(&self, batch: &'b mut Batch) -> &'b mut wgpu::CommandEncoder {
        if batch.uniform.is_none() {
            batch.uniform = Some(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("swa-gpu params"),
                size: SLOTS_PER_BATCH * self.slot_bytes,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        batch.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("swa-gpu batch"),
                })
        })
    }

    /// Submits the batch: parameter blocks first (queue writes precede the batch's commands).
    fn flush_locked(&self, batch: &mut Batch) {
        if let Some(encoder) = batch.encoder.take() {
            if let Some(uniform) = batch.uniform.take() {
                if !batch.params.is_empty() {
                    self.queue.write_buffer(&uniform, 0, &batch.params);
                }
            }
            self.queue.submit([encoder.finish()]);
        }
        batch.params.clear();
        batch.slots = 0;
    }

    /// Submits everything encoded so far.
    pub(crate) fn flush(&self) {
        let mut batch = lock(&self.batch);
        self.flush_locked(&mut batch);
    }

    /// Encodes dispatches into one compute pass of the current batch (more passes only when the batch's
    /// parameter slots run out).
    pub(crate) fn encode(&self, dispatches: &[Dispatch<'_>]) -> BackendResult<()> {
        let pipelines = dispatches
            .iter()
            .map(|d| self.pipeline(d.kernel, d.variant))
            .collect::<BackendResult<Vec<_>>>()?;
        let mut batch = lock(&self.batch);
        let mut next = 0;
        while next < dispatches.len() {
            if batch.slots == SLOTS_PER_BATCH {
                self.flush_locked(&mut batch);
            }
            self.ensure_batch(&mut batch);
            let room = (SLOTS_PER_BATCH - batch.slots) as usize;
            let chunk = next..(next + room).min(dispatches.len());
            let mut bind_groups = Vec::with_capacity(chunk.len());
            for i in chunk.clone() {
                let dispatch = &dispatches[i];
                let offset = batch.slots * self.slot_bytes;
                batch.params.resize(offset as usize, 0);
                batch
                    .params
                    .extend_from_slice(bytemuck::cast_slice(&dispatch.params.0));
                batch.slots += 1;
                let Some(uniform) = batch.uniform.as_ref() else {
                    return Err(BackendError::Device(
                        "parameter buffer missing from the batch".into(),
                    ));
                };
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: uniform,
                        offset,
                        size: wgpu::BufferSize::new(PARAM_BYTES),
                    }),
                }];
                if dispatch.buffers.len() != dispatch.kernel.storage.len() {
                    return Err(BackendError::Device(format!(
                        "kernel {} takes {} buffers, got {}",
                        dispatch.kernel.entry,
                        dispatch.kernel.storage.len(),
                        dispatch.buffers.len()
                    )));
                }
                for (access, tensor) in dispatch.kernel.storage.iter().zip(&dispatch.buffers) {
                    entries.push(wgpu::BindGroupEntry {
                        binding: access.binding(),
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &tensor.buffer,
                            offset: 0,
                            size: wgpu::BufferSize::new(tensor.bytes().max(4)),
                        }),
                    });
                }
                bind_groups.push(self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &pipelines[i].layout,
                    entries: &entries,
                }));
            }
            let encoder = self.ensure_batch(&mut batch);
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
                for (bind_group, i) in bind_groups.iter().zip(chunk.clone()) {
                    let [x, y, z] = dispatches[i].groups;
                    pass.set_pipeline(&pipelines[i].pipeline);
                    pass.set_bind_group(0, bind_group, &[]);
                    pass.dispatch_workgroups(x, y, z);
                }
            }
            next = chunk.end;
        }
        Ok(())
    }

    /// Runs `f` on the batch's encoder, in order with the dispatches around it.
    pub(crate) fn with_encoder<R>(&self, f: impl FnOnce(&mut wgpu::CommandEncoder) -> R) -> R {
        let mut batch = lock(&self.batch);
        let encoder = self.ensure_batch(&mut batch);
        f(encoder)
    }

    /// Copies host bytes into the start of a tensor's buffer, ordered with the batch (a queue write
    /// would run before commands already encoded that may still read a reused buffer).
    pub(crate) fn upload(
        &self,
        op: &'static str,
        tensor: &GpuTensor,
        bytes: &[u8],
    ) -> BackendResult<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("swa-gpu upload"),
            size: bytes.len() as u64,
            usage: wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        });
        staging
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| BackendError::Device(format!("{op}: mapping the upload: {e}")))?
            .copy_from_slice(bytes);
        staging.unmap();
        self.with_encoder(|encoder| {
            encoder.copy_buffer_to_buffer(&staging, 0, &tensor.buffer, 0, bytes.len() as u64);
        });
        Ok(())
    }

    /// Reads `bytes` from the start of `buffer`, submitting the batch and waiting for it.
    pub(crate) fn download(
        &self,
        op: &'static str,
        buffer: &wgpu::Buffer,
        bytes: u64,
    ) -> BackendResult<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("swa-gpu readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut batch = lock(&self.batch);
            let encoder = self.ensure_batch(&mut batch);
            encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
            self.flush_locked(&mut batch);
        }
        let (sender, receiver) = mpsc::channel();
        staging
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |result| {
                // The receiver outlives the wait below; a failed send only means nobody is listening.
                let _ = sender.send(result);
            });
        self.wait(op)?;
        // Another thread's poll may be the one that runs the callback; give it time to deliver.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mapped = loop {
            match receiver.recv_timeout(std::time::Duration::from_millis(1)) {
                Ok(result) => break result,
                Err(mpsc::RecvTimeoutError::Timeout) if std::time::Instant::now() < deadline => {
                    self.device.poll(wgpu::PollType::Poll).map_err(|e| {
                        BackendError::Device(format!("{op}: polling the device: {e}"))
                    })?;
                }
                Err(_) => {
                    return Err(BackendError::Device(format!(
                        "{op}: readback did not complete after waiting for the device"
                    )))
                }
            }
        };
        mapped.map_err(|e| BackendError::Device(format!("{op}: readback failed: {e}")))?;
        let data = staging
            .slice(..)
            .get_mapped_range()
            .map(|view| view.to_vec())
            .map_err(|e| BackendError::Device(format!("{op}: mapping the readback: {e}")))?;
        staging.unmap();
        Ok(data)
    }

    /// Waits for all submitted work, then reports any device error.
    pub(crate) fn wait(&self, op: &'static str) -> BackendResult<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| BackendError::Device(format!("{op}: waiting for the device: {e}")))?;
        self.check_error(op)
    }
}
