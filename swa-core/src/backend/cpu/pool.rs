//! Max and average pooling over `[N, C, H, W]`, without padding, one parallel task per image plane.

use rayon::prelude::*;

use super::matrix::{contiguous, into_tensor};
use super::{CpuBackend, CpuTensor};
use crate::backend::{BackendError, BackendResult, PoolOps};

/// The validated geometry of a pooling window sliding over `planes` image planes.
#[derive(Clone, Copy, Debug)]
struct Window {
    planes: usize,
    height: usize,
    width: usize,
    kernel: usize,
    stride: usize,
    out_height: usize,
    out_width: usize,
}

impl Window {
    fn new(op: &'static str, shape: &[usize], kernel: usize, stride: usize) -> BackendResult<Self> {
        let &[n, c, height, width] = shape else {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: "an input of rank 4 [N, C, H, W]".into(),
                got: shape.to_vec(),
            });
        };
        if kernel == 0 || stride == 0 {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!("kernel {kernel} and stride {stride} must both be at least 1"),
            });
        }
        if kernel > height || kernel > width {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!("kernel {kernel} is larger than the input {height}×{width}"),
            });
        }
        Ok(Self {
            planes: n * c,
            height,
            width,
            kernel,
            stride,
            out_height: (height - kernel) / stride + 1,
            out_width: (width - kernel) / stride + 1,
        })
    }

    fn in_plane(&self) -> usize {
        self.height * self.width
    }
    fn out_plane(&self) -> usize {
        self.out_height * self.out_width
    }
    fn output_shape(&self, input: &[usize]) -> [usize; 4] {
        [input[0], input[1], self.out_height, self.out_width]
    }

    /// The flat in-plane index of the first maximum of the window at `(oh, ow)`.
    fn argmax(&self, plane: &[f32], oh: usize, ow: usize) -> usize {
        let (top, left) = (oh * self.stride, ow * self.stride);
        let mut best = top * self.width + left;
        let mut best_value = plane[best];
        for ih in top..top + self.kernel {
            let row = &plane[ih * self.width..][..self.width];
            for (iw, &v) in row.iter().enumerate().skip(left).take(self.kernel) {
                // Strictly greater keeps the first maximum; a NaN wins so that it propagates like PyTorch.
                if v > best_value || (v.is_nan() && !best_value.is_nan()) {
                    best_value = v;
                    best = ih * self.width + iw;
                }
            }
        }
        best
    }
}

fn check_output_gradient(
    op: &'static str,
    dy: &CpuTensor,
    expected: [usize; 4],
) -> BackendResult<()> {
    if dy.shape() == expected {
        Ok(())
    } else {
        Err(BackendError::ShapeMismatch {
            op,
            expected: format!("an output gradient of shape {expected:?}"),
            got: dy.shape().to_vec(),
        })
    }
}

impl PoolOps<CpuTensor> for CpuBackend {
    fn max_pool2d(&self, x: &CpuTensor, kernel: usize, stride: usize) -> BackendResult<CpuTensor> {
        self.install(|| {
            const OP: &str = "max_pool2d";
            let win = Window::new(OP, x.shape(), kernel, stride)?;
            let xs = contiguous(x);
            let mut y = vec![0.0f32; win.planes * win.out_plane()];
            if !y.is_empty() {
                y.par_chunks_mut(win.out_plane())
                    .zip(xs.par_chunks(win.in_plane()))
                    .for_each(|(out, plane)| {
                        for (i, o) in out.iter_mut().enumerate() {
                            *o = plane[win.argmax(plane, i / win.out_width, i % win.out_width)];
                        }
                    });
            }
            into_tensor(OP, &win.output_shape(x.shape()), y)
        })
    }

    fn max_pool2d_backward(
        &self,
        x: &CpuTensor,
        dy: &CpuTensor,
        kernel: usize,
        stride: usize,
    ) -> BackendResult<CpuTensor> {
        self.install(|| {
            const OP: &str = "max_pool2d_backward";
            let win = Window::new(OP, x.shape(), kernel, stride)?;
            check_output_gradient(OP, dy, win.output_shape(x.shape()))?;
            let xs = contiguous(x);
            let dys = contiguous(dy);
            let mut dx = vec![0.0f32; xs.len()];
            if !dys.is_empty() {
                dx.par_chunks_mut(win.in_plane())
                    .zip(xs.par_chunks(win.in_plane()))
                    .zip(dys.par_chunks(win.out_plane()))
                    .for_each(|((grad, plane), dy)| {
                        for (i, &d) in dy.iter().enumerate() {
                            grad[win.argmax(plane, i / win.out_width, i % win.out_width)] += d;
                        }
                    });
            }
            into_tensor(OP, x.shape(), dx)
        })
    }

    fn avg_pool2d(&self, x: &CpuTensor, kernel: usize) -> BackendResult<CpuTensor> {
        self.install(|| {
            const OP: &str = "avg_pool2d";
            let win = Window::new(OP, x.shape(), kernel, kernel)?;
            let xs = contiguous(x);
            let scale = 1.0 / (kernel * kernel) as f32;
            let mut y = vec![0.0f32; win.planes * win.out_plane()];
            if !y.is_empty() {
                y.par_chunks_mut(win.out_plane())
                    .zip(xs.par_chunks(win.in_plane()))
                    .for_each(|(out, plane)| {
                        for (oh, out_row) in out.chunks_exact_mut(win.out_width).enumerate() {
                            for ih in oh * kernel..(oh + 1) * kernel {
                                let row = &plane[ih * win.width..][..win.out_width * kernel];
                                for (o, window) in out_row.iter_mut().zip(row.chunks_exact(kernel))
                                {
                                    *o += window.iter().sum::<f32>();
                                }
                            }
                            out_row.iter_mut().for_each(|o| *o *= scale);
                        }
                    });
            }
            into_tensor(OP, &win.output_shape(x.shape()), y)
        })
    }

    fn avg_pool2d_backward(
        &self,
        dy: &CpuTensor,
        kernel: usize,
        input_shape: &[usize],
    ) -> BackendResult<CpuTensor> {
        self.install(|| {
            const OP: &str = "avg_pool2d_backward";
            let win = Window::new(OP, input_shape, kernel, kernel)?;
            check_output_gradient(OP, dy, win.output_shape(input_shape))?;
            let dys = contiguous(dy);
            let scale = 1.0 / (kernel * kernel) as f32;
            let mut dx = vec![0.0f32; win.planes * win.in_plane()];
            if !dys.is_empty() {
                dx.par_chunks_mut(win.in_plane())
                    .zip(dys.par_chunks(win.out_plane()))
                    .for_each(|(grad, dy)| {
                        for (oh, dy_row) in dy.chunks_exact(win.out_width).enumerate() {
                            for ih in oh * kernel..(oh + 1) * kernel {
                                let row = &mut grad[ih * win.width..][..win.out_width * kernel];
                                for (window, &d) in row.chunks_exact_mut(kernel).zip(dy_row) {
                                    window.iter_mut().for_each(|g| *g = d * scale);
                                }
                            }
                        }
                    });
            }
            into_tensor(OP, input_shape, dx)
        })
    }
}
