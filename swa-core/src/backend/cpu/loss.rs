//! Softmax and the mean softmax cross-entropy over a batch of logits `[N, classes]`.

use super::matrix::{contiguous, into_tensor};
use super::{CpuBackend, CpuTensor};
use crate::backend::{BackendError, BackendResult, CrossEntropy, LossOps};

fn rows_of(op: &'static str, logits: &CpuTensor) -> BackendResult<(usize, usize)> {
    match *logits.shape() {
        [rows, classes] if classes > 0 => Ok((rows, classes)),
        _ => Err(BackendError::ShapeMismatch {
            op,
            expected: "logits of rank 2 [N, classes] with at least one class".into(),
            got: logits.shape().to_vec(),
        }),
    }
}

/// Writes `softmax(row)` into `out` and returns `log Σ exp(row)`, shifted by the row's maximum so that
/// nothing overflows.
fn softmax_row(row: &[f32], out: &mut [f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f64;
    for (o, &v) in out.iter_mut().zip(row) {
        *o = (v - max).exp();
        total += f64::from(*o);
    }
    let inv = (1.0 / total) as f32;
    out.iter_mut().for_each(|o| *o *= inv);
    f64::from(max) + total.ln()
}

impl LossOps<CpuTensor> for CpuBackend {
    fn softmax_cross_entropy(
        &self,
        logits: &CpuTensor,
        labels: &[u32],
    ) -> BackendResult<CrossEntropy<CpuTensor>> {
        const OP: &str = "softmax_cross_entropy";
        let (rows, classes) = rows_of(OP, logits)?;
        if labels.len() != rows {
            return Err(BackendError::InvalidArgument {
                op: OP,
                message: format!("{} labels for {rows} rows of logits", labels.len()),
            });
        }
        if let Some((row, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= classes)
        {
            return Err(BackendError::InvalidArgument {
                op: OP,
                message: format!("label {label} of row {row} is outside 0..{classes}"),
            });
        }
        let values = contiguous(logits);
        let mut grad = vec![0.0f32; rows * classes];
        let mut total = 0.0f64;
        let inv_rows = 1.0 / rows.max(1) as f32;
        for ((row, g), &label) in values
            .chunks_exact(classes)
            .zip(grad.chunks_exact_mut(classes))
            .zip(labels)
        {
            let log_sum = softmax_row(row, g);
            let label = label as usize;
            total += log_sum - f64::from(row[label]);
            g[label] -= 1.0;
            g.iter_mut().for_each(|v| *v *= inv_rows);
        }
        let loss = if rows == 0 {
            0.0
        } else {
            (total / rows as f64) as f32
        };
        Ok(CrossEntropy {
            loss: into_tensor(OP, &[1], vec![loss])?,
            grad: into_tensor(OP, &[rows, classes], grad)?,
        })
    }

    fn softmax(&self, logits: &CpuTensor) -> BackendResult<CpuTensor> {
        const OP: &str = "softmax";
        let (rows, classes) = rows_of(OP, logits)?;
        let values = contiguous(logits);
        let mut out = vec![0.0f32; rows * classes];
        for (row, o) in values
            .chunks_exact(classes)
            .zip(out.chunks_exact_mut(classes))
        {
            softmax_row(row, o);
        }
        into_tensor(OP, &[rows, classes], out)
    }
}
