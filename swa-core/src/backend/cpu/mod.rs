//! The reference backend: `ndarray` arrays on the CPU, multi-threaded with rayon, GEMM from the `gemm` crate.
//!
//! A tensor is an [`ndarray::ArrayD<f32>`] in standard (row-major) layout, so users can hand arrays in and
//! out without copies.

mod conv;
mod dense;
mod elementwise;
mod loss;
mod matrix;
mod norm;
mod pool;

use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

use super::{same_pair_count, Backend, BackendError, BackendResult, HasShape, SgdStep};

pub use conv::VECTOR_VARIABLE;

/// The tensor type of [`CpuBackend`].
pub type CpuTensor = ArrayD<f32>;

impl HasShape for ArrayD<f32> {
    fn dims(&self) -> &[usize] {
        self.shape()
    }
}

/// The ndarray CPU backend. Cloning is cheap and shares the thread pool.
#[derive(Clone, Debug)]
pub struct CpuBackend {
    pool: Arc<rayon::ThreadPool>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// A backend using as many threads as the machine has cores.
    pub fn new() -> Self {
        Self::with_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// A backend with exactly `threads` worker threads (results are bit-identical for a fixed count).
    pub fn with_threads(threads: usize) -> Self {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("swa-cpu-{i}"))
            .build()
            .map(Arc::new)
            // Building a pool only fails when threads cannot be spawned; fall back to the calling thread.
            .unwrap_or_else(|_| {
                Arc::new(
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .use_current_thread()
                        .build()
                        .expect("a single-thread pool on the current thread needs no spawning"),
                )
            });
        Self { pool }
    }

    /// The number of worker threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` inside this backend's thread pool.
    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// Runs an in-place update of `len` elements inside the pool when that is worth the hand-over
    /// ([`elementwise::worth_parallel`]), else on the calling thread.
    fn install_if_worth<R: Send>(&self, len: usize, f: impl FnOnce() -> R + Send) -> R {
        if elementwise::worth_parallel(len) {
            self.install(f)
        } else {
            f()
        }
    }
}

/// Checks that two tensors have the same shape.
pub(crate) fn same_shape(op: &'static str, a: &CpuTensor, b: &CpuTensor) -> BackendResult<()> {
    if a.shape() == b.shape() {
        Ok(())
    } else {
        Err(BackendError::ShapeMismatch {
            op,
            expected: format!("{:?} (the first operand's shape)", a.shape()),
            got: b.shape().to_vec(),
        })
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes (the file gives kB, which are KiB).
fn mem_available_bytes(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        let mut fields = rest.split_whitespace();
        let kib: u64 = fields.next()?.parse().ok()?;
        match fields.next() {
            Some("kB") => kib.checked_mul(1024),
            _ => None,
        }
    })
}

/// Checks a tensor's rank.
pub(crate) fn rank(
    op: &'static str,
    t: &CpuTensor,
    expected: usize,
    what: &str,
) -> BackendResult<()> {
    if t.ndim() == expected {
        Ok(())
    } else {
        Err(BackendError::ShapeMismatch {
            op,
            expected: format!("{what} of rank {expected}"),
            got: t.shape().to_vec(),
        })
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads())
    }

    fn from_host(&self, data: &[f32], shape: &[usize]) -> BackendResult<CpuTensor> {
        ArrayD::from_shape_vec(IxDyn(shape), data.to_vec()).map_err(|_| {
            BackendError::ShapeMismatch {
                op: "from_host",
                expected: format!(
                    "{} values for shape {shape:?}",
                    shape.iter().product::<usize>()
                ),
                got: vec![data.len()],
            }
        })
    }

    fn zeros(&self, shape: &[usize]) -> BackendResult<CpuTensor> {
        Ok(ArrayD::zeros(IxDyn(shape)))
    }

    /// The host's available memory (`MemAvailable` of `/proc/meminfo`, Linux's estimate of what can be
    /// allocated without swapping); `None` where that file is absent or unreadable.
    fn memory_available(&self) -> Option<u64> {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| mem_available_bytes(&text))
    }

    fn to_host(&self, tensor: &CpuTensor) -> BackendResult<Vec<f32>> {
        Ok(tensor.iter().copied().collect())
    }

    fn duplicate(&self, tensor: &CpuTensor) -> BackendResult<CpuTensor> {
        Ok(self.install(|| elementwise::duplicate(tensor)))
    }

    fn reshape(&self, tensor: CpuTensor, shape: &[usize]) -> BackendResult<CpuTensor> {
        let from = tensor.shape().to_vec();
        // A standard-layout array is reshaped where it lies; only another layout needs a copy.
        let standard = if tensor.is_standard_layout() {
            tensor
        } else {
            tensor.as_standard_layout().into_owned()
        };
        standard
            .into_shape_with_order(IxDyn(shape))
            .map_err(|_| BackendError::ShapeMismatch {
                op: "reshape",
                expected: format!(
                    "{} elements for shape {shape:?}",
                    shape.iter().product::<usize>()
                ),
                got: from,
            })
    }

    fn synchronize(&self) -> BackendResult<()> {
        Ok(())
    }

    fn fill_(&self, tensor: &mut CpuTensor, value: f32) -> BackendResult<()> {
        tensor.fill(value);
        Ok(())
    }

    fn copy_(&self, dst: &mut CpuTensor, src: &CpuTensor) -> BackendResult<()> {
        same_shape("copy_", dst, src)?;
        dst.assign(src);
        Ok(())
    }

    fn lerp_(&self, dst: &mut CpuTensor, src: &CpuTensor, weight: f32) -> BackendResult<()> {
        same_shape("lerp_", dst, src)?;
        self.install_if_worth(dst.len(), || elementwise::lerp(dst, src, weight));
        Ok(())
    }

    /// One parallel pass over all the pairs: a network's parameters are hundreds of tensors, most too
    /// small to be worth splitting alone (BatchNorm's scales, a small convolution's weight), so each
    /// tensor on its own would run on one thread or pay for a hand-over to the pool. Here the pairs are
    /// cut into pieces of at most 16K elements that every thread takes from, and
    /// whether to use the threads at all is decided from the total size. Each element is the same
    /// expression as in [`Backend::lerp_`], so the results are identical.
    fn lerp_many_(
        &self,
        dsts: &mut [&mut CpuTensor],
        srcs: &[&CpuTensor],
        weight: f32,
    ) -> BackendResult<()> {
        same_pair_count("lerp_many_", dsts.len(), srcs.len())?;
        for (dst, src) in dsts.iter().zip(srcs) {
            same_shape("lerp_many_", dst, src)?;
        }
        let contiguous = dsts
            .iter()
            .zip(srcs)
            .all(|(d, s)| d.is_standard_layout() && s.is_standard_layout());
        let total: usize = dsts.iter().map(|d| d.len()).sum();
        if !contiguous || !elementwise::worth_parallel(total) {
            for (dst, src) in dsts.iter_mut().zip(srcs) {
                self.lerp_(dst, src, weight)?;
            }
            return Ok(());
        }
        let mut pieces: Vec<(&mut [f32], &[f32])> = Vec::new();
        for (dst, src) in dsts.iter_mut().zip(srcs) {
            if let (Some(d), Some(s)) = (dst.as_slice_mut(), src.as_slice()) {
                pieces.extend(
                    d.chunks_mut(elementwise::CHUNK_LEN)
                        .zip(s.chunks(elementwise::CHUNK_LEN)),
                );
            }
        }
        self.install(|| {
            pieces
                .into_par_iter()
                .for_each(|(d, s)| elementwise::lerp_slice(d, s, weight))
        });
        Ok(())
    }

    fn axpy_(&self, dst: &mut CpuTensor, alpha: f32, x: &CpuTensor) -> BackendResult<()> {
        same_shape("axpy_", dst, x)?;
        self.install_if_worth(dst.len(), || elementwise::axpy(dst, alpha, x));
        Ok(())
    }

    fn scale_(&self, tensor: &mut CpuTensor, factor: f32) -> BackendResult<()> {
        tensor.mapv_inplace(|v| v * factor);
        Ok(())
    }

    fn sgd_step_(
        &self,
        param: &mut CpuTensor,
        grad: &CpuTensor,
        momentum: &mut CpuTensor,
        step: &SgdStep,
    ) -> BackendResult<()> {
        same_shape("sgd_step_", param, grad)?;
        same_shape("sgd_step_", param, momentum)?;
        self.install_if_worth(param.len(), || {
            elementwise::sgd_step(param, grad, momentum, step)
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::mem_available_bytes;

    #[test]
    fn mem_available_is_read_in_bytes_from_meminfo() {
        let meminfo = "MemTotal:       24608344 kB\nMemFree:         1204200 kB\n\
                       MemAvailable:   20123456 kB\nBuffers:          123456 kB\n";
        assert_eq!(mem_available_bytes(meminfo), Some(20_123_456 * 1024));
    }

    #[test]
    fn a_meminfo_without_mem_available_or_with_another_unit_tells_nothing() {
        assert_eq!(
            mem_available_bytes("MemTotal: 100 kB\nMemFree: 50 kB\n"),
            None
        );
        assert_eq!(mem_available_bytes("MemAvailable: 100 MB\n"), None);
        assert_eq!(mem_available_bytes("MemAvailable: lots kB\n"), None);
        assert_eq!(mem_available_bytes(""), None);
    }
}
