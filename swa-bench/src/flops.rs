//! Floating-point operation counts of convolutions, matrix products and whole networks.
//!
//! Only convolutions and linear layers are counted (a multiply-add is 2 FLOPs), the convention of the
//! papers and of PyTorch's profilers: batch norm, ReLU and pooling are memory-bound and add well under
//! 1% of the arithmetic. A network's count comes from running it once on [`FlopCounter`], a backend
//! that forwards every operation to another and adds up the FLOPs of `conv2d` and `matmul`, so the count
//! follows the network as swa-models builds it rather than a hand-written list of layers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use swa_core::backend::prelude::*;
use swa_core::backend::{
    BackendResult, Conv2dGrads, Conv2dSpec, Decorator, ForwardElementwise, ForwardLoss,
    ForwardNorm, ForwardPool,
};
use swa_core::CpuBackend;
use swa_models::{Architecture, ForwardMode};

use crate::BenchError;

/// FLOPs of one 2-D convolution's forward pass: `2 · N · Cout · Ho · Wo · Cin · K²`.
///
/// `None` when the kernel does not fit the padded input or the stride is 0. The input gradient and the
/// weight gradient each cost the same number of FLOPs again.
pub fn conv2d_flops(
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    input_height: usize,
    input_width: usize,
    kernel: usize,
    spec: Conv2dSpec,
) -> Option<u64> {
    let out_h = spec.output_extent(input_height, kernel)?;
    let out_w = spec.output_extent(input_width, kernel)?;
    Some(
        2 * (batch as u64)
            * (out_channels as u64)
            * (out_h as u64)
            * (out_w as u64)
            * (in_channels as u64)
            * (kernel as u64)
            * (kernel as u64),
    )
}

/// FLOPs of an `m×k · k×n` matrix product: `2 · m · k · n`.
pub fn matmul_flops(m: usize, k: usize, n: usize) -> u64 {
    2 * (m as u64) * (k as u64) * (n as u64)
}

/// A backend that runs every operation on `inner` and counts the FLOPs of convolutions and matrix
/// products (forward and backward). A [`Decorator`]: it implements the convolutions and dense layers
/// and forwards every other operation family.
#[derive(Clone, Debug)]
pub struct FlopCounter<B: Backend> {
    inner: B,
    flops: Arc<AtomicU64>,
}

impl<B: Backend> FlopCounter<B> {
    /// A counter at zero around `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            flops: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The FLOPs counted since creation or the last [`FlopCounter::reset`] (shared by clones).
    pub fn flops(&self) -> u64 {
        self.flops.load(Ordering::Relaxed)
    }

    /// Sets the count back to zero.
    pub fn reset(&self) {
        self.flops.store(0, Ordering::Relaxed);
    }

    fn count(&self, flops: u64) {
        self.flops.fetch_add(flops, Ordering::Relaxed);
    }
}

/// FLOPs of one image (of the side the network is measured on, [`crate::workload::image_side`]) through
/// the forward pass of `architecture` with `classes` outputs.
///
/// Runs the network once at batch 1 on the CPU in evaluation mode (the layers' arithmetic does not
/// depend on the mode). A training step costs about three times this: forward, input gradient and
/// weight gradient (a little less in fact, since the first layer needs no input gradient).
pub fn forward_flops_per_image(
    architecture: Architecture,
    classes: usize,
) -> Result<u64, BenchError> {
    let counter = FlopCounter::new(CpuBackend::with_threads(1));
    let mut network = architecture.build(&counter, classes, 0)?;
    let side = crate::workload::image_side(architecture);
    let image = counter.zeros(&[1, 3, side, side])?;
    counter.reset();
    network.forward(&counter, &image, ForwardMode::Eval)?;
    Ok(counter.flops())
}

impl<B: Backend> Decorator for FlopCounter<B> {
    type Inner = B;
    const LABEL: &'static str = "flop counter";
    fn inner(&self) -> &B {
        &self.inner
    }
}

impl<B: Backend> ForwardElementwise for FlopCounter<B> {}
impl<B: Backend> ForwardNorm for FlopCounter<B> {}
impl<B: Backend> ForwardPool for FlopCounter<B> {}
impl<B: Backend> ForwardLoss for FlopCounter<B> {}

impl<B: Backend> DenseOps<B::Tensor> for FlopCounter<B> {
    fn matmul(
        &self,
        a: &B::Tensor,
        b: &B::Tensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> BackendResult<B::Tensor> {
        let product = self.inner.matmul(a, b, transpose_a, transpose_b)?;
        let inner_extent = if transpose_a {
            a.dims()[0]
        } else {
            a.dims()[1]
        };
        let out = product.dims();
        self.count(matmul_flops(out[0], inner_extent, out[1]));
        Ok(product)
    }
    fn add_row_bias_(&self, x: &mut B::Tensor, bias: &B::Tensor) -> BackendResult<()> {
        self.inner.add_row_bias_(x, bias)
    }
    fn sum_rows(&self, x: &B::Tensor) -> BackendResult<B::Tensor> {
        self.inner.sum_rows(x)
    }
}

impl<B: Backend> ConvOps<B::Tensor> for FlopCounter<B> {
    fn conv2d(
        &self,
        x: &B::Tensor,
        weight: &B::Tensor,
        bias: Option<&B::Tensor>,
        spec: Conv2dSpec,
    ) -> BackendResult<B::Tensor> {
        let y = self.inner.conv2d(x, weight, bias, spec)?;
        // The inner backend validated the shapes: x is [N, Cin, H, W], weight [Cout, Cin, K, K].
        let (xd, wd) = (x.dims(), weight.dims());
        self.count(conv2d_flops(xd[0], xd[1], wd[0], xd[2], xd[3], wd[2], spec).unwrap_or(0));
        Ok(y)
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
        let grads =
            self.inner
                .conv2d_backward(x, weight, dy, spec, need_input_grad, need_bias_grad)?;
        let (xd, wd) = (x.dims(), weight.dims());
        let one = conv2d_flops(xd[0], xd[1], wd[0], xd[2], xd[3], wd[2], spec).unwrap_or(0);
        self.count(if need_input_grad { 2 * one } else { one });
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batch, input channels, output channels, height, width, kernel, stride, padding.
    type Layer = (usize, usize, usize, usize, usize, usize, usize, usize);

    /// Multiply-adds of a convolution counted one output position at a time: every window start that
    /// keeps the kernel inside the padded input gives one output pixel of `Cin · K²` multiply-adds per
    /// output channel and image.
    fn enumerated_conv_flops(layer: Layer) -> u64 {
        let (batch, cin, cout, h, w, k, stride, pad) = layer;
        let starts = |extent: usize| {
            (0..)
                .map(|i| i * stride)
                .take_while(|&s| s + k <= extent + 2 * pad)
                .count()
        };
        let mut macs = 0u64;
        for _ in 0..batch * cout * starts(h) * starts(w) {
            macs += (cin * k * k) as u64;
        }
        2 * macs
    }

    #[test]
    fn conv_flops_match_an_enumeration_of_output_positions() {
        let layers: [Layer; 5] = [
            (2, 3, 4, 5, 5, 3, 1, 1),
            (1, 16, 32, 32, 32, 3, 2, 1),
            (3, 8, 8, 7, 9, 1, 2, 0),
            (1, 2, 5, 6, 4, 3, 1, 0),
            (4, 1, 1, 3, 3, 3, 3, 0),
        ];
        for layer in layers {
            let (batch, cin, cout, h, w, k, stride, pad) = layer;
            let spec = Conv2dSpec {
                stride,
                padding: pad,
            };
            assert_eq!(
                conv2d_flops(batch, cin, cout, h, w, k, spec),
                Some(enumerated_conv_flops(layer)),
                "batch {batch}, {cin}→{cout}, {h}×{w}, k {k}, stride {stride}, pad {pad}"
            );
        }
    }

    #[test]
    fn conv_flops_reject_a_kernel_larger_than_the_padded_input() {
        let spec = Conv2dSpec {
            stride: 1,
            padding: 0,
        };
        assert_eq!(conv2d_flops(1, 1, 1, 2, 2, 3, spec), None);
    }

    #[test]
    fn the_counter_adds_conv_and_matmul_flops_of_forward_and_backward() -> Result<(), BenchError> {
        let counter = FlopCounter::new(CpuBackend::with_threads(1));
        let spec = Conv2dSpec {
            stride: 1,
            padding: 1,
        };
        let x = counter.zeros(&[2, 3, 6, 6])?;
        let w = counter.zeros(&[4, 3, 3, 3])?;
        let one_conv = conv2d_flops(2, 3, 4, 6, 6, 3, spec).unwrap_or(0);
        counter.conv2d(&x, &w, None, spec)?;
        assert_eq!(counter.flops(), one_conv);
        let dy = counter.zeros(&[2, 4, 6, 6])?;
        counter.conv2d_backward(&x, &w, &dy, spec, true, false)?;
        assert_eq!(counter.flops(), 3 * one_conv);
        counter.conv2d_backward(&x, &w, &dy, spec, false, false)?;
        assert_eq!(counter.flops(), 4 * one_conv);

        counter.reset();
        let a = counter.zeros(&[5, 7])?;
        let b = counter.zeros(&[3, 7])?;
        counter.matmul(&a, &b, false, true)?; // [5, 7] · [7, 3]
        assert_eq!(counter.flops(), matmul_flops(5, 7, 3));
        let c = counter.zeros(&[5, 2])?;
        counter.matmul(&a, &c, true, false)?; // [7, 5] · [5, 2]
        assert_eq!(
            counter.flops(),
            matmul_flops(5, 7, 3) + matmul_flops(7, 5, 2)
        );
        Ok(())
    }

    #[test]
    fn preresnet20_counts_its_conv_and_linear_layers() -> Result<(), BenchError> {
        // PreResNet-20 on 32×32 images: a 3×3 stem 3→16, three stages of three basic blocks (two 3×3
        // convolutions each) at 16, 32 and 64 channels on 32, 16 and 8 pixels, the first block of the
        // second and third stages striding by 2 with a 1×1 projection shortcut, and a linear classifier.
        let s1 = Conv2dSpec {
            stride: 1,
            padding: 1,
        };
        let s2 = Conv2dSpec {
            stride: 2,
            padding: 1,
        };
        let proj = Conv2dSpec {
            stride: 2,
            padding: 0,
        };
        let c =
            |cin, cout, size, k, spec| conv2d_flops(1, cin, cout, size, size, k, spec).unwrap_or(0);
        let classes = 10;
        let expected = c(3, 16, 32, 3, s1)
            + 6 * c(16, 16, 32, 3, s1)
            + c(16, 32, 32, 3, s2)
            + c(16, 32, 32, 1, proj)
            + 5 * c(32, 32, 16, 3, s1)
            + c(32, 64, 16, 3, s2)
            + c(32, 64, 16, 1, proj)
            + 5 * c(64, 64, 8, 3, s1)
            + matmul_flops(1, 64, classes);
        let counted = forward_flops_per_image(Architecture::PreResNet { depth: 20 }, classes)?;
        assert_eq!(counted, expected);
        Ok(())
    }
}
