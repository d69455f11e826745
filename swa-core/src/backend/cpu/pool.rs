//! Max and average pooling over `[N, C, H, W]` (max pooling with optional padding), one parallel task per
//! image plane.

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
    /// Implicit padding on every side; it never wins a window.
    padding: usize,
    out_height: usize,
    out_width: usize,
}

impl Window {
    fn new(
        op: &'static str,
        shape: &[usize],
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> BackendResult<Self> {
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
        if 2 * padding > kernel {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!("padding {padding} is more than half the window {kernel}"),
            });
        }
        if kernel > height + 2 * padding || kernel > width + 2 * padding {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!(
                    "kernel {kernel} is larger than the input {height}×{width} with padding {padding}"
                ),
            });
        }
        Ok(Self {
            planes: n * c,
            height,
            width,
            kernel,
            stride,
            padding,
            out_height: (height + 2 * padding - kernel) / stride + 1,
            out_width: (width + 2 * padding - kernel) / stride + 1,
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

    /// The input rows or columns `[first, end)` that the window starting at padded coordinate
    /// `start` covers, clipped to the `extent` of the input.
    fn covered(&self, start: usize, extent: usize) -> (usize, usize) {
        let first = start.saturating_sub(self.padding);
        let end = (start + self.kernel)
            .saturating_sub(self.padding)
            .min(extent);
        (first, end)
    }

    /// The flat in-plane index of the first maximum of the window at `(oh, ow)`.
    fn argmax(&self, plane: &[f32], oh: usize, ow: usize) -> usize {
        let (top, bottom) = self.covered(oh * self.stride, self.height);
        let (left, right) = self.covered(ow * self.stride, self.width);
        let mut best = top * self.width + left;
        let mut best_value = plane[best];
        for ih in top..bottom {
            let row = &plane[ih * self.width..][..self.width];
            for (iw, &v) in row.iter().enumerate().take(right).skip(left) {
                if replaces(v, best_value) {
                    best_value = v;
                    best = ih * self.width + iw;
                }
            }
        }
        best
    }

    /// The maxima of one plane's output row `oh` into `out_row`, as [`Window::argmax`] picks them.
    fn max_row(&self, plane: &[f32], oh: usize, out_row: &mut [f32]) {
        if self.kernel == 2 && self.stride == 2 && self.padding == 0 {
            // VGG's pooling, on the evaluation path: the window's four values in argmax's scan order,
            // without its index arithmetic.
            let top = &plane[2 * oh * self.width..][..2 * self.out_width];
            let bottom = &plane[(2 * oh + 1) * self.width..][..2 * self.out_width];
            for ((o, t), b) in out_row
                .iter_mut()
                .zip(top.chunks_exact(2))
                .zip(bottom.chunks_exact(2))
            {
                *o = [t[1], b[0], b[1]].into_iter().fold(t[0], |best, v| {
                    if replaces(v, best) {
                        v
                    } else {
                        best
                    }
                });
            }
            return;
        }
        for (ow, o) in out_row.iter_mut().enumerate() {
            *o = plane[self.argmax(plane, oh, ow)];
        }
    }
}

/// Whether `v`, met later in a window's scan, replaces the maximum `best` so far: strictly greater keeps
/// the first maximum, and a NaN wins so that it propagates like PyTorch.
fn replaces(v: f32, best: f32) -> bool {
    v > best || (v.is_nan() && !best.is_nan())
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
    fn max_pool2d(
        &self,
        x: &CpuTensor,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> BackendResult<CpuTensor> {
        self.install(|| {
            const OP: &str = "max_pool2d";
            let win = Window::new(OP, x.shape(), kernel, stride, padding)?;
            let xs = contiguous(x);
            let mut y = vec![0.0f32; win.planes * win.out_plane()];
            if !y.is_empty() {
                y.par_chunks_mut(win.out_plane())
                    .zip(xs.par_chunks(win.in_plane()))
                    .for_each(|(out, plane)| {
                        for (oh, out_row) in out.chunks_exact_mut(win.out_width).enumerate() {
                            win.max_row(plane, oh, out_row);
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
        padding: usize,
    ) -> BackendResult<CpuTensor> {
        self.install(|| {
            const OP: &str = "max_pool2d_backward";
            let win = Window::new(OP, x.shape(), kernel, stride, padding)?;
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
            let win = Window::new(OP, x.shape(), kernel, kernel, 0)?;
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
            let win = Window::new(OP, input_shape, kernel, kernel, 0)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The 2×2 stride-2 rows must pick, bit for bit, the value at the index the backward pass sends the
    /// gradient to: the first maximum, a NaN over any number, and of `-0.0` and `0.0` whichever comes first.
    #[test]
    fn the_two_by_two_rows_pick_the_values_argmax_points_to() {
        let values = [0.0, -0.0, 1.0, f32::NAN, -1.0, 1.0, -0.0, 0.0];
        let (height, width) = (4, 6);
        let win = Window::new("test", &[1, 1, height, width], 2, 2, 0).expect("a valid window");
        let mut plane: Vec<f32> = (0..height * width)
            .map(|i| values[(i * 5 + i / 7) % values.len()])
            .collect();
        plane[0..2].copy_from_slice(&[-0.0, 0.0]);
        plane[width..width + 2].copy_from_slice(&[0.0, -0.0]);
        for oh in 0..win.out_height {
            let mut row = vec![7.0; win.out_width];
            win.max_row(&plane, oh, &mut row);
            for (ow, got) in row.iter().enumerate() {
                let want = plane[win.argmax(&plane, oh, ow)];
                assert_eq!(got.to_bits(), want.to_bits(), "output ({oh}, {ow})");
            }
        }
        let mut first = vec![0.0; win.out_width];
        win.max_row(&plane, 0, &mut first);
        assert_eq!(first[0].to_bits(), (-0.0f32).to_bits());
        assert!(
            row_has_nan(&plane, &win),
            "the pattern exercises NaN windows"
        );
    }

    fn row_has_nan(plane: &[f32], win: &Window) -> bool {
        (0..win.out_height).any(|oh| {
            let mut row = vec![0.0; win.out_width];
            win.max_row(plane, oh, &mut row);
            row.iter().any(|v| v.is_nan())
        })
    }
}
