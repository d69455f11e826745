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

use super::{
    Backend, BackendError, BackendResult, BatchNormGrads, BatchNormSaved, Conv2dGrads, Conv2dSpec,
    CrossEntropy, HasShape, SgdStep,
};

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

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> BackendResult<CpuTensor> {
        same_shape("add", a, b)?;
        Ok(self.install(|| elementwise::add(a, b)))
    }

    fn mul(&self, a: &CpuTensor, b: &CpuTensor) -> BackendResult<CpuTensor> {
        same_shape("mul", a, b)?;
        Ok(self.install(|| elementwise::mul(a, b)))
    }

    fn relu(&self, x: &CpuTensor) -> BackendResult<CpuTensor> {
        Ok(self.install(|| elementwise::relu(x)))
    }

    fn relu_backward(&self, y: &CpuTensor, dy: &CpuTensor) -> BackendResult<CpuTensor> {
        same_shape("relu_backward", y, dy)?;
        Ok(self.install(|| elementwise::relu_backward(y, dy)))
    }

    fn dropout_mask(&self, shape: &[usize], p: f32, seed: u64) -> BackendResult<CpuTensor> {
        elementwise::dropout_mask(shape, p, seed)
    }

    fn matmul(
        &self,
        a: &CpuTensor,
        b: &CpuTensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> BackendResult<CpuTensor> {
        self.install(|| dense::matmul(a, b, transpose_a, transpose_b))
    }

    fn add_row_bias_(&self, x: &mut CpuTensor, bias: &CpuTensor) -> BackendResult<()> {
        dense::add_row_bias(x, bias)
    }

    fn sum_rows(&self, x: &CpuTensor) -> BackendResult<CpuTensor> {
        dense::sum_rows(x)
    }

    fn conv2d(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        spec: Conv2dSpec,
    ) -> BackendResult<CpuTensor> {
        self.install(|| conv::forward(x, weight, bias, spec))
    }

    fn conv2d_backward(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        dy: &CpuTensor,
        spec: Conv2dSpec,
        need_input_grad: bool,
        need_bias_grad: bool,
    ) -> BackendResult<Conv2dGrads<CpuTensor>> {
        self.install(|| conv::backward(x, weight, dy, spec, need_input_grad, need_bias_grad))
    }

    fn batch_norm_train(
        &self,
        x: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        running_mean: &mut CpuTensor,
        running_var: &mut CpuTensor,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(CpuTensor, BatchNormSaved<CpuTensor>)> {
        self.install(|| norm::train(x, gamma, beta, running_mean, running_var, momentum, eps))
    }

    fn batch_norm_eval(
        &self,
        x: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        running_mean: &CpuTensor,
        running_var: &CpuTensor,
        eps: f32,
    ) -> BackendResult<CpuTensor> {
        self.install(|| norm::eval(x, gamma, beta, running_mean, running_var, eps))
    }

    fn batch_norm_backward(
        &self,
        x: &CpuTensor,
        gamma: &CpuTensor,
        saved: &BatchNormSaved<CpuTensor>,
        dy: &CpuTensor,
    ) -> BackendResult<BatchNormGrads<CpuTensor>> {
        self.install(|| norm::backward(x, gamma, saved, dy))
    }

    fn max_pool2d(&self, x: &CpuTensor, kernel: usize, stride: usize) -> BackendResult<CpuTensor> {
        self.install(|| pool::max_forward(x, kernel, stride))
    }

    fn max_pool2d_backward(
        &self,
        x: &CpuTensor,
        dy: &CpuTensor,
        kernel: usize,
        stride: usize,
    ) -> BackendResult<CpuTensor> {
        self.install(|| pool::max_backward(x, dy, kernel, stride))
    }

    fn avg_pool2d(&self, x: &CpuTensor, kernel: usize) -> BackendResult<CpuTensor> {
        self.install(|| pool::avg_forward(x, kernel))
    }

    fn avg_pool2d_backward(
        &self,
        dy: &CpuTensor,
        kernel: usize,
        input_shape: &[usize],
    ) -> BackendResult<CpuTensor> {
        self.install(|| pool::avg_backward(dy, kernel, input_shape))
    }

    fn softmax_cross_entropy(
        &self,
        logits: &CpuTensor,
        labels: &[u32],
    ) -> BackendResult<CrossEntropy<CpuTensor>> {
        loss::softmax_cross_entropy(logits, labels)
    }

    fn softmax(&self, logits: &CpuTensor) -> BackendResult<CpuTensor> {
        loss::softmax(logits)
    }
}
