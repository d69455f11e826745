//! Lists the adapters wgpu sees, opens the selected one (`SWA_GPU_ADAPTER`, with the GEMM tiles of
//! `SWA_GPU_GEMM_TILES`), and measures copy and averaging bandwidth, the fp32 FMA rate and
//! matrix-product throughput on it.
//!
//! `cargo run --release -p swa-gpu --example gpu_probe -- [megabytes] [matmul sides…]`

use swa_core::backend::prelude::*;
use swa_core::backend::BackendResult;
use swa_gpu::{available_adapters, GpuBackend, GpuOptions};

fn main() -> BackendResult<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let megabytes = args.first().copied().unwrap_or(16);
    let sides = match args.get(1..) {
        Some(sides) if !sides.is_empty() => sides.to_vec(),
        _ => vec![256, 512],
    };
    for info in available_adapters(GpuOptions::default().backends) {
        println!(
            "adapter: {} ({:?}, {:?}, driver {})",
            info.name, info.device_type, info.backend, info.driver_info
        );
    }
    let gpu = GpuBackend::from_env()?;
    println!(
        "using {} (timestamps: {}, GEMM tiles {})",
        gpu.name(),
        gpu.has_timestamp_queries(),
        gpu.gemm_tiles()
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

    // Enough threads to fill any current GPU, each with 32 independent chains.
    let software = gpu.adapter_info().device_type == wgpu::DeviceType::Cpu;
    let (threads, iterations) = if software {
        (4096, 64)
    } else {
        (1 << 20, 4096)
    };
    let (peak, _) = gpu.measure_fma_throughput(threads, iterations)?;
    println!(
        "fp32 FMA peak: {:.2} GFLOP/s ({:?})",
        peak.gflops(),
        peak.timing.source
    );

    for n in sides {
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
        let gflops = flops / timing.elapsed.as_secs_f64() / 1e9;
        println!(
            "matmul {n}³: {gflops:.2} GFLOP/s ({:?}), {:.1}% of the FMA peak",
            timing.source,
            100.0 * gflops / peak.gflops()
        );
    }
    Ok(())
}
