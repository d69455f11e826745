//! Dense-layer kernels: the matrix product, the row bias and its gradient.

use super::matrix::{contiguous, gemm_into, into_tensor, parallelism, MatRef};
use super::{rank, CpuBackend, CpuTensor};
use crate::backend::{BackendError, BackendResult, DenseOps};

impl DenseOps<CpuTensor> for CpuBackend {
    fn matmul(
        &self,
        a: &CpuTensor,
        b: &CpuTensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> BackendResult<CpuTensor> {
        self.install(|| {
            rank("matmul", a, 2, "left operand")?;
            rank("matmul", b, 2, "right operand")?;
            let (a_rows, a_cols) = (a.shape()[0], a.shape()[1]);
            let (b_rows, b_cols) = (b.shape()[0], b.shape()[1]);
            let (m, k) = if transpose_a {
                (a_cols, a_rows)
            } else {
                (a_rows, a_cols)
            };
            let (k_b, n) = if transpose_b {
                (b_cols, b_rows)
            } else {
                (b_rows, b_cols)
            };
            if k != k_b {
                return Err(BackendError::ShapeMismatch {
                    op: "matmul",
                    expected: format!(
                        "a right operand whose {} has {k} entries to match the left operand {:?}{}",
                        if transpose_b { "row" } else { "column" },
                        a.shape(),
                        if transpose_a { " (transposed)" } else { "" }
                    ),
                    got: b.shape().to_vec(),
                });
            }
            let a_data = contiguous(a);
            let b_data = contiguous(b);
            let mut lhs = MatRef::row_major(&a_data, a_rows, a_cols);
            if transpose_a {
                lhs = lhs.t();
            }
            let mut rhs = MatRef::row_major(&b_data, b_rows, b_cols);
            if transpose_b {
                rhs = rhs.t();
            }
            let mut out = vec![0.0; m * n];
            gemm_into(&mut out, lhs, rhs, false, parallelism(true));
            into_tensor("matmul", &[m, n], out)
        })
    }

    fn add_row_bias_(&self, x: &mut CpuTensor, bias: &CpuTensor) -> BackendResult<()> {
        check_bias("add_row_bias_", x, bias)?;
        for mut row in x.rows_mut() {
            row += bias;
        }
        Ok(())
    }

    fn sum_rows(&self, x: &CpuTensor) -> BackendResult<CpuTensor> {
        rank("sum_rows", x, 2, "input")?;
        let cols = x.shape()[1];
        // Rows are added in order, one column-wise vector addition at a time: a fixed order, so the sum is
        // deterministic, and each step vectorises over the columns.
        let mut sums = vec![0.0f32; cols];
        for row in x.rows() {
            for (s, &v) in sums.iter_mut().zip(row.iter()) {
                *s += v;
            }
        }
        into_tensor("sum_rows", &[cols], sums)
    }
}

fn check_bias(op: &'static str, x: &CpuTensor, bias: &CpuTensor) -> BackendResult<()> {
    rank(op, x, 2, "input")?;
    if bias.shape() != [x.shape()[1]] {
        return Err(BackendError::ShapeMismatch {
            op,
            expected: format!(
                "a bias of shape [{}] for the input {:?}",
                x.shape()[1],
                x.shape()
            ),
            got: bias.shape().to_vec(),
        });
    }
    Ok(())
}
