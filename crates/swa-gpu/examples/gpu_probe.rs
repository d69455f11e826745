//! Lists the adapters wgpu sees, opens the selected one (`SWA_GPU_ADAPTER`), and measures copy and
//! averaging bandwidth and matrix-product throughput on it.
//!
//! `cargo run --release -p swa-gpu --example gpu_probe -- [megabytes]`

use swa_core::backend::{Backend, BackendResult};
use swa_gpu::{available_adapters, GpuBackend, GpuOptions};

fn main() -> BackendResult<()> {
    let megabytes: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(16);
    for info in available_adapters(GpuOptions::default().backends) {
        println!(
            "adapter: {} ({:?}, {:?}, driver {})",
            info.name, info.device_type, info.backend, info.driver_info
        );
    }
    let gpu = GpuBackend::from_env()?;
    println!(
        "using {} (timestamps: {})",
        gpu.name(),
        gpu.has_timestamp_queries()
    );

    let bytes = megabytes << 20;
    let copy = gpu.measure_copy_bandwidth(bytes, 10)?;
    println!(
        "copy of {megabytes} MiB: {:.2} GB/s ({:?})",
        copy.gb_per_s(),
        copy.timing.source
    );
    // A PreResNet-like parameter list: a few large tensors and many small ones, `bytes` in total.
    let floats = bytes / 4;
    let mut sizes = vec![floats / 4, floats / 4, floats / 8, floats / 8, floats / 8];
    let rest = floats - sizes.iter().sum::<usize>();
    sizes.extend(std::iter::repeat_n(rest / 60, 60));
    let lerp = gpu.measure_lerp_many_bandwidth(&sizes, 10)?;
    println!(
        "lerp_many_ over {} tensors: {:.2} GB/s ({:?}), {:.0}% of copy bandwidth",
        sizes.len(),
        lerp.gb_per_s(),
        lerp.timing.source,
        100.0 * lerp.gb_per_s() / copy.gb_per_s()
    );

    for n in [256usize, 512] {
        let a = gpu.from_host(&vec![0.5; n * n], &[n, n])?;
        let b = gpu.from_host(&vec![0.25; n * n], &[n, n])?;
        gpu.matmul(&a, &b, false, false)?; // compiles the pipeline outside the timing
        let (_, timing) = gpu.time_gpu(|g| {
            for _ in 0..3 {
                g.matmul(&a, &b, false, false)?;
            }
            Ok(())
        })?;
        let flops = 3.0 * 2.0 * (n as f64).powi(3);
        println!(
            "matmul {n}³: {:.2} GFLOP/s ({:?})",
            flops / timing.elapsed.as_secs_f64() / 1e9,
            timing.source
        );
    }
    Ok(())
}
