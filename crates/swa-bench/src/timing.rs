//! How a backend's work is timed, and the memory-copy reference each backend is compared against.

use std::time::{Duration, Instant};

use rayon::prelude::*;
use swa_core::backend::Backend;
use swa_core::CpuBackend;

use crate::BenchError;

/// A backend whose work the benchmarks can time.
pub trait TimedBackend: Backend {
    /// Runs `work` and returns how long the device took for it, waiting for earlier work first.
    fn time(
        &self,
        work: &mut dyn FnMut(&Self) -> Result<(), BenchError>,
    ) -> Result<Duration, BenchError>;

    /// How [`TimedBackend::time`] measures (for the report): `wall clock`, `GPU timestamps`, …
    fn timing_method(&self) -> String;

    /// Times `runs` plain copies of `elements` f32 values (8 bytes moved per element) with the same
    /// threads or device the backend uses: the memory bandwidth reference of the averaging figures.
    fn copy_times(&self, elements: usize, runs: usize) -> Result<Vec<Duration>, BenchError>;
}

impl TimedBackend for CpuBackend {
    fn time(
        &self,
        work: &mut dyn FnMut(&Self) -> Result<(), BenchError>,
    ) -> Result<Duration, BenchError> {
        let start = Instant::now();
        work(self)?;
        Ok(start.elapsed())
    }

    fn timing_method(&self) -> String {
        "wall clock".into()
    }

    fn copy_times(&self, elements: usize, runs: usize) -> Result<Vec<Duration>, BenchError> {
        let threads = self.threads();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| BenchError::Setup(format!("a {threads}-thread pool for the copy: {e}")))?;
        let src: Vec<f32> = (0..elements).map(|i| i as f32).collect();
        let mut dst = vec![0f32; elements];
        // One contiguous chunk per thread: each thread streams its part with memcpy, the fastest copy
        // the C library has.
        let chunk = elements.div_ceil(threads).max(1);
        let mut copy = || {
            pool.install(|| {
                dst.par_chunks_mut(chunk)
                    .zip(src.par_chunks(chunk))
                    .for_each(|(d, s)| d.copy_from_slice(s));
            })
        };
        copy(); // page in the destination
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let start = Instant::now();
            copy();
            times.push(start.elapsed());
        }
        std::hint::black_box(&dst);
        Ok(times)
    }
}

/// Times `runs` calls of `work` after `warmups` untimed calls.
pub fn repeat<B: TimedBackend>(
    backend: &B,
    warmups: usize,
    runs: usize,
    mut work: impl FnMut(&B) -> Result<(), BenchError>,
) -> Result<Vec<Duration>, BenchError> {
    for _ in 0..warmups {
        work(backend)?;
    }
    backend.synchronize()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        times.push(backend.time(&mut work)?);
    }
    Ok(times)
}

/// Wall-clock time of `work`, waiting for the backend's queued work before and after.
pub fn wall<B: Backend, R>(
    backend: &B,
    work: impl FnOnce() -> Result<R, BenchError>,
) -> Result<(R, Duration), BenchError> {
    backend.synchronize()?;
    let start = Instant::now();
    let result = work()?;
    backend.synchronize()?;
    Ok((result, start.elapsed()))
}
