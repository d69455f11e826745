//! Pooling kernels (placeholder until the CPU engine lands).
use super::CpuTensor;
use crate::backend::{BackendError, BackendResult};

fn pending(op: &'static str) -> BackendError {
    BackendError::InvalidArgument {
        op,
        message: "not implemented on the CPU backend yet".into(),
    }
}

pub(super) fn max_forward(_x: &CpuTensor, _k: usize, _s: usize) -> BackendResult<CpuTensor> {
    Err(pending("max_pool2d"))
}
pub(super) fn max_backward(
    _x: &CpuTensor,
    _dy: &CpuTensor,
    _k: usize,
    _s: usize,
) -> BackendResult<CpuTensor> {
    Err(pending("max_pool2d_backward"))
}
pub(super) fn avg_forward(_x: &CpuTensor, _k: usize) -> BackendResult<CpuTensor> {
    Err(pending("avg_pool2d"))
}
pub(super) fn avg_backward(
    _dy: &CpuTensor,
    _k: usize,
    _shape: &[usize],
) -> BackendResult<CpuTensor> {
    Err(pending("avg_pool2d_backward"))
}
