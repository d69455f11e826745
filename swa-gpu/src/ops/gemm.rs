//! Matrix products and convolutions, all on the one tiled GEMM kernel (convolutions as implicit GEMM).

use swa_core::backend::{
    Backend, BackendError, BackendResult, Conv2dGrads, Conv2dSpec, ConvOps, DenseOps, HasShape,
};

use crate::backend::{u32_extent, GpuBackend};
use crate::context::{Dispatch, GpuTensor, Params, Variant};
use crate::kernels;
use crate::uniforms::{ElementwiseParams, GemmParams};

/// Which operand loaders the GEMM kernel uses (the shader's `MODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GemmMode {
    Dense = 0,
    ConvForward = 1,
    ConvInputGrad = 2,
    ConvWeightGrad = 3,
}

/// Sizes and strides of one GEMM launch, in the order of the shader's `Params`.
#[derive(Clone, Copy, Debug, Default)]
struct GemmShape {
    m: usize,
    n: usize,
    k: usize,
    a_strides: (usize, usize),
    b_strides: (usize, usize),
    conv: ConvGeometry,
    has_bias: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct ConvGeometry {
    batch: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    oh: usize,
    ow: usize,
    ksize: usize,
    stride: usize,
    pad: usize,
}

/// The buffers of one GEMM launch: A's source, B's source, the output and an optional bias.
struct Operands<'a> {
    lhs: &'a GpuTensor,
    rhs: &'a GpuTensor,
    out: &'a GpuTensor,
    bias: Option<&'a GpuTensor>,
}

impl<'a> Operands<'a> {
    fn new(lhs: &'a GpuTensor, rhs: &'a GpuTensor, out: &'a GpuTensor) -> Self {
        Self {
            lhs,
            rhs,
            out,
            bias: None,
        }
    }
}

impl GpuBackend {
    /// How many slices to split K into so that small outputs with long reductions still fill the
    /// device; the slices' partial products are summed afterwards in a fixed order.
    fn split_k(&self, m: usize, n: usize, k: usize) -> usize {
        let t = self.ctx.tiles;
        let tiles = m.div_ceil(t.bm as usize) * n.div_ceil(t.bn as usize);
        let target = if self.ctx.info.device_type == wgpu::DeviceType::Cpu {
            4
        } else {
            256
        };
        let by_occupancy = target / tiles.max(1);
        let by_depth = k / (t.bk as usize * 8);
        by_occupancy.min(by_depth).clamp(1, 64)
    }

    /// Encodes `out = A · B` for the mode's loaders; `splits > 1` writes `splits` partial blocks.
    fn gemm(
        &self,
        op: &'static str,
        mode: GemmMode,
        shape: GemmShape,
        splits: usize,
        operands: Operands<'_>,
    ) -> BackendResult<()> {
        let Operands {
            lhs,
            rhs,
            out,
            bias,
        } = operands;
        if shape.m == 0 || shape.n == 0 {
            return Ok(());
        }
        let t = self.ctx.tiles;
        let k_chunk = shape.k.div_ceil(splits).div_ceil(t.bk as usize) * t.bk as usize;
        let splits = if shape.k == 0 {
            1
        } else {
            shape.k.div_ceil(k_chunk.max(1))
        };
        let groups_x = shape.n.div_ceil(t.bn as usize);
        let groups_y = shape.m.div_ceil(t.bm as usize);
        let max = self.ctx.limits.max_compute_workgroups_per_dimension as usize;
        if groups_x > max || groups_y > max || splits > max {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!(
                    "a {}×{} product needs {groups_x}×{groups_y} workgroups, over the adapter's {max} per dimension",
                    shape.m, shape.n
                ),
            });
        }
        let c = shape.conv;
        let u = |what: &str, v: usize| u32_extent(op, what, v);
        let params = Params::of(&GemmParams {
            m: u("M", shape.m)?,
            n: u("N", shape.n)?,
            k: u("K", shape.k)?,
            k_chunk: u("K chunk", k_chunk.max(1))?,
            a_row_stride: u("stride", shape.a_strides.0)?,
            a_col_stride: u("stride", shape.a_strides.1)?,
            b_row_stride: u("stride", shape.b_strides.0)?,
            b_col_stride: u("stride", shape.b_strides.1)?,
            batch: u("batch", c.batch)?,
            cin: u("input channels", c.cin)?,
            h: u("height", c.h)?,
            w: u("width", c.w)?,
            cout: u("output channels", c.cout)?,
            oh: u("output height", c.oh)?,
            ow: u("output width", c.ow)?,
            ksize: u("kernel", c.ksize)?,
            stride: u("stride", c.stride)?,
            pad: u("padding", c.pad)?,
            has_bias: u32::from(shape.has_bias),
        });
        let placeholder;
        let bias = match bias {
            Some(b) => b,
            None => {
                placeholder = self.ctx.alloc(op, &[1])?;
                &placeholder
            }
        };
        let mut dispatch = Dispatch::new(
            &kernels::GEMM_KERNEL,
            params,
            vec![lhs, rhs, out, bias],
            [groups_x as u32, groups_y as u32, splits as u32],
        );
        // vec4 loads need contiguous rows whose length (and so every tile's start) is a multiple of 4.
        let vec_a = match mode {
            GemmMode::Dense => shape.a_strides.1 == 1 && shape.k.is_multiple_of(4),
            GemmMode::ConvForward => shape.k.is_multiple_of(4),
            GemmMode::ConvInputGrad | GemmMode::ConvWeightGrad => false,
        };
        let vec_b = mode == GemmMode::Dense && shape.b_strides.1 == 1 && shape.n.is_multiple_of(4);
        let ksize = match mode {
            GemmMode::Dense => 1,
            _ => u("kernel", c.ksize)?,
        };
        dispatch.variant = Variant::Gemm {
            tiles: t,
            mode: mode as u32,
            ksize,
            vec_a,
            vec_b,
        };
        self.ctx.encode(&[dispatch])
    }

    /// A row-major `[M, N]` product, through split-K partial blocks when that fills the device better.
    fn gemm_rowmajor(
        &self,
        op: &'static str,
        mode: GemmMode,
        shape: GemmShape,
        lhs: &GpuTensor,
        rhs: &GpuTensor,
        out_shape: &[usize],
    ) -> BackendResult<GpuTensor> {
        let mut out = self.ctx.alloc(op, out_shape)?;
        if shape.k == 0 {
            self.fill_(&mut out, 0.0)?;
            return Ok(out);
        }
        let splits = self.split_k(shape.m, shape.n, shape.k);
        if splits <= 1 {
            self.gemm(op, mode, shape, 1, Operands::new(lhs, rhs, &out))?;
        } else {
            let partial = self.ctx.alloc(op, &[splits, shape.m * shape.n])?;
            self.gemm(op, mode, shape, splits, Operands::new(lhs, rhs, &partial))?;
            // `gemm` may merge slices when K is short; sum exactly the blocks it wrote.
            let t = self.ctx.tiles;
            let k_chunk = shape.k.div_ceil(splits).div_ceil(t.bk as usize) * t.bk as usize;
            let written = shape.k.div_ceil(k_chunk);
            self.column_sums(op, &partial, written, shape.m * shape.n, &out)?;
        }
        Ok(out)
    }

    fn conv_geometry(
        &self,
        op: &'static str,
        x: &GpuTensor,
        weight: &GpuTensor,
        spec: Conv2dSpec,
    ) -> BackendResult<ConvGeometry> {
        let [batch, cin, h, w] = *x.dims() else {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: "an input [N, C, H, W]".into(),
                got: x.dims().to_vec(),
            });
        };
        let [cout, wcin, kh, kw] = *weight.dims() else {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: "a weight [Cout, Cin, K, K]".into(),
                got: weight.dims().to_vec(),
            });
        };
        if wcin != cin || kh != kw {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: format!(
                    "a square weight [Cout, {cin}, K, K] for an input with {cin} channels"
                ),
                got: weight.dims().to_vec(),
            });
        }
        let invalid = || {
            BackendError::InvalidArgument {
            op,
            message: format!(
                "a {kh}×{kw} kernel with {spec:?} does not fit an input of {h}×{w} (stride must be ≥ 1)"
            ),
        }
        };
        let oh = spec.output_extent(h, kh).ok_or_else(invalid)?;
        let ow = spec.output_extent(w, kw).ok_or_else(invalid)?;
        if kh == 0 {
            return Err(invalid());
        }
        Ok(ConvGeometry {
            batch,
            cin,
            h,
            w,
            cout,
            oh,
            ow,
            ksize: kh,
            stride: spec.stride,
            pad: spec.padding,
        })
    }
}

impl DenseOps<GpuTensor> for GpuBackend {
    fn matmul(
        &self,
        a: &GpuTensor,
        b: &GpuTensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> BackendResult<GpuTensor> {
        let op = "matmul";
        let two_d = |t: &GpuTensor, which: &str| match t.dims() {
            [r, c] => Ok((*r, *c)),
            other => Err(BackendError::ShapeMismatch {
                op,
                expected: format!("a 2-D {which}"),
                got: other.to_vec(),
            }),
        };
        let (ar, ac) = two_d(a, "left operand")?;
        let (br, bc) = two_d(b, "right operand")?;
        let (m, k) = if transpose_a { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if transpose_b { (bc, br) } else { (br, bc) };
        if k != kb {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: format!(
                    "a right operand with {k} rows after transposition (transpose_b = {transpose_b})"
                ),
                got: b.dims().to_vec(),
            });
        }
        let shape = GemmShape {
            m,
            n,
            k,
            a_strides: if transpose_a { (1, m) } else { (k, 1) },
            b_strides: if transpose_b { (1, k) } else { (n, 1) },
            ..GemmShape::default()
        };
        self.gemm_rowmajor(op, GemmMode::Dense, shape, a, b, &[m, n])
    }

    fn add_row_bias_(&self, x: &mut GpuTensor, bias: &GpuTensor) -> BackendResult<()> {
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
        let params = Params::of(&ElementwiseParams {
            inner: u32_extent(op, "columns", *cols)?,
            ..ElementwiseParams::count(op, n)?
        });
        self.ctx.encode(&[Dispatch::new(
            &kernels::ADD_ROW_BIAS,
            params,
            vec![x, bias],
            self.ctx.grid_1d(n),
        )])
    }

    fn sum_rows(&self, x: &GpuTensor) -> BackendResult<GpuTensor> {
        let [rows, cols] = x.dims() else {
            return Err(BackendError::ShapeMismatch {
                op: "sum_rows",
                expected: "a 2-D tensor [n, m]".into(),
                got: x.dims().to_vec(),
            });
        };
        let (rows, cols) = (*rows, *cols);
        let mut out = self.ctx.alloc("sum_rows", &[cols])?;
        if rows == 0 {
            self.fill_(&mut out, 0.0)?;
        } else {
            self.column_sums("sum_rows", x, rows, cols, &out)?;
        }
        Ok(out)
    }
}

impl ConvOps<GpuTensor> for GpuBackend {
    fn conv2d(
        &self,
        x: &GpuTensor,
        weight: &GpuTensor,
        bias: Option<&GpuTensor>,
        spec: Conv2dSpec,
    ) -> BackendResult<GpuTensor> {
        let op = "conv2d";
        let g = self.conv_geometry(op, x, weight, spec)?;
        if let Some(b) = bias {
            if b.dims() != [g.cout] {
                return Err(BackendError::ShapeMismatch {
                    op,
                    expected: format!("a bias [{}]", g.cout),
                    got: b.dims().to_vec(),
                });
            }
        }
        let out = self.ctx.alloc(op, &[g.batch, g.cout, g.oh, g.ow])?;
        let shape = GemmShape {
            m: g.cout,
            n: g.batch * g.oh * g.ow,
            k: g.cin * g.ksize * g.ksize,
            conv: g,
            has_bias: bias.is_some(),
            ..GemmShape::default()
        };
        self.gemm(
            op,
            GemmMode::ConvForward,
            shape,
            1,
            Operands {
                bias,
                ..Operands::new(weight, x, &out)
            },
        )?;
        Ok(out)
    }

    fn conv2d_backward(
        &self,
        x: &GpuTensor,
        weight: &GpuTensor,
        dy: &GpuTensor,
        spec: Conv2dSpec,
        need_input_grad: bool,
        need_bias_grad: bool,
    ) -> BackendResult<Conv2dGrads<GpuTensor>> {
        let op = "conv2d_backward";
        let g = self.conv_geometry(op, x, weight, spec)?;
        if dy.dims() != [g.batch, g.cout, g.oh, g.ow] {
            return Err(BackendError::ShapeMismatch {
                op,
                expected: format!(
                    "an output gradient [{}, {}, {}, {}]",
                    g.batch, g.cout, g.oh, g.ow
                ),
                got: dy.dims().to_vec(),
            });
        }
        let taps = g.ksize * g.ksize;
        let input = if need_input_grad {
            let dx = self.ctx.alloc(op, x.dims())?;
            let shape = GemmShape {
                m: g.cin,
                n: g.batch * g.h * g.w,
                k: g.cout * taps,
                conv: g,
                ..GemmShape::default()
            };
            self.gemm(
                op,
                GemmMode::ConvInputGrad,
                shape,
                1,
                Operands::new(weight, dy, &dx),
            )?;
            Some(dx)
        } else {
            None
        };
        let shape = GemmShape {
            m: g.cout,
            n: g.cin * taps,
            k: g.batch * g.oh * g.ow,
            conv: g,
            ..GemmShape::default()
        };
        let weight_grad =
            self.gemm_rowmajor(op, GemmMode::ConvWeightGrad, shape, dy, x, weight.dims())?;
        let bias = if need_bias_grad {
            Some(self.channel_sums(op, dy, g.batch, g.cout, g.oh * g.ow)?)
        } else {
            None
        };
        Ok(Conv2dGrads {
            input,
            weight: weight_grad,
            bias,
        })
    }
}
