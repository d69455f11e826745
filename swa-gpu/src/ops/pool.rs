//! Max and average pooling.

use swa_core::backend::{BackendError, BackendResult, HasShape, PoolOps};

use crate::backend::{u32_extent, GpuBackend};
use crate::context::{Dispatch, GpuTensor, Params};
use crate::kernels::{self, Kernel};
use crate::uniforms::PoolParams;

/// Geometry of a pooling over an `[N, C, H, W]` input.
#[derive(Clone, Copy, Debug)]
struct PoolGeometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

fn geometry(
    op: &'static str,
    input: &[usize],
    kernel: usize,
    stride: usize,
    padding: usize,
) -> BackendResult<PoolGeometry> {
    let [n, c, h, w] = *input else {
        return Err(BackendError::ShapeMismatch {
            op,
            expected: "an input [N, C, H, W]".into(),
            got: input.to_vec(),
        });
    };
    if kernel == 0 || stride == 0 || kernel > h + 2 * padding || kernel > w + 2 * padding {
        return Err(BackendError::InvalidArgument {
            op,
            message: format!(
                "window {kernel} with stride {stride} does not fit a {h}×{w} input with padding \
                 {padding} (both must be ≥ 1)"
            ),
        });
    }
    if 2 * padding > kernel {
        return Err(BackendError::InvalidArgument {
            op,
            message: format!("padding {padding} is more than half the window {kernel}"),
        });
    }
    Ok(PoolGeometry {
        n,
        c,
        h,
        w,
        oh: (h + 2 * padding - kernel) / stride + 1,
        ow: (w + 2 * padding - kernel) / stride + 1,
        kernel,
        stride,
        padding,
    })
}

impl GpuBackend {
    fn pool_dispatch(
        &self,
        op: &'static str,
        kernel: &'static Kernel,
        g: PoolGeometry,
        total: usize,
        inputs: Vec<&GpuTensor>,
        out: &GpuTensor,
    ) -> BackendResult<()> {
        if total == 0 {
            return Ok(());
        }
        let u = |what: &str, v: usize| u32_extent(op, what, v);
        let params = Params::of(&PoolParams {
            total: u("element count", total)?,
            channels: u("channels", g.c)?,
            h: u("height", g.h)?,
            w: u("width", g.w)?,
            oh: u("output height", g.oh)?,
            ow: u("output width", g.ow)?,
            kernel: u("window", g.kernel)?,
            stride: u("stride", g.stride)?,
            padding: u("padding", g.padding)?,
        });
        let mut buffers = inputs;
        buffers.push(out);
        self.ctx.encode(&[Dispatch::new(
            kernel,
            params,
            buffers,
            self.ctx.grid_1d(total),
        )])
    }
}

impl PoolOps<GpuTensor> for GpuBackend {
    fn max_pool2d(
        &self,
        x: &GpuTensor,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> BackendResult<GpuTensor> {
        let op = "max_pool2d";
        let g = geometry(op, x.dims(), kernel, stride, padding)?;
        let out = self.ctx.alloc(op, &[g.n, g.c, g.oh, g.ow])?;
        self.pool_dispatch(op, &kernels::MAX_POOL, g, out.numel(), vec![x], &out)?;
        Ok(out)
    }

    fn max_pool2d_backward(
        &self,
        x: &GpuTensor,
        dy: &GpuTensor,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> BackendResult<GpuTensor> {
        let op = "max_pool2d_backward";
        let g = geometry(op, x.dims(), kernel, stride, padding)?;
        if dy.dims() != [g.n, g.c, g.oh, g.ow] {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: format!("an output gradient [{}, {}, {}, {}]", g.n, g.c, g.oh, g.ow),
                got: dy.dims().to_vec(),
            });
        }
        let out = self.ctx.alloc(op, x.dims())?;
        self.pool_dispatch(
            op,
            &kernels::MAX_POOL_BACKWARD,
            g,
            out.numel(),
            vec![x, dy],
            &out,
        )?;
        Ok(out)
    }

    fn avg_pool2d(&self, x: &GpuTensor, kernel: usize) -> BackendResult<GpuTensor> {
        let op = "avg_pool2d";
        let g = geometry(op, x.dims(), kernel, kernel, 0)?;
        let out = self.ctx.alloc(op, &[g.n, g.c, g.oh, g.ow])?;
        self.pool_dispatch(op, &kernels::AVG_POOL, g, out.numel(), vec![x], &out)?;
        Ok(out)
    }

    fn avg_pool2d_backward(
        &self,
        dy: &GpuTensor,
        kernel: usize,
        input_shape: &[usize],
    ) -> BackendResult<GpuTensor> {
        let op = "avg_pool2d_backward";
        let g = geometry(op, input_shape, kernel, kernel, 0)?;
        if dy.dims() != [g.n, g.c, g.oh, g.ow] {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: format!("an output gradient [{}, {}, {}, {}]", g.n, g.c, g.oh, g.ow),
                got: dy.dims().to_vec(),
            });
        }
        let out = self.ctx.alloc(op, input_shape)?;
        self.pool_dispatch(
            op,
            &kernels::AVG_POOL_BACKWARD,
            g,
            out.numel(),
            vec![dy],
            &out,
        )?;
        Ok(out)
    }
}
