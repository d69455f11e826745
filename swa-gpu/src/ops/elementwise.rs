//! Element-wise operations, the SGD step, the averaging updates and dropout masks.

use swa_core::backend::{BackendError, BackendResult, HasShape, SgdStep};

use crate::backend::{same_shape, u32_extent, GpuBackend};
use crate::context::{Dispatch, GpuTensor, Params, Variant};
use crate::kernels::{self, Kernel};

impl GpuBackend {
    fn elementwise_params(&self, op: &'static str, n: usize) -> BackendResult<Params> {
        Ok(Params::new().u(u32_extent(op, "element count", n)?))
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

    pub(crate) fn fill(&self, tensor: &GpuTensor, value: f32) -> BackendResult<()> {
        let n = tensor.numel();
        if n == 0 {
            return Ok(());
        }
        let params = self.elementwise_params("fill_", n)?.f(value);
        self.ctx.encode(&[Dispatch::new(
            &kernels::FILL,
            params,
            vec![tensor],
            self.ctx.grid_1d(n),
        )])
    }

    pub(crate) fn scale(&self, tensor: &GpuTensor, factor: f32) -> BackendResult<()> {
        let n = tensor.numel();
        if n == 0 {
            return Ok(());
        }
        let params = self.elementwise_params("scale_", n)?.f(factor);
        self.ctx.encode(&[Dispatch::new(
            &kernels::SCALE,
            params,
            vec![tensor],
            self.ctx.grid_1d(n),
        )])
    }

    pub(crate) fn axpy(&self, dst: &GpuTensor, alpha: f32, x: &GpuTensor) -> BackendResult<()> {
        same_shape("axpy_", dst, x)?;
        let n = dst.numel();
        if n == 0 {
            return Ok(());
        }
        let params = self.elementwise_params("axpy_", n)?.f(alpha);
        self.ctx.encode(&[Dispatch::new(
            &kernels::AXPY,
            params,
            vec![dst, x],
            self.ctx.grid_1d(n),
        )])
    }

    /// The SWA update over all pairs: up to eight pairs per dispatch, bound side by side and treated as
    /// one concatenated range, and all dispatches in one compute pass with no submission in between.
    pub(crate) fn lerp_many(
        &self,
        dsts: &mut [&mut GpuTensor],
        srcs: &[&GpuTensor],
        weight: f32,
    ) -> BackendResult<()> {
        let op = "lerp_many_";
        if dsts.len() != srcs.len() {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!("{} destinations but {} sources", dsts.len(), srcs.len()),
            });
        }
        let mut pairs = Vec::with_capacity(dsts.len());
        for (dst, src) in dsts.iter().zip(srcs) {
            same_shape("lerp_", dst, src)?;
            if dst.numel() > 0 {
                pairs.push((&**dst, *src));
            }
        }
        let per_dispatch = (self.ctx.limits.max_storage_buffers_per_shader_stage as usize / 2)
            .clamp(1, kernels::LERP_MANY_MAX_PAIRS);
        let mut dispatches = Vec::new();
        let mut rest = &pairs[..];
        while !rest.is_empty() {
            // Take pairs while the concatenated count stays within 32-bit indexing.
            let mut take = 0;
            let mut total = 0usize;
            while take < per_dispatch.min(rest.len()) {
                let next = total + rest[take].0.numel();
                if take > 0 && next > u32::MAX as usize {
                    break;
                }
                total = next;
                take += 1;
            }
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let mut params = Params::new()
                .f(weight)
                .u(u32_extent(op, "element count", total)?)
                .u(take as u32)
                .u(0);
            let mut end = 0usize;
            let mut buffers = Vec::with_capacity(2 * take);
            for (dst, src) in chunk {
                end += dst.numel();
                params = params.u(end as u32);
                buffers.push(*dst);
                buffers.push(*src);
            }
            let mut dispatch = Dispatch::new(
                &kernels::LERP_MANY_KERNELS[take - 1],
                params,
                buffers,
                self.ctx.grid_1d(total),
            );
            dispatch.variant = Variant::LerpMany { pairs: take };
            dispatches.push(dispatch);
        }
        self.ctx.encode(&dispatches)
    }

    pub(crate) fn sgd(
        &self,
        param: &GpuTensor,
        grad: &GpuTensor,
        momentum: &GpuTensor,
        step: &SgdStep,
    ) -> BackendResult<()> {
        same_shape("sgd_step_", param, grad)?;
        same_shape("sgd_step_", param, momentum)?;
        let n = param.numel();
        if n == 0 {
            return Ok(());
        }
        let params = self
            .elementwise_params("sgd_step_", n)?
            .f(step.lr)
            .f(step.momentum)
            .f(step.weight_decay)
            .f(step.dampening)
            .u(u32::from(step.nesterov));
        self.ctx.encode(&[Dispatch::new(
            &kernels::SGD,
            params,
            vec![param, grad, momentum],
            self.ctx.grid_1d(n),
        )])
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

    pub(crate) fn relu_forward(&self, x: &GpuTensor) -> BackendResult<GpuTensor> {
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

    pub(crate) fn dropout(&self, shape: &[usize], p: f32, seed: u64) -> BackendResult<GpuTensor> {
        if !(0.0..1.0).contains(&p) {
            return Err(BackendError::InvalidArgument {
                op: "dropout_mask",
                message: format!("drop probability {p} is outside [0, 1)"),
            });
        }
        let out = self.ctx.alloc("dropout_mask", shape)?;
        let n = out.numel();
        if n > 0 {
            let params = self
                .elementwise_params("dropout_mask", n)?
                .f(1.0 / (1.0 - p))
                .f(p)
                .f(0.0)
                .f(0.0)
                .u(0)
                .u(seed as u32)
                .u((seed >> 32) as u32);
            self.ctx.encode(&[Dispatch::new(
                &kernels::DROPOUT_MASK,
                params,
                vec![&out],
                self.ctx.grid_1d(n),
            )])?;
        }
        Ok(out)
    }

    pub(crate) fn add_row_bias(&self, x: &GpuTensor, bias: &GpuTensor) -> BackendResult<()> {
        let op = "add_row_bias_";
        let [_, cols] = x.dims() else {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: "a 2-D tensor [n, m]".into(),
                got: x.dims().to_vec(),
            });
        };
        if bias.dims() != [*cols] {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: format!("a bias of shape [{cols}]"),
                got: bias.dims().to_vec(),
            });
        }
        let n = x.numel();
        if n == 0 {
            return Ok(());
        }
        let params = self
            .elementwise_params(op, n)?
            .f(0.0)
            .f(0.0)
            .f(0.0)
            .f(0.0)
            .u(0)
            .u(0)
            .u(0)
            .u(u32_extent(op, "columns", *cols)?);
        self.ctx.encode(&[Dispatch::new(
            &kernels::ADD_ROW_BIAS,
            params,
            vec![x, bias],
            self.ctx.grid_1d(n),
        )])
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
        let params = self
            .elementwise_params(op, cols)?
            .f(0.0)
            .f(0.0)
            .f(0.0)
            .f(0.0)
            .u(0)
            .u(0)
            .u(0)
            .u(u32_extent(op, "rows", rows)?);
        self.ctx.encode(&[Dispatch::new(
            &kernels::SUM_ROWS,
            params,
            vec![out, src],
            self.ctx.grid_1d(cols),
        )])
    }

    pub(crate) fn sum_rows_impl(&self, x: &GpuTensor) -> BackendResult<GpuTensor> {
        let [rows, cols] = x.dims() else {
            return Err(BackendError::ShapeMismatch {
                op: "sum_rows",
                expected: "a 2-D tensor [n, m]".into(),
                got: x.dims().to_vec(),
            });
        };
        let (rows, cols) = (*rows, *cols);
        let out = self.ctx.alloc("sum_rows", &[cols])?;
        if rows == 0 {
            self.fill(&out, 0.0)?;
        } else {
            self.column_sums("sum_rows", x, rows, cols, &out)?;
        }
        Ok(out)
    }
}
