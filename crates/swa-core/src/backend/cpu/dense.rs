//! Dense kernels (placeholder until the CPU engine lands).
use super::CpuTensor;
use crate::backend::{BackendError, BackendResult};

fn pending(op: &'static str) -> BackendError {
    BackendError::InvalidArgument {
        op,
        message: "not implemented on the CPU backend yet".into(),
    }
}

pub(super) fn matmul(
    _a: &CpuTensor,
    _b: &CpuTensor,
    _ta: bool,
    _tb: bool,
) -> BackendResult<CpuTensor> {
    Err(pending("matmul"))
}
pub(super) fn add_row_bias(_x: &mut CpuTensor, _b: &CpuTensor) -> BackendResult<()> {
    Err(pending("add_row_bias_"))
}
pub(super) fn sum_rows(_x: &CpuTensor) -> BackendResult<CpuTensor> {
    Err(pending("sum_rows"))
}
