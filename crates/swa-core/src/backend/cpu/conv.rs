//! Convolution kernels (placeholder until the CPU engine lands).
use super::CpuTensor;
use crate::backend::{BackendError, BackendResult, Conv2dGrads, Conv2dSpec};

fn pending(op: &'static str) -> BackendError {
    BackendError::InvalidArgument {
        op,
        message: "not implemented on the CPU backend yet".into(),
    }
}

pub(super) fn forward(
    _x: &CpuTensor,
    _w: &CpuTensor,
    _b: Option<&CpuTensor>,
    _s: Conv2dSpec,
) -> BackendResult<CpuTensor> {
    Err(pending("conv2d"))
}

pub(super) fn backward(
    _x: &CpuTensor,
    _w: &CpuTensor,
    _dy: &CpuTensor,
    _s: Conv2dSpec,
    _need_input: bool,
    _need_bias: bool,
) -> BackendResult<Conv2dGrads<CpuTensor>> {
    Err(pending("conv2d_backward"))
}
