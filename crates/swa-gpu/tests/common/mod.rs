//! Shared test support: the GPU backend or a skip, the CPU reference, random inputs and comparisons.

#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swa_core::backend::{Backend, HasShape};
use swa_core::CpuBackend;
use swa_gpu::{GpuBackend, GpuTensor};

/// Unit roundoff of f32.
pub const U: f32 = 1.0 / 16_777_216.0;

/// The GPU backend, or `None` after "skipped: …" (a failure instead when `SWA_REQUIRE_GPU=1`).
pub fn gpu() -> Option<GpuBackend> {
    swa_gpu::testing::backend_or_skip()
}

/// The CPU reference with one thread, so its results are reproducible.
pub fn cpu() -> CpuBackend {
    CpuBackend::with_threads(1)
}

/// Uniform values in [-1, 1) from a fixed seed.
pub fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// The same values on both backends.
pub fn pair(gpu: &GpuBackend, data: &[f32], shape: &[usize]) -> (GpuTensor, swa_core::CpuTensor) {
    let g = gpu.from_host(data, shape).expect("upload to the GPU");
    let c = cpu().from_host(data, shape).expect("CPU tensor");
    (g, c)
}

/// Random tensors on both backends.
pub fn random_pair(
    gpu: &GpuBackend,
    seed: u64,
    shape: &[usize],
) -> (GpuTensor, swa_core::CpuTensor) {
    let n = shape.iter().product();
    pair(gpu, &random(seed, n), shape)
}

pub fn host(gpu: &GpuBackend, t: &GpuTensor) -> Vec<f32> {
    gpu.to_host(t).expect("readback")
}

/// Checks shapes and `|got − want| ≤ atol + rtol·|want|` element-wise, naming the worst element.
pub fn assert_close(
    what: &str,
    gpu: &GpuBackend,
    got: &GpuTensor,
    want: &swa_core::CpuTensor,
    atol: f32,
    rtol: f32,
) {
    assert_eq!(got.dims(), want.shape(), "{what}: shapes differ");
    let got = host(gpu, got);
    let want: Vec<f32> = want.iter().copied().collect();
    let bounds: Vec<f32> = want.iter().map(|w| atol + rtol * w.abs()).collect();
    assert_within(what, &got, &want, &bounds);
}

/// Checks `|got − want| ≤ bound` element-wise.
pub fn assert_within(what: &str, got: &[f32], want: &[f32], bounds: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = (0usize, 0.0f32);
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bounds).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= b,
            "{what}: element {i}: got {g}, want {w}, |error| {err} > bound {b}"
        );
        if err > worst.1 {
            worst = (i, err);
        }
    }
}

/// Bounds for results that are sums of `terms` products, computed in different orders on the two
/// backends: each recursive sum is within `terms·u·Σ|products|` of the exact value, so the two are
/// within twice that. `magnitudes` holds `Σ|products|` per element (the op applied to absolute values).
pub fn summation_bounds(terms: usize, magnitudes: &swa_core::CpuTensor) -> Vec<f32> {
    magnitudes
        .iter()
        .map(|m| 2.0 * terms as f32 * U * m + 1e-7)
        .collect()
}

pub fn abs(t: &swa_core::CpuTensor) -> swa_core::CpuTensor {
    t.mapv(f32::abs)
}
