//! The averaging, kernel and training figures on the wgpu backend, when the machine has an adapter.
//!
//! Work is timed with GPU timestamp queries when the adapter has them, the wall clock otherwise. The
//! references are measured in the same run: the device's own buffer copy for the averaging updates, and
//! its fp32 rate on independent fused multiply-adds ([`GpuBackend::measure_fma_throughput`]) for the
//! matrix products and convolutions. The matrix product is measured with each candidate tile shape
//! ([`GemmTiles::CANDIDATES`]), so one run says which suits the device (set it with
//! `SWA_GPU_GEMM_TILES`).
//!
//! A software adapter (llvmpipe, WARP, SwiftShader: the CPU pretending to be a GPU) runs tiny sizes
//! only, and its figures are labelled as such: they show that the path works, not how fast a GPU is.

use std::time::Duration;

use swa_core::backend::prelude::*;
use swa_gpu::{GemmTiles, GpuBackend, GpuOptions, GpuTensor};
use swa_models::Architecture;

use crate::flops::matmul_flops;
use crate::machine::Adapter;
use crate::report::{Figure, Target};
use crate::suites::kernels::{self, ConvShape};
use crate::suites::{averaging, training};
use crate::timing::{repeat, TimedBackend};
use crate::workload::seeded_values;
use crate::{rates, BenchError, Recorder, Settings, BATCH};

/// The matrix product's share of the FMA peak the project aims for.
pub const GEMM_TARGET: f64 = 0.5;

/// Size of the probe and of the tile comparison: (probe threads, probe iterations, GEMM side).
const HARDWARE_SIZES: (usize, u32, usize) = (1 << 20, 4096, 4096);
/// The same for a software adapter: work of milliseconds, not minutes.
const SOFTWARE_SIZES: (usize, u32, usize) = (4096, 64, 96);

/// Measures the device's fp32 rate on independent fused multiply-adds; returns its median in GFLOP/s.
fn fma_peak(
    backend: &GpuBackend,
    suite: &str,
    (threads, iterations): (usize, u32),
    runs: usize,
    recorder: &mut Recorder,
) -> Result<f64, BenchError> {
    let mut times = Vec::with_capacity(runs);
    let mut flops = 0;
    for _ in 0..runs {
        let (throughput, _) = backend.measure_fma_throughput(threads, iterations)?;
        flops = throughput.flops;
        times.push(throughput.timing.elapsed);
    }
    let summary = rates(flops as f64 / 1e9, &times, "FMA peak")?;
    let median = summary.median;
    recorder.push(
        Figure::new(suite, "fp32 FMA peak", "GFLOP/s", summary).note(format!(
            "{threads} threads × {} independent FMAs × {iterations}: the reference of every GFLOP/s figure",
            swa_gpu::FMAS_PER_ITERATION
        )),
    );
    Ok(median)
}

/// Measures a `side`³ matrix product with each candidate tile shape the device can run.
fn gemm_tiles(
    default: &GpuBackend,
    suite: &str,
    side: usize,
    runs: usize,
    peak: f64,
    target: Option<Target>,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    let a = seeded_values(side * side, 11);
    let b = seeded_values(side * side, 12);
    let gflop = matmul_flops(side, side, side) as f64 / 1e9;
    let limits = default.limits();
    for tiles in GemmTiles::CANDIDATES {
        if let Err(e) = tiles.validate(&limits) {
            recorder.note(suite, format!("tiles {tiles} not measured: {e}"));
            continue;
        }
        // The default shape runs on the device already open; the others each need their own.
        let is_default = tiles == default.gemm_tiles();
        let backend = if is_default {
            default.clone()
        } else {
            GpuBackend::new(GpuOptions {
                gemm_tiles: Some(tiles),
                ..GpuOptions::from_env()?
            })?
        };
        let ga = backend.from_host(&a, &[side, side])?;
        let gb = backend.from_host(&b, &[side, side])?;
        let times = repeat(&backend, 1, runs, |g| {
            g.matmul(&ga, &gb, false, false)?;
            Ok(())
        })?;
        let default_mark = if is_default { " (default)" } else { "" };
        recorder.push(
            Figure::new(
                suite,
                format!("matmul {side}³, tiles {tiles}{default_mark}"),
                "GFLOP/s",
                rates(gflop, &times, "matmul")?,
            )
            .against("FMA peak", peak, target),
        );
    }
    Ok(())
}

impl TimedBackend for GpuBackend {
    fn time(
        &self,
        work: &mut dyn FnMut(&Self) -> Result<(), BenchError>,
    ) -> Result<Duration, BenchError> {
        let mut failure = None;
        let ((), timing) = self.time_gpu(|b| {
            failure = work(b).err();
            Ok(())
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(timing.elapsed),
        }
    }

    fn timing_method(&self) -> String {
        if self.has_timestamp_queries() {
            "GPU timestamps (wall clock where the driver reports none)".into()
        } else {
            "wall clock".into()
        }
    }

    fn timed_copy(&self, dst: &mut GpuTensor, src: &GpuTensor) -> Result<Duration, BenchError> {
        self.time(&mut |b| {
            b.copy_(dst, src)?;
            Ok(())
        })
    }
}

/// Opens the adapter `SWA_GPU_ADAPTER` names (or the best one) and measures; records a note and
/// returns `None` when there is no adapter.
pub fn run(settings: &Settings, recorder: &mut Recorder) -> Result<Option<Adapter>, BenchError> {
    const SUITE: &str = "gpu";
    let backend = match GpuOptions::from_env().and_then(GpuBackend::new) {
        Ok(backend) => backend,
        Err(e) => {
            recorder.note(SUITE, format!("skipped, no GPU adapter: {e}"));
            return Ok(None);
        }
    };
    let info = backend.adapter_info();
    let software = info.device_type == wgpu::DeviceType::Cpu;
    let adapter = Adapter {
        name: info.name.clone(),
        device_type: format!("{:?}", info.device_type),
        api: format!("{:?}", info.backend),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        timestamp_queries: backend.has_timestamp_queries(),
        software,
    };
    let label = if software {
        format!("{} [SOFTWARE, CPU-emulated: path check only]", adapter.name)
    } else {
        adapter.name.clone()
    };
    recorder.note(
        SUITE,
        format!(
            "adapter {label} ({}, {}), timing: {}",
            adapter.device_type,
            adapter.api,
            backend.timing_method()
        ),
    );
    let suite = if software { "gpu(sw)" } else { SUITE };
    let (threads, iterations, side) = if software {
        SOFTWARE_SIZES
    } else {
        HARDWARE_SIZES
    };
    let peak = fma_peak(
        &backend,
        suite,
        (threads, iterations),
        settings.runs(5),
        recorder,
    )?;
    let gemm_target = (!software).then_some(Target::MinRatio(GEMM_TARGET));
    gemm_tiles(
        &backend,
        suite,
        side,
        settings.runs(5),
        peak,
        gemm_target,
        recorder,
    )?;
    let peak = Some(("FMA peak", peak));

    if software {
        // Sizes that take llvmpipe seconds, not minutes.
        let sizes = [("64K".to_string(), 65_536)];
        averaging::run(&backend, suite, &sizes, 3, averaging::GPU_TARGET, recorder)?;
        let tiny = [ConvShape {
            name: "PreResNet-20 3×3 16→16 @32px",
            in_channels: 16,
            out_channels: 16,
            size: 32,
            kernel: 3,
        }];
        kernels::run(&backend, suite, &tiny, 2, 3, peak, recorder)?;
        training::run_network(
            &backend,
            suite,
            Architecture::PreResNet { depth: 20 },
            4,
            training::Rounds {
                steps: 2,
                rounds: 1,
            },
            training::References::default(),
            recorder,
        )?;
    } else {
        let sizes: Vec<(String, usize)> = averaging::PAPER_SIZES
            .iter()
            .map(|(l, n)| (l.to_string(), *n))
            .collect();
        averaging::run(
            &backend,
            suite,
            &sizes,
            settings.runs(15),
            averaging::GPU_TARGET,
            recorder,
        )?;
        kernels::run(
            &backend,
            suite,
            &kernels::PAPER_SHAPES,
            BATCH,
            settings.runs(5),
            peak,
            recorder,
        )?;
        for &architecture in &settings.networks {
            training::run_network(
                &backend,
                suite,
                architecture,
                BATCH,
                training::Rounds {
                    steps: settings.train_steps.max(settings.runs(5)),
                    rounds: 1,
                },
                training::References::default(),
                recorder,
            )?;
        }
    }
    Ok(Some(adapter))
}
