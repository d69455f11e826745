//! Softmax and the mean softmax cross-entropy.

use swa_core::backend::{BackendError, BackendResult, CrossEntropy, HasShape, LossOps};

use crate::backend::{u32_extent, GpuBackend};
use crate::context::{Dispatch, GpuTensor, Params};
use crate::kernels;
use crate::uniforms::LossParams;

fn rows_and_classes(op: &'static str, logits: &GpuTensor) -> BackendResult<(usize, usize)> {
    match *logits.dims() {
        [rows, classes] if classes > 0 => Ok((rows, classes)),
        _ => Err(BackendError::ShapeMismatch {
            op,
            expected: "logits [N, classes] with at least one class".into(),
            got: logits.dims().to_vec(),
        }),
    }
}

impl GpuBackend {}

impl LossOps<GpuTensor> for GpuBackend {
    fn softmax_cross_entropy(
        &self,
        logits: &GpuTensor,
        labels: &[u32],
    ) -> BackendResult<CrossEntropy<GpuTensor>> {
        let op = "softmax_cross_entropy";
        let (rows, classes) = rows_and_classes(op, logits)?;
        if labels.len() != rows {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!("{} labels for {rows} rows of logits", labels.len()),
            });
        }
        if rows == 0 {
            return Err(BackendError::InvalidArgument {
                op,
                message: "the mean loss of an empty batch is undefined".into(),
            });
        }
        if let Some((row, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= classes)
        {
            return Err(BackendError::InvalidArgument {
                op,
                message: format!(
                    "label {label} of row {row} is out of range for {classes} classes"
                ),
            });
        }
        let label_buffer = self.ctx.alloc(op, &[rows])?;
        self.ctx
            .upload(op, &label_buffer, bytemuck::cast_slice(labels))?;
        let grad = self.ctx.alloc(op, logits.dims())?;
        let row_loss = self.ctx.alloc(op, &[rows])?;
        let loss = self.ctx.alloc(op, &[1])?;
        let params = Params::of(&LossParams {
            rows: u32_extent(op, "rows", rows)?,
            classes: u32_extent(op, "classes", classes)?,
        });
        self.ctx.encode(&[
            Dispatch::new(
                &kernels::CROSS_ENTROPY_ROWS,
                params.clone(),
                vec![logits, &label_buffer, &grad, &row_loss],
                [rows.div_ceil(64) as u32, 1, 1],
            ),
            Dispatch::new(
                &kernels::MEAN_LOSS,
                params,
                vec![&row_loss, &loss],
                [1, 1, 1],
            ),
        ])?;
        Ok(CrossEntropy { loss, grad })
    }

    fn softmax(&self, logits: &GpuTensor) -> BackendResult<GpuTensor> {
        let op = "softmax";
        let (rows, classes) = rows_and_classes(op, logits)?;
        let out = self.ctx.alloc(op, logits.dims())?;
        if rows > 0 {
            let params = Params::of(&LossParams {
                rows: u32_extent(op, "rows", rows)?,
                classes: u32_extent(op, "classes", classes)?,
            });
            self.ctx.encode(&[Dispatch::new(
                &kernels::SOFTMAX,
                params,
                vec![logits, &out],
                [rows.div_ceil(64) as u32, 1, 1],
            )])?;
        }
        Ok(out)
    }
}
