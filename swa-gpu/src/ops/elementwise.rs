//! Element-wise operations, the SGD step, the averaging updates and dropout masks.

use swa_core::backend::{per_image_extent, BackendError, BackendResult, ElementwiseOps, HasShape};

use crate::backend::{same_shape, u32_extent, GpuBackend};
use crate::context::{Dispatch, GpuTensor, Params};
use crate::kernels::{self, Kernel};
use crate::uniforms::ElementwiseParams;

impl GpuBackend {
    pub(crate) fn elementwise_params(&self, op: &'static str, n: usize) -> BackendResult<Params> {
        Ok(Params::of(&ElementwiseParams::count(op, n)?))
    }

    pub(crate) fn copy_buffer(&self, dst: &GpuTensor, src: &GpuTensor) {
        let bytes = src.bytes();
        if bytes == 0 {
            return;
        }
        self.ctx.with_encoder(|encoder| {
            encoder.copy_buffer_to_buffer(&src.buffer, 0, &dst.buffer, 0, bytes);
        });
    }

    /// `out = f(a, b)` element-wise for same-shaped operands.
    pub(crate) fn binary(
        &self,
        op: &'static str,
        kernel: &'static Kernel,
        a: &GpuTensor,
        b: &GpuTensor,
    ) -> BackendResult<GpuTensor> {
        same_shape(op, a, b)?;
        let out = self.ctx.alloc(op, a.dims())?;
        let n = a.numel();
        if n > 0 {
            let params = self.elementwise_params(op, n)?;
            self.ctx.encode(&[Dispatch::new(
                kernel,
                params,
                vec![&out, a, b],
                self.ctx.grid_1d(n),
            )])?;
        }
        Ok(out)
    }

    /// `out[j] = Σ_r src[r·cols + j]` over `rows` rows, in row order.
    pub(crate) fn column_sums(
        &self,
        op: &'static str,
        src: &GpuTensor,
        rows: usize,
        cols: usize,
        out: &GpuTensor,
    ) -> BackendResult<()> {
        if cols == 0 {
            return Ok(());
        }
        let params = Params::of(&ElementwiseParams {
            inner: u32_extent(op, "rows", rows)?,
            ..ElementwiseParams::count(op, cols)?
        });
        self.ctx.encode(&[Dispatch::new(
            &kernels::SUM_ROWS,
            params,
            vec![out, src],
            self.ctx.grid_1d(cols),
        )])
    }
}

impl ElementwiseOps<GpuTensor> for GpuBackend {
    fn relu(&self, x: &GpuTensor) -> BackendResult<GpuTensor> {
        let out = self.ctx.alloc("relu", x.dims())?;
        let n = x.numel();
        if n > 0 {
            let params = self.elementwise_params("relu", n)?;
            self.ctx.encode(&[Dispatch::new(
                &kernels::RELU,
                params,
                vec![&out, x],
                self.ctx.grid_1d(n),
            )])?;
        }
        Ok(out)
    }

    fn relu_(&self, x: &mut GpuTensor) -> BackendResult<()> {
        let n = x.numel();
        if n == 0 {
            return Ok(());
        }
        let params = self.elementwise_params("relu_", n)?;
        self.ctx.encode(&[Dispatch::new(
            &kernels::RELU_IN_PLACE,
            params,
            vec![x],
            self.ctx.grid_1d(n),
        )])
    }

    fn dropout_mask(&self, shape: &[usize], p: f32, seed: u64) -> BackendResult<GpuTensor> {
        if !(0.0..1.0).contains(&p) {
            return Err(BackendError::InvalidArgument {
                op: "dropout_mask",
                message: format!("drop probability {p} is outside [0, 1)"),
            });
        }
        let out = self.ctx.alloc("dropout_mask", shape)?;
        let n = out.numel();
        if n > 0 {
            let params = Params::of(&ElementwiseParams {
                a: 1.0 / (1.0 - p),
                b: p,
                seed_lo: seed as u32,
                seed_hi: (seed >> 32) as u32,
                ..ElementwiseParams::count("dropout_mask", n)?
            });
            self.ctx.encode(&[Dispatch::new(
                &kernels::DROPOUT_MASK,
                params,
                vec![&out],
                self.ctx.grid_1d(n),
            )])?;
        }
        Ok(out)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> BackendResult<GpuTensor> {
        self.binary("add", &kernels::ADD, a, b)
    }

    fn mul(&self, a: &GpuTensor, b: &GpuTensor) -> BackendResult<GpuTensor> {
        self.binary("mul", &kernels::MUL, a, b)
    }

    fn scale_per_image(&self, x: &GpuTensor, scales: &GpuTensor) -> BackendResult<GpuTensor> {
        let op = "scale_per_image";
        let per_image = per_image_extent(op, x.dims(), scales.dims())?;
        let out = self.ctx.alloc(op, x.dims())?;
        let n = x.numel();
        if n > 0 {
            let params = Params::of(&ElementwiseParams {
                inner: u32_extent(op, "elements per image", per_image)?,
                ..ElementwiseParams::count(op, n)?
            });
            self.ctx.encode(&[Dispatch::new(
                &kernels::SCALE_PER_IMAGE,
                params,
                vec![&out, x, scales],
                self.ctx.grid_1d(n),
            )])?;
        }
        Ok(out)
    }

    fn relu_backward(&self, y: &GpuTensor, dy: &GpuTensor) -> BackendResult<GpuTensor> {
        self.binary("relu_backward", &kernels::RELU_BACKWARD, y, dy)
    }

    fn narrow(
        &self,
        x: &GpuTensor,
        axis: usize,
        start: usize,
        len: usize,
    ) -> BackendResult<GpuTensor> {
        self.narrow_into_new(x, axis, start, len)
    }

    fn narrow_assign_(
        &self,
        dst: &mut GpuTensor,
        axis: usize,
        start: usize,
        src: &GpuTensor,
    ) -> BackendResult<()> {
        self.write_slice("narrow_assign_", dst, axis, start, src, false)
    }

    fn narrow_add_(
        &self,
        dst: &mut GpuTensor,
        axis: usize,
        start: usize,
        src: &GpuTensor,
    ) -> BackendResult<()> {
        self.write_slice("narrow_add_", dst, axis, start, src, true)
    }
}
