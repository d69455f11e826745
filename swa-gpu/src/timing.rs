//! Timing of GPU work: timestamp queries where the adapter has them, wall-clock otherwise.

use std::time::{Duration, Instant};

use swa_core::backend::{Backend, BackendError, BackendResult, HasShape};

use crate::backend::GpuBackend;
use crate::context::{Dispatch, Params};
use crate::kernels;
use crate::uniforms::PeakParams;

/// Where a measured duration came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimingSource {
    /// Timestamps the GPU wrote before and after the work: excludes host overhead outside the work.
    GpuTimestamps,
    /// Host wall-clock from a synchronised start to a synchronised end.
    WallClock,
}

/// A measured duration of GPU work.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuTiming {
    /// The time the work took.
    pub elapsed: Duration,
    /// How it was measured.
    pub source: TimingSource,
}

impl GpuTiming {
    /// `amount / elapsed` in units of 10⁹ per second; infinite when no time was measured.
    fn billions_per_second(&self, amount: u64) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            amount as f64 / seconds / 1e9
        } else {
            f64::INFINITY
        }
    }
}

/// A measured memory bandwidth.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bandwidth {
    /// Bytes read plus bytes written.
    pub bytes_moved: u64,
    /// The time it took.
    pub timing: GpuTiming,
}

impl Bandwidth {
    /// Bytes moved per second, in GB/s (10⁹ bytes).
    pub fn gb_per_s(&self) -> f64 {
        self.timing.billions_per_second(self.bytes_moved)
    }
}

/// A measured arithmetic rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throughput {
    /// Floating-point operations done (a fused multiply-add counts two).
    pub flops: u64,
    /// The time they took.
    pub timing: GpuTiming,
}

impl Throughput {
    /// Operations per second, in GFLOP/s (10⁹ per second).
    pub fn gflops(&self) -> f64 {
        self.timing.billions_per_second(self.flops)
    }
}

/// Fused multiply-adds per thread and iteration of the throughput probe (eight vec4 chains).
pub const FMAS_PER_ITERATION: u64 = 32;

/// The constant `c` of the probe's chains `x ← x·(1 − c) + c`.
const PROBE_C: f32 = 1.0 / 1024.0;

impl GpuBackend {
    /// Runs `work` and measures how long the GPU took for what it queued.
    ///
    /// Waits for earlier work first, so the measurement covers `work` alone. With timestamp queries the
    /// duration is between GPU timestamps written before and after `work`'s commands; otherwise it is
    /// the wall-clock time from that wait to the end of a [`Backend::synchronize`] after `work`.
    pub fn time_gpu<R>(
        &self,
        work: impl FnOnce(&Self) -> BackendResult<R>,
    ) -> BackendResult<(R, GpuTiming)> {
        self.synchronize()?;
        let query_set = self.has_timestamp_queries().then(|| {
            self.ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("swa-gpu timer"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            })
        });
        let started = Instant::now();
        if let Some(set) = &query_set {
            self.write_timestamp(set, 0);
        }
        let result = work(self)?;
        let ticks = match &query_set {
            Some(set) => {
                self.write_timestamp(set, 1);
                let resolved = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("swa-gpu timestamps"),
                    size: 16,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                self.ctx
                    .with_encoder(|encoder| encoder.resolve_query_set(set, 0..2, &resolved, 0));
                let bytes = self.ctx.download("time_gpu", &resolved, 16)?;
                let stamps: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
                Some(stamps)
            }
            None => {
                self.synchronize()?;
                None
            }
        };
        let wall = started.elapsed();
        let from_stamps = ticks.and_then(|stamps| match stamps.as_slice() {
            [begin, end] if end > begin => {
                let period_ns = f64::from(self.ctx.queue.get_timestamp_period());
                Some(Duration::from_secs_f64(
                    (end - begin) as f64 * period_ns * 1e-9,
                ))
            }
            _ => None,
        });
        let timing = match from_stamps {
            Some(elapsed) => GpuTiming {
                elapsed,
                source: TimingSource::GpuTimestamps,
            },
            // Some drivers report zeros for empty passes: fall back to the wall clock.
            None => GpuTiming {
                elapsed: wall,
                source: TimingSource::WallClock,
            },
        };
        Ok((result, timing))
    }

    /// Records a timestamp in the batch with an empty compute pass, which needs only `TIMESTAMP_QUERY`.
    fn write_timestamp(&self, set: &wgpu::QuerySet, index: u32) {
        self.ctx.with_encoder(|encoder| {
            let pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("swa-gpu timestamp"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(index),
                    end_of_pass_write_index: None,
                }),
            });
            drop(pass);
        });
    }

    /// Device-to-device copy bandwidth: `repeats` copies of a `bytes`-sized buffer (each copy reads and
    /// writes `bytes`). The baseline for the averaging kernels' efficiency.
    pub fn measure_copy_bandwidth(&self, bytes: usize, repeats: u32) -> BackendResult<Bandwidth> {
        let floats = bytes.div_ceil(4).max(1);
        let src = self.zeros(&[floats])?;
        let mut dst = self.zeros(&[floats])?;
        let ((), timing) = self.time_gpu(|b| {
            for _ in 0..repeats {
                b.copy_(&mut dst, &src)?;
            }
            Ok(())
        })?;
        Ok(Bandwidth {
            bytes_moved: 2 * floats as u64 * 4 * u64::from(repeats),
            timing,
        })
    }

    /// Bandwidth of [`Backend::lerp_many_`] over tensors of the given element counts (an SWA update
    /// reads the average and the weights and writes the average: three accesses per element).
    pub fn measure_lerp_many_bandwidth(
        &self,
        sizes: &[usize],
        repeats: u32,
    ) -> BackendResult<Bandwidth> {
        if sizes.is_empty() {
            return Err(BackendError::InvalidArgument {
                op: "measure_lerp_many_bandwidth",
                message: "no tensor sizes given".into(),
            });
        }
        let mut averages = sizes
            .iter()
            .map(|&n| self.zeros(&[n]))
            .collect::<BackendResult<Vec<_>>>()?;
        let weights = sizes
            .iter()
            .map(|&n| self.zeros(&[n]))
            .collect::<BackendResult<Vec<_>>>()?;
        let elements: u64 = averages.iter().map(|t| t.numel() as u64).sum();
        let ((), timing) = self.time_gpu(|b| {
            for step in 0..repeats {
                let mut dsts: Vec<&mut _> = averages.iter_mut().collect();
                let srcs: Vec<&_> = weights.iter().collect();
                b.lerp_many_(&mut dsts, &srcs, 1.0 / (step as f32 + 1.0))?;
            }
            Ok(())
        })?;
        Ok(Bandwidth {
            bytes_moved: 3 * 4 * elements * u64::from(repeats),
            timing,
        })
    }

    /// The device's fp32 arithmetic rate: `threads` threads each run [`FMAS_PER_ITERATION`] independent
    /// fused multiply-adds `iterations` times (`shaders/peak.wgsl`). With enough threads to fill the
    /// device this is its fp32 peak as this driver compiles WGSL, the reference of the matrix products'
    /// efficiency. Returns the rate and each thread's final sum of its chains (for checking).
    pub fn measure_fma_throughput(
        &self,
        threads: usize,
        iterations: u32,
    ) -> BackendResult<(Throughput, Vec<f32>)> {
        let op = "measure_fma_throughput";
        let count = u32::try_from(threads)
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| BackendError::InvalidArgument {
                op,
                message: format!("{threads} threads: expected 1 to {}", u32::MAX),
            })?;
        let out = self.zeros(&[threads])?;
        let params = Params::of(&PeakParams {
            threads: count,
            iterations,
            c: PROBE_C,
            unused: 0,
        });
        let dispatch = || {
            self.ctx.encode(&[Dispatch::new(
                &kernels::FMA_CHAINS,
                params.clone(),
                vec![&out],
                self.ctx.grid_1d(threads),
            )])
        };
        // Compiles the pipeline and warms the clocks outside the timing.
        dispatch()?;
        let ((), timing) = self.time_gpu(|_| dispatch())?;
        let sums = self.to_host(&out)?;
        Ok((
            Throughput {
                flops: 2 * FMAS_PER_ITERATION * u64::from(iterations) * threads as u64,
                timing,
            },
            sums,
        ))
    }
}

/// What one thread of the throughput probe writes: the sum of its 32 chains after `iterations` steps of
/// `x ← x·(1 − c) + c`, computed on the host in the shader's order (up to whether the shader's `fma` is
/// fused, which WGSL leaves to the implementation).
pub fn fma_probe_expected(thread: usize, iterations: u32) -> f32 {
    const LANES: [f32; 4] = [0.0, 0.1, 0.2, 0.3];
    const CHAINS: [f32; 8] = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07];
    let start = (thread % 1024) as f32 / 1024.0;
    let m = 1.0 - PROBE_C;
    let lane_total = |lane: f32| {
        let finals: Vec<f32> = CHAINS
            .iter()
            .map(|&offset| {
                let x0 = (start + lane) + offset;
                (0..iterations).fold(x0, |x, _| x.mul_add(m, PROBE_C))
            })
            .collect();
        ((finals[0] + finals[1]) + (finals[2] + finals[3]))
            + ((finals[4] + finals[5]) + (finals[6] + finals[7]))
    };
    let t: Vec<f32> = LANES.iter().map(|&l| lane_total(l)).collect();
    (t[0] + t[1]) + (t[2] + t[3])
}
