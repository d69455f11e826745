//! Timing of GPU work: timestamp queries where the adapter has them, wall-clock otherwise.

use std::time::{Duration, Instant};

use swa_core::backend::{Backend, BackendError, BackendResult, HasShape};

use crate::backend::GpuBackend;

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
        let seconds = self.timing.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.bytes_moved as f64 / seconds / 1e9
        } else {
            f64::INFINITY
        }
    }
}

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
}
