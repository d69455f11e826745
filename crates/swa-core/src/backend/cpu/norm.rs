//! Batch-norm kernels (placeholder until the CPU engine lands).
use super::CpuTensor;
use crate::backend::{BackendError, BackendResult, BatchNormGrads, BatchNormSaved};

fn pending(op: &'static str) -> BackendError {
    BackendError::InvalidArgument {
        op,
        message: "not implemented on the CPU backend yet".into(),
    }
}

pub(super) fn train(
    _x: &CpuTensor,
    _g: &CpuTensor,
    _b: &CpuTensor,
    _rm: &mut CpuTensor,
    _rv: &mut CpuTensor,
    _momentum: f32,
    _eps: f32,
) -> BackendResult<(CpuTensor, BatchNormSaved<CpuTensor>)> {
    Err(pending("batch_norm_train"))
}
pub(super) fn eval(
    _x: &CpuTensor,
    _g: &CpuTensor,
    _b: &CpuTensor,
    _rm: &CpuTensor,
    _rv: &CpuTensor,
    _eps: f32,
) -> BackendResult<CpuTensor> {
    Err(pending("batch_norm_eval"))
}
pub(super) fn backward(
    _x: &CpuTensor,
    _g: &CpuTensor,
    _s: &BatchNormSaved<CpuTensor>,
    _dy: &CpuTensor,
) -> BackendResult<BatchNormGrads<CpuTensor>> {
    Err(pending("batch_norm_backward"))
}
