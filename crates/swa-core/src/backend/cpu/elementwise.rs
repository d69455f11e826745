//! Element-wise kernels: averaging, the fused SGD step, dropout masks.

use ndarray::{ArrayD, IxDyn, Zip};

use super::CpuTensor;
use crate::backend::{dropout_keeps, BackendError, BackendResult, SgdStep};

pub(super) fn lerp(dst: &mut CpuTensor, src: &CpuTensor, weight: f32) {
    Zip::from(dst)
        .and(src)
        .par_for_each(|d, &s| *d += weight * (s - *d));
}

pub(super) fn sgd_step(param: &mut CpuTensor, grad: &CpuTensor, buf: &mut CpuTensor, h: &SgdStep) {
    let SgdStep {
        lr,
        momentum,
        weight_decay,
        dampening,
        nesterov,
    } = *h;
    Zip::from(param)
        .and(grad)
        .and(buf)
        .par_for_each(|p, &g, b| {
            let d = g + weight_decay * *p;
            *b = momentum * *b + (1.0 - dampening) * d;
            let step = if nesterov { d + momentum * *b } else { *b };
            *p -= lr * step;
        });
}

pub(super) fn dropout_mask(shape: &[usize], p: f32, seed: u64) -> BackendResult<CpuTensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(BackendError::InvalidArgument {
            op: "dropout_mask",
            message: format!("drop probability {p} is outside [0, 1)"),
        });
    }
    let n: usize = shape.iter().product();
    if n > u32::MAX as usize {
        return Err(BackendError::InvalidArgument {
            op: "dropout_mask",
            message: format!("{n} elements exceed the mask's 32-bit counter"),
        });
    }
    let keep = 1.0 / (1.0 - p);
    let values = (0..n as u32)
        .map(|i| if dropout_keeps(seed, i, p) { keep } else { 0.0 })
        .collect();
    Ok(ArrayD::from_shape_vec(IxDyn(shape), values).expect("length equals the shape's product"))
}
