//! Loss kernels (placeholder until the CPU engine lands).
use super::CpuTensor;
use crate::backend::{BackendError, BackendResult, CrossEntropy};

fn pending(op: &'static str) -> BackendError {
    BackendError::InvalidArgument {
        op,
        message: "not implemented on the CPU backend yet".into(),
    }
}

pub(super) fn softmax_cross_entropy(
    _l: &CpuTensor,
    _y: &[u32],
) -> BackendResult<CrossEntropy<CpuTensor>> {
    Err(pending("softmax_cross_entropy"))
}
pub(super) fn softmax(_l: &CpuTensor) -> BackendResult<CpuTensor> {
    Err(pending("softmax"))
}
