//! One SGD training step, exactly as the [`Trainer`](crate::train::Trainer) takes it.
//!
//! The trainer, swa-bench's training figures and `cargo xtask reproduce`'s time estimate all call
//! [`sgd_step`], so that a benchmark or an estimate measures the step training actually takes: the batch
//! upload, the training forward pass, the loss read back (to stop on a non-finite loss), the logits read
//! back (for the epoch's training accuracy), the backward pass and the SGD update.

use swa_core::backend::Backend;

use crate::batch::HostBatch;
use crate::error::TrainError;
use crate::evaluate::{log_softmax_rows, MetricsAccumulator};
use crate::module::{ForwardMode, Module};
use crate::optim::Sgd;

/// Trains `model` on `batch` with one step of `optimizer` at learning rate `lr`; `seed` draws the step's
/// dropout masks. The batch's loss and accuracy are added to `metrics`.
///
/// Returns the batch's mean cross-entropy. When it is not finite, nothing is back-propagated and the
/// weights are left as they were, so that the caller can report the step (the trainer stops the run
/// with [`TrainError::NonFiniteLoss`]) without the non-finite values having reached the weights.
pub fn sgd_step<B: Backend>(
    backend: &B,
    model: &mut dyn Module<B>,
    optimizer: &mut Sgd<B>,
    batch: &HostBatch,
    lr: f32,
    seed: u64,
    metrics: &mut MetricsAccumulator,
) -> Result<f32, TrainError> {
    batch.validate()?;
    let x = backend
        .from_host(&batch.images, &batch.shape)
        .map_err(TrainError::backend("uploading a batch"))?;
    let logits = model
        .forward_owned(backend, x, ForwardMode::Train { seed })
        .map_err(TrainError::backend("training forward pass"))?;
    let ce = backend
        .softmax_cross_entropy(&logits, &batch.labels)
        .map_err(TrainError::backend("loss"))?;
    let loss = backend
        .to_host(&ce.loss)
        .map_err(TrainError::backend("reading the loss"))?
        .first()
        .copied()
        .unwrap_or(f32::NAN);
    if !loss.is_finite() {
        return Ok(loss);
    }
    let host_logits = backend
        .to_host(&logits)
        .map_err(TrainError::backend("reading logits"))?;
    let classes = host_logits.len() / batch.len().max(1);
    metrics.add_log_probs(
        &log_softmax_rows(&host_logits, classes),
        classes,
        &batch.labels,
    );
    model
        .backward(backend, &ce.grad)
        .map_err(TrainError::backend("backward pass"))?;
    optimizer.step(backend, model, lr)?;
    Ok(loss)
}

/// Seconds per training image of [`sgd_step`] on `batches`, the fastest of the steps after the first
/// (which warms caches and, on a GPU, compiles pipelines). The steps run at learning rate 0, so the
/// weights keep their values; momentum buffers and BatchNorm running statistics do not.
///
/// Returns `None` with fewer than two batches. This is what `cargo xtask reproduce` multiplies by the
/// epoch's images to plan a run, so a plan counts the step training takes, read-backs included.
pub fn seconds_per_image<B: Backend>(
    backend: &B,
    model: &mut dyn Module<B>,
    optimizer: &mut Sgd<B>,
    batches: &[HostBatch],
) -> Result<Option<f64>, TrainError> {
    let mut metrics = MetricsAccumulator::default();
    let mut fastest: Option<f64> = None;
    for (i, batch) in batches.iter().enumerate() {
        let started = std::time::Instant::now();
        sgd_step(
            backend,
            model,
            optimizer,
            batch,
            0.0,
            i as u64,
            &mut metrics,
        )?;
        backend
            .synchronize()
            .map_err(TrainError::backend("waiting for the device"))?;
        if i > 0 {
            let per_image = started.elapsed().as_secs_f64() / batch.len().max(1) as f64;
            fastest = Some(fastest.map_or(per_image, |f| f.min(per_image)));
        }
    }
    Ok(fastest)
}
