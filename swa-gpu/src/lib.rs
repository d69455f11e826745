//! # swa-gpu
//!
//! A WGSL compute backend that implements swa-core's [`Backend`](swa_core::Backend) trait through wgpu, so
//! that the networks of swa-models train unchanged on any GPU wgpu reaches (Vulkan, Metal, DX12), and on
//! software rasterisers such as Mesa's llvmpipe.
//!
//! What it owns:
//!
//! - device management: adapter selection ([`GpuOptions`], the `SWA_GPU_ADAPTER` environment variable),
//!   a device with the adapter's own limits, GEMM tile sizes per adapter or by choice ([`GemmTiles`]),
//!   a buffer pool that reuses allocations across training steps,
//!   pipelines compiled once per kernel variant, and commands batched into few submissions (a batch is
//!   submitted only when values are read back, on [`Backend::synchronize`](swa_core::Backend::synchronize),
//!   or when it grows large);
//! - the kernels, one family per WGSL file: a tiled register-blocked GEMM that also runs convolutions as
//!   implicit GEMM (forward, input gradient, weight gradient; no im2col buffer), batch norm with
//!   deterministic reductions, pooling, ReLU, dropout masks bit-identical to the CPU's, softmax
//!   cross-entropy, the fused SGD step and the SWA averaging updates;
//! - timing: [`GpuBackend::time_gpu`] with GPU timestamps where the adapter has them, and bandwidth probes
//!   ([`GpuBackend::measure_copy_bandwidth`], [`GpuBackend::measure_lerp_many_bandwidth`]) and an
//!   arithmetic one ([`GpuBackend::measure_fma_throughput`]), the references of swa-bench's GPU figures.
//!
//! What it does not: it defines no operation of its own semantics. Every result matches the CPU
//! reference, [`swa_core::CpuBackend`], up to floating-point summation order; the tests check each
//! kernel against it. Weights come back to the host only through
//! [`Backend::to_host`](swa_core::Backend::to_host).
//!
//! Environment:
//!
//! - `SWA_GPU_ADAPTER`: the adapter to open, by a substring of its name (`"RTX"`, `"llvmpipe"`) or by
//!   kind (`discrete`, `integrated`, `cpu`); by default the highest-performance adapter;
//! - `WGPU_BACKEND`: the graphics APIs to search (`vulkan`, `metal`, `dx12`, …), default all primary ones;
//! - `SWA_GPU_GEMM_TILES`: the matrix products' tile sizes as `BMxBNxBKxTMxTN` ([`GemmTiles`]), in place
//!   of the adapter's default; swa-bench's `gpu` suite measures the candidates;
//! - `SWA_REQUIRE_GPU=1`: tests that need an adapter fail instead of printing `skipped: …`
//!   (see [`testing::backend_or_skip`]).
//!
//! `cargo run --release -p swa-gpu --example gpu_probe` lists the adapters and measures copy and averaging
//! bandwidth and matrix-product throughput on the selected one.
//!
//! ```
//! use swa_core::backend::{Backend, BackendError};
//! use swa_gpu::GpuBackend;
//!
//! # fn main() -> Result<(), BackendError> {
//! let gpu = match GpuBackend::from_env() {
//!     Ok(gpu) => gpu,
//!     Err(BackendError::NoDevice(reason)) => {
//!         eprintln!("no GPU here: {reason}");
//!         return Ok(());
//!     }
//!     Err(e) => return Err(e),
//! };
//! let mut average = gpu.from_host(&[0.0, 0.0], &[2])?;
//! let weights = gpu.from_host(&[2.0, 4.0], &[2])?;
//! // The SWA running mean after one model: average += 1/(n+1) · (weights − average), n = 0.
//! gpu.lerp_(&mut average, &weights, 1.0)?;
//! assert_eq!(gpu.to_host(&average)?, vec![2.0, 4.0]);
//!
//! let (_, timing) = gpu.time_gpu(|g| g.scale_(&mut average, 0.5))?;
//! println!("{:?} by {:?}", timing.elapsed, timing.source);
//! # Ok(())
//! # }
//! ```

mod backend;
mod context;
mod device;
mod kernels;
mod ops;
pub mod testing;
mod tiles;
mod timing;
mod uniforms;

pub use backend::GpuBackend;
pub use context::{GpuTensor, PoolStats};
pub use device::{available_adapters, AdapterKind, AdapterSelector, GpuOptions, ADAPTER_ENV};
pub use tiles::{GemmTiles, ParseGemmTilesError, GEMM_TILES_ENV};
pub use timing::{
    fma_probe_expected, Bandwidth, GpuTiming, Throughput, TimingSource, FMAS_PER_ITERATION,
};
