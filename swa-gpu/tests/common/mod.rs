//! Shared test support: the GPU backend or a skip, the CPU reference, random inputs and comparisons.

#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swa_core::backend::prelude::*;
use swa_core::backend::Conv2dSpec;
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

/// Matmul with every transpose, at sizes that are not multiples of any tile, and with a long K that
/// splits the reduction.
pub fn check_matmul(g: &GpuBackend) {
    let c = cpu();
    // (12, 20, 8) and (64, 16, 65) take the vec4 loads where not transposed.
    for (m, k, n) in [
        (17, 33, 9),
        (1, 1, 1),
        (5, 2000, 3),
        (64, 16, 65),
        (12, 20, 8),
    ] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a_shape = if ta { [k, m] } else { [m, k] };
            let b_shape = if tb { [n, k] } else { [k, n] };
            let (ga, ca) = random_pair(g, 60 + m as u64, &a_shape);
            let (gb, cb) = random_pair(g, 61 + n as u64, &b_shape);
            let got = g.matmul(&ga, &gb, ta, tb).unwrap();
            let want = c.matmul(&ca, &cb, ta, tb).unwrap();
            let magnitudes = c.matmul(&abs(&ca), &abs(&cb), ta, tb).unwrap();
            assert_eq!(got.dims(), &[m, n]);
            assert_within(
                &format!("matmul {m}×{k}×{n} ta={ta} tb={tb}"),
                &host(g, &got),
                &want.iter().copied().collect::<Vec<_>>(),
                &summation_bounds(k, &magnitudes),
            );
        }
    }
}

/// Convolution forward and all gradients: 3 → 5 channels on 7×9 images, stride 1 and 2, padding 0 and
/// 1, kernels 1×1 and 3×3, with and without bias.
pub fn check_conv2d(g: &GpuBackend) {
    let c = cpu();
    for ksize in [1usize, 3] {
        for stride in [1usize, 2] {
            for padding in [0usize, 1] {
                let spec = Conv2dSpec { stride, padding };
                let case = format!("k={ksize} s={stride} p={padding}");
                let seed = (ksize * 100 + stride * 10 + padding) as u64;
                let (gx, cx) = random_pair(g, seed, &[2, 3, 7, 9]);
                let (gw, cw) = random_pair(g, seed + 1, &[5, 3, ksize, ksize]);
                let (gb, cb) = random_pair(g, seed + 2, &[5]);
                let bias = stride == 1;
                let gy = g.conv2d(&gx, &gw, bias.then_some(&gb), spec).unwrap();
                let cy = c.conv2d(&cx, &cw, bias.then_some(&cb), spec).unwrap();
                let taps = 3 * ksize * ksize;
                let mag = c
                    .conv2d(&abs(&cx), &abs(&cw), bias.then_some(&abs(&cb)), spec)
                    .unwrap();
                assert_eq!(gy.dims(), cy.shape(), "{case}");
                assert_within(
                    &format!("conv2d {case}"),
                    &host(g, &gy),
                    &cy.iter().copied().collect::<Vec<_>>(),
                    &summation_bounds(taps + 1, &mag),
                );

                let (gdy, cdy) = random_pair(g, seed + 3, cy.shape());
                let gg = g.conv2d_backward(&gx, &gw, &gdy, spec, true, true).unwrap();
                let cg = c.conv2d_backward(&cx, &cw, &cdy, spec, true, true).unwrap();
                let cabs = c
                    .conv2d_backward(&abs(&cx), &abs(&cw), &abs(&cdy), spec, true, true)
                    .unwrap();
                let pixels = cy.shape()[2] * cy.shape()[3];
                let checks = [
                    (
                        "input grad",
                        gg.input.as_ref(),
                        cg.input.as_ref(),
                        cabs.input.as_ref(),
                        5 * ksize * ksize,
                    ),
                    (
                        "weight grad",
                        Some(&gg.weight),
                        Some(&cg.weight),
                        Some(&cabs.weight),
                        2 * pixels,
                    ),
                    (
                        "bias grad",
                        gg.bias.as_ref(),
                        cg.bias.as_ref(),
                        cabs.bias.as_ref(),
                        2 * pixels,
                    ),
                ];
                for (what, got, want, mag, terms) in checks {
                    let (got, want, mag) = (got.unwrap(), want.unwrap(), mag.unwrap());
                    assert_eq!(got.dims(), want.shape(), "{what} {case}");
                    assert_within(
                        &format!("conv2d {what} {case}"),
                        &host(g, got),
                        &want.iter().copied().collect::<Vec<_>>(),
                        &summation_bounds(terms, mag),
                    );
                }
                let no_extras = g
                    .conv2d_backward(&gx, &gw, &gdy, spec, false, false)
                    .unwrap();
                assert!(no_extras.input.is_none() && no_extras.bias.is_none());
            }
        }
    }
}
