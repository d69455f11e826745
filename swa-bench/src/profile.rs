//! Where a training step's time goes: a backend that times every layer operation it runs.
//!
//! [`OpProfiler`] wraps a synchronous backend (the CPU's: its operations return when their work is done,
//! so a wall clock around each call times that call alone) and records, for every call of a layer
//! operation, what ran (an [`OpKey`]: the operation and the shapes that decide its cost), its FLOPs
//! (convolutions and matrix products, counted as [`crate::flops`] counts them) and how long it took.
//! The `layers` suite runs the trainer's own step on it and turns the records into a per-layer table:
//! achieved GFLOP/s of each convolution geometry against the GEMM peak, and each operation's share of
//! the step. The in-place updates every decorator forwards (the optimiser's step, averaging) are not
//! layer operations; they show up as the part of the step no operation accounts for.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use swa_core::backend::prelude::*;
use swa_core::backend::{
    BackendResult, BatchNormGrads, BatchNormSaved, Conv2dGrads, Conv2dSpec, CrossEntropy, Decorator,
};

use crate::flops::{conv2d_flops, matmul_flops};

/// What one recorded call ran: the operation and the shapes that decide its cost.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpKey {
    /// The operation family and direction: `conv forward`, `conv backward dx+dW`, `batch norm+ReLU
    /// backward`, …
    pub op: &'static str,
    /// The shapes: for a convolution `16→32 3×3/2 32×32`, for the others the input's shape.
    pub shape: String,
}

/// The totals of one [`OpKey`] over the calls recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTotals {
    /// Calls recorded.
    pub calls: u64,
    /// Wall-clock seconds, summed over the calls.
    pub seconds: f64,
    /// FLOPs, summed over the calls (0 for operations that are not counted).
    pub flops: u64,
}

/// A backend that runs every operation on `inner` and records each layer operation's time. Clones share
/// the records.
#[derive(Clone, Debug)]
pub struct OpProfiler<B: Backend> {
    inner: B,
    records: Arc<Mutex<BTreeMap<OpKey, OpTotals>>>,
}

impl<B: Backend> OpProfiler<B> {
    /// A profiler with nothing recorded around `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            records: Arc::default(),
        }
    }

    /// The totals recorded since creation or the last [`OpProfiler::take`], and starts afresh.
    pub fn take(&self) -> BTreeMap<OpKey, OpTotals> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<OpKey, OpTotals>> {
        // A panic while the map was held cannot leave it half-updated: entries are plain numbers.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `work`, then records its time under `op` and `shape` with `flops`.
    fn timed<R>(
        &self,
        op: &'static str,
        shape: impl FnOnce() -> String,
        flops: u64,
        work: impl FnOnce() -> BackendResult<R>,
    ) -> BackendResult<R> {
        let start = Instant::now();
        let result = work()?;
        let seconds = start.elapsed().as_secs_f64();
        let key = OpKey { op, shape: shape() };
        let mut records = self.lock();
        let totals = records.entry(key).or_default();
        totals.calls += 1;
        totals.seconds += seconds;
        totals.flops += flops;
        Ok(result)
    }
}

/// `[2, 3, 4]` as `2×3×4`.
fn dims_label(dims: &[usize]) -> String {
    dims.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("×")
}

/// A convolution's geometry as `Cin→Cout K×K/stride H×W` (the input's plane), and its forward FLOPs.
fn conv_geometry(x: &[usize], w: &[usize], spec: Conv2dSpec) -> (String, u64) {
    match (x, w) {
        (&[batch, cin, h, wd], &[cout, _, k, _]) => (
            format!("{cin}→{cout} {k}×{k}/{} {h}×{wd} b{batch}", spec.stride),
            conv2d_flops(batch, cin, cout, h, wd, k, spec).unwrap_or(0),
        ),
        _ => (format!("{x:?} * {w:?}"), 0),
    }
}

impl<B: Backend> Decorator for OpProfiler<B> {
    type Inner = B;
    const LABEL: &'static str = "op profiler";
    fn inner(&self) -> &B {
        &self.inner
    }
}

impl<B: Backend> ConvOps<B::Tensor> for OpProfiler<B> {
    fn conv2d(
        &self,
        x: &B::Tensor,
        weight: &B::Tensor,
        bias: Option<&B::Tensor>,
        spec: Conv2dSpec,
    ) -> BackendResult<B::Tensor> {
        let (shape, flops) = conv_geometry(x.dims(), weight.dims(), spec);
        self.timed(
            "conv forward",
            || shape,
            flops,
            || self.inner.conv2d(x, weight, bias, spec),
        )
    }
    fn conv2d_backward(
        &self,
        x: &B::Tensor,
        weight: &B::Tensor,
        dy: &B::Tensor,
        spec: Conv2dSpec,
        need_input_grad: bool,
        need_bias_grad: bool,
    ) -> BackendResult<Conv2dGrads<B::Tensor>> {
        let (shape, one) = conv_geometry(x.dims(), weight.dims(), spec);
        let (op, flops) = if need_input_grad {
            ("conv backward dx+dW", 2 * one)
        } else {
            ("conv backward dW", one)
        };
        self.timed(
            op,
            || shape,
            flops,
            || {
                self.inner
                    .conv2d_backward(x, weight, dy, spec, need_input_grad, need_bias_grad)
            },
        )
    }
}

impl<B: Backend> NormOps<B::Tensor> for OpProfiler<B> {
    fn batch_norm_train(
        &self,
        x: &B::Tensor,
        gamma: &B::Tensor,
        beta: &B::Tensor,
        running_mean: &mut B::Tensor,
        running_var: &mut B::Tensor,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(B::Tensor, BatchNormSaved<B::Tensor>)> {
        self.timed(
            "batch norm train",
            || dims_label(x.dims()),
            0,
            || {
                self.inner.batch_norm_train(
                    x,
                    gamma,
                    beta,
                    running_mean,
                    running_var,
                    momentum,
                    eps,
                )
            },
        )
    }
    fn batch_norm_eval(
        &self,
        x: &B::Tensor,
        gamma: &B::Tensor,
        beta: &B::Tensor,
        running_mean: &B::Tensor,
        running_var: &B::Tensor,
        eps: f32,
    ) -> BackendResult<B::Tensor> {
        self.timed(
            "batch norm eval",
            || dims_label(x.dims()),
            0,
            || {
                self.inner
                    .batch_norm_eval(x, gamma, beta, running_mean, running_var, eps)
            },
        )
    }
    fn batch_norm_relu_eval(
        &self,
        x: &B::Tensor,
        gamma: &B::Tensor,
        beta: &B::Tensor,
        running_mean: &B::Tensor,
        running_var: &B::Tensor,
        eps: f32,
    ) -> BackendResult<B::Tensor> {
        self.timed(
            "batch norm+ReLU eval",
            || dims_label(x.dims()),
            0,
            || {
                self.inner
                    .batch_norm_relu_eval(x, gamma, beta, running_mean, running_var, eps)
            },
        )
    }
    fn batch_norm_backward(
        &self,
        x: &B::Tensor,
        gamma: &B::Tensor,
        saved: &BatchNormSaved<B::Tensor>,
        dy: &B::Tensor,
    ) -> BackendResult<BatchNormGrads<B::Tensor>> {
        self.timed(
            "batch norm backward",
            || dims_label(x.dims()),
            0,
            || self.inner.batch_norm_backward(x, gamma, saved, dy),
        )
    }
    fn batch_norm_relu_train(
        &self,
        x: &B::Tensor,
        gamma: &B::Tensor,
        beta: &B::Tensor,
        running_mean: &mut B::Tensor,
        running_var: &mut B::Tensor,
        momentum: f32,
        eps: f32,
    ) -> BackendResult<(B::Tensor, BatchNormSaved<B::Tensor>)> {
        self.timed(
            "batch norm+ReLU train",
            || dims_label(x.dims()),
            0,
            || {
                self.inner.batch_norm_relu_train(
                    x,
                    gamma,
                    beta,
                    running_mean,
                    running_var,
                    momentum,
                    eps,
                )
            },
        )
    }
    fn batch_norm_relu_backward(
        &self,
        x: &B::Tensor,
        gamma: &B::Tensor,
        beta: &B::Tensor,
        saved: &BatchNormSaved<B::Tensor>,
        dz: &B::Tensor,
    ) -> BackendResult<BatchNormGrads<B::Tensor>> {
        self.timed(
            "batch norm+ReLU backward",
            || dims_label(x.dims()),
            0,
            || {
                self.inner
                    .batch_norm_relu_backward(x, gamma, beta, saved, dz)
            },
        )
    }
}

impl<B: Backend> ElementwiseOps<B::Tensor> for OpProfiler<B> {
    fn add(&self, a: &B::Tensor, b: &B::Tensor) -> BackendResult<B::Tensor> {
        self.timed("add", || dims_label(a.dims()), 0, || self.inner.add(a, b))
    }
    fn mul(&self, a: &B::Tensor, b: &B::Tensor) -> BackendResult<B::Tensor> {
        self.timed("mul", || dims_label(a.dims()), 0, || self.inner.mul(a, b))
    }
    fn scale_per_image(&self, x: &B::Tensor, scales: &B::Tensor) -> BackendResult<B::Tensor> {
        self.timed(
            "scale per image",
            || dims_label(x.dims()),
            0,
            || self.inner.scale_per_image(x, scales),
        )
    }
    fn relu(&self, x: &B::Tensor) -> BackendResult<B::Tensor> {
        self.timed("ReLU", || dims_label(x.dims()), 0, || self.inner.relu(x))
    }
    fn relu_(&self, x: &mut B::Tensor) -> BackendResult<()> {
        let shape = dims_label(x.dims());
        self.timed("ReLU in place", || shape, 0, || self.inner.relu_(x))
    }
    fn relu_backward(&self, y: &B::Tensor, dy: &B::Tensor) -> BackendResult<B::Tensor> {
        self.timed(
            "ReLU backward",
            || dims_label(y.dims()),
            0,
            || self.inner.relu_backward(y, dy),
        )
    }
    fn dropout_mask(&self, shape: &[usize], p: f32, seed: u64) -> BackendResult<B::Tensor> {
        self.timed(
            "dropout mask",
            || dims_label(shape),
            0,
            || self.inner.dropout_mask(shape, p, seed),
        )
    }
    fn narrow(
        &self,
        x: &B::Tensor,
        axis: usize,
        start: usize,
        len: usize,
    ) -> BackendResult<B::Tensor> {
        self.timed(
            "narrow",
            || dims_label(x.dims()),
            0,
            || self.inner.narrow(x, axis, start, len),
        )
    }
    fn narrow_assign_(
        &self,
        dst: &mut B::Tensor,
        axis: usize,
        start: usize,
        src: &B::Tensor,
    ) -> BackendResult<()> {
        let shape = dims_label(dst.dims());
        self.timed(
            "narrow assign",
            || shape,
            0,
            || self.inner.narrow_assign_(dst, axis, start, src),
        )
    }
    fn narrow_add_(
        &self,
        dst: &mut B::Tensor,
        axis: usize,
        start: usize,
        src: &B::Tensor,
    ) -> BackendResult<()> {
        let shape = dims_label(dst.dims());
        self.timed(
            "narrow add",
            || shape,
            0,
            || self.inner.narrow_add_(dst, axis, start, src),
        )
    }
}

impl<B: Backend> DenseOps<B::Tensor> for OpProfiler<B> {
    fn matmul(
        &self,
        a: &B::Tensor,
        b: &B::Tensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> BackendResult<B::Tensor> {
        let (ad, bd) = (a.dims(), b.dims());
        let flops = match (ad, bd) {
            (&[a0, a1], &[b0, b1]) => {
                let (m, k) = if transpose_a { (a1, a0) } else { (a0, a1) };
                let n = if transpose_b { b0 } else { b1 };
                matmul_flops(m, k, n)
            }
            _ => 0,
        };
        let shape = || {
            format!(
                "{}{} · {}{}",
                dims_label(ad),
                if transpose_a { "ᵀ" } else { "" },
                dims_label(bd),
                if transpose_b { "ᵀ" } else { "" }
            )
        };
        self.timed("matmul", shape, flops, || {
            self.inner.matmul(a, b, transpose_a, transpose_b)
        })
    }
    fn add_row_bias_(&self, x: &mut B::Tensor, bias: &B::Tensor) -> BackendResult<()> {
        let shape = dims_label(x.dims());
        self.timed(
            "row bias",
            || shape,
            0,
            || self.inner.add_row_bias_(x, bias),
        )
    }
    fn sum_rows(&self, x: &B::Tensor) -> BackendResult<B::Tensor> {
        self.timed(
            "sum rows",
            || dims_label(x.dims()),
            0,
            || self.inner.sum_rows(x),
        )
    }
}

impl<B: Backend> PoolOps<B::Tensor> for OpProfiler<B> {
    fn max_pool2d(
        &self,
        x: &B::Tensor,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> BackendResult<B::Tensor> {
        self.timed(
            "max pool",
            || dims_label(x.dims()),
            0,
            || self.inner.max_pool2d(x, kernel, stride, padding),
        )
    }
    fn max_pool2d_backward(
        &self,
        x: &B::Tensor,
        dy: &B::Tensor,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> BackendResult<B::Tensor> {
        self.timed(
            "max pool backward",
            || dims_label(x.dims()),
            0,
            || {
                self.inner
                    .max_pool2d_backward(x, dy, kernel, stride, padding)
            },
        )
    }
    fn avg_pool2d(&self, x: &B::Tensor, kernel: usize) -> BackendResult<B::Tensor> {
        self.timed(
            "average pool",
            || dims_label(x.dims()),
            0,
            || self.inner.avg_pool2d(x, kernel),
        )
    }
    fn avg_pool2d_backward(
        &self,
        dy: &B::Tensor,
        kernel: usize,
        input_shape: &[usize],
    ) -> BackendResult<B::Tensor> {
        self.timed(
            "average pool backward",
            || dims_label(input_shape),
            0,
            || self.inner.avg_pool2d_backward(dy, kernel, input_shape),
        )
    }
}

impl<B: Backend> LossOps<B::Tensor> for OpProfiler<B> {
    fn softmax_cross_entropy(
        &self,
        logits: &B::Tensor,
        labels: &[u32],
    ) -> BackendResult<CrossEntropy<B::Tensor>> {
        self.timed(
            "cross-entropy",
            || dims_label(logits.dims()),
            0,
            || self.inner.softmax_cross_entropy(logits, labels),
        )
    }
    fn softmax(&self, logits: &B::Tensor) -> BackendResult<B::Tensor> {
        self.timed(
            "softmax",
            || dims_label(logits.dims()),
            0,
            || self.inner.softmax(logits),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swa_core::CpuBackend;

    #[test]
    fn each_call_is_recorded_under_its_operation_and_shape_with_its_flops() -> BackendResult<()> {
        let profiler = OpProfiler::new(CpuBackend::with_threads(1));
        let spec = Conv2dSpec {
            stride: 1,
            padding: 1,
        };
        let x = profiler.zeros(&[2, 3, 6, 6])?;
        let w = profiler.zeros(&[4, 3, 3, 3])?;
        let y = profiler.conv2d(&x, &w, None, spec)?;
        profiler.conv2d(&x, &w, None, spec)?;
        profiler.conv2d_backward(&x, &w, &y, spec, true, false)?;
        profiler.relu(&y)?;
        let records = profiler.take();
        let one = conv2d_flops(2, 3, 4, 6, 6, 3, spec).unwrap_or(0);
        assert!(one > 0);
        let forward = &records[&OpKey {
            op: "conv forward",
            shape: "3→4 3×3/1 6×6 b2".into(),
        }];
        assert_eq!((forward.calls, forward.flops), (2, 2 * one));
        assert!(forward.seconds > 0.0);
        let backward = &records[&OpKey {
            op: "conv backward dx+dW",
            shape: "3→4 3×3/1 6×6 b2".into(),
        }];
        assert_eq!((backward.calls, backward.flops), (1, 2 * one));
        let relu = &records[&OpKey {
            op: "ReLU",
            shape: "2×4×6×6".into(),
        }];
        assert_eq!((relu.calls, relu.flops), (1, 0));
        assert_eq!(records.len(), 3);
        assert!(profiler.take().is_empty(), "take starts afresh");
        Ok(())
    }
}
