//! How a backend's work is timed, and the memory-copy reference each backend is compared against.

use std::time::{Duration, Instant};

use rayon::prelude::*;
use swa_core::backend::Backend;
use swa_core::{CpuBackend, CpuTensor};

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

    /// Times a plain copy `dst = src` (8 bytes moved per element) with the same threads or device the
    /// backend uses: the memory bandwidth reference of the averaging figures. On the CPU, the faster of
    /// a `memcpy` and a vectorised loop.
    fn timed_copy(
        &self,
        dst: &mut Self::Tensor,
        src: &Self::Tensor,
    ) -> Result<Duration, BenchError>;
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

    fn timed_copy(&self, dst: &mut CpuTensor, src: &CpuTensor) -> Result<Duration, BenchError> {
        let threads = self.threads();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| BenchError::Setup(format!("a {threads}-thread pool for the copy: {e}")))?;
        let (Some(dst), Some(src)) = (dst.as_slice_mut(), src.as_slice()) else {
            return Err(BenchError::Setup(
                "a copy between tensors that are not contiguous".into(),
            ));
        };
        if dst.len() != src.len() {
            return Err(BenchError::Setup(format!(
                "a copy of {} values into {}",
                src.len(),
                dst.len()
            )));
        }
        // Two plain copies, and the faster counts: one contiguous chunk per thread copied with the C
        // library's memcpy (which may use streaming stores), and a vectorised element loop over small
        // chunks (ordinary stores). Which wins depends on the machine.
        let chunk = src.len().div_ceil(threads).max(1);
        let start = Instant::now();
        pool.install(|| {
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
        });
        let memcpy = start.elapsed();
        let start = Instant::now();
        pool.install(|| {
            dst.par_chunks_mut(LOOP_CHUNK)
                .zip(src.par_chunks(LOOP_CHUNK))
                .for_each(|(d, s)| {
                    for (d, s) in d.iter_mut().zip(s) {
                        *d = *s;
                    }
                });
        });
        Ok(memcpy.min(start.elapsed()))
    }
}

/// Elements per task of the loop copy: 64 KiB, small enough to balance, large enough to stream.
const LOOP_CHUNK: usize = 16 * 1024;

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
