//! Throughput of the CPU backend's convolution and GEMM at the shapes of the paper's networks.
//!
//! Criterion's "elements" are floating-point operations here, so its `elem/s` reads as FLOP/s: a
//! convolution counts `2·N·Cout·Ho·Wo·Cin·K²` for each of the forward pass, the input gradient and the
//! weight gradient, and an `m×k·k×n` GEMM `2·m·k·n`.
//!
//! `backward(weight)` computes the weight gradient alone and `backward(both)` the input and weight
//! gradients together (twice the FLOPs), as a training step asks for them.
//!
//! Run with `cargo bench -p swa-core --bench conv`; `SWA_BENCH_THREADS` picks the thread count (default:
//! all cores).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use swa_core::backend::prelude::*;
use swa_core::backend::Conv2dSpec;
use swa_core::{CpuBackend, CpuTensor};

/// A convolution layer at batch size `batch`.
struct Layer {
    name: &'static str,
    batch: usize,
    in_channels: usize,
    size: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
}

impl Layer {
    fn padding(&self) -> usize {
        self.kernel / 2
    }
    fn out_size(&self) -> usize {
        (self.size + 2 * self.padding() - self.kernel) / self.stride + 1
    }
    fn flops(&self) -> u64 {
        let out = self.out_size();
        (2 * self.batch
            * self.out_channels
            * out
            * out
            * self.in_channels
            * self.kernel
            * self.kernel) as u64
    }
}

const fn layer(
    name: &'static str,
    in_channels: usize,
    size: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
) -> Layer {
    Layer {
        name,
        batch: 128,
        in_channels,
        size,
        out_channels,
        kernel,
        stride,
    }
}

const LAYERS: [Layer; 8] = [
    layer("preresnet20 3x3 16ch 32px", 16, 32, 16, 3, 1),
    layer("preresnet20 3x3 32ch 16px", 32, 16, 32, 3, 1),
    layer("preresnet20 3x3 64ch 8px", 64, 8, 64, 3, 1),
    layer("preresnet20 3x3 16-32ch stride 2", 16, 32, 32, 3, 2),
    layer("preresnet164 1x1 64-16ch 32px", 64, 32, 16, 1, 1),
    layer("preresnet164 1x1 64-256ch 8px", 64, 8, 256, 1, 1),
    layer("vgg16 3x3 128ch 16px", 128, 16, 128, 3, 1),
    layer("vgg16 3x3 512ch 2px", 512, 2, 512, 3, 1),
];

fn filled(b: &CpuBackend, shape: &[usize], seed: u32) -> CpuTensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n as u32)
        .map(|i| (swa_core::backend::pcg_hash(i ^ seed) >> 8) as f32 / 16_777_216.0 - 0.5)
        .collect();
    b.from_host(&values, shape).expect("values match the shape")
}

fn backend() -> CpuBackend {
    match std::env::var("SWA_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        Some(threads) => CpuBackend::with_threads(threads),
        None => CpuBackend::new(),
    }
}

fn convolution(c: &mut Criterion) {
    let b = backend();
    let mut group = c.benchmark_group(format!("conv2d {}", b.name()));
    group.sample_size(10);
    for l in &LAYERS {
        let spec = Conv2dSpec {
            stride: l.stride,
            padding: l.padding(),
        };
        let x = filled(&b, &[l.batch, l.in_channels, l.size, l.size], 1);
        let w = filled(&b, &[l.out_channels, l.in_channels, l.kernel, l.kernel], 2);
        let o = l.out_size();
        let dy = filled(&b, &[l.batch, l.out_channels, o, o], 3);

        group.throughput(Throughput::Elements(l.flops()));
        group.bench_function(BenchmarkId::new("forward", l.name), |bench| {
            bench.iter(|| b.conv2d(black_box(&x), &w, None, spec).expect("conv2d"))
        });
        group.bench_function(BenchmarkId::new("backward(weight)", l.name), |bench| {
            bench.iter(|| {
                b.conv2d_backward(black_box(&x), &w, &dy, spec, false, false)
                    .expect("conv2d_backward")
            })
        });
        group.throughput(Throughput::Elements(2 * l.flops()));
        group.bench_function(BenchmarkId::new("backward(both)", l.name), |bench| {
            bench.iter(|| {
                b.conv2d_backward(black_box(&x), &w, &dy, spec, true, false)
                    .expect("conv2d_backward")
            })
        });
    }
    group.finish();
}

fn matrix_product(c: &mut Criterion) {
    let b = backend();
    let mut group = c.benchmark_group(format!("matmul {}", b.name()));
    group.sample_size(10);
    let n = 1024;
    let x = filled(&b, &[n, n], 4);
    let y = filled(&b, &[n, n], 5);
    group.throughput(Throughput::Elements(2 * (n * n * n) as u64));
    group.bench_function("1024x1024x1024", |bench| {
        bench.iter(|| b.matmul(black_box(&x), &y, false, false).expect("matmul"))
    });
    group.finish();
}

criterion_group!(benches, matrix_product, convolution);
criterion_main!(benches);
