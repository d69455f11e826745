//! One SGD training step, exactly as the [`Trainer`](crate::train::Trainer) takes it.
//!
//! The trainer, swa-bench's training figures and `cargo xtask reproduce`'s time estimate all call
//! [`sgd_step`], so that a benchmark or an estimate measures the step training actually takes: the batch
//! upload, the training forward pass, the loss read back (to stop on a non-finite loss), the logits read
//! back (for the epoch's training accuracy), the backward pass and the SGD update.
//!
//! Data-parallel training takes the same step: [`sgd_step_synchronized`] is that step with a [`StepSync`]
//! between the ranks, which agrees on the global batch's loss before the backward pass and replaces this
//! process's gradients with the global batch's before the update ([`crate::distributed::DataParallel`]).
//! [`sgd_step`] is it with [`LocalStep`], which does nothing, so one process trains exactly as it did.

use swa_core::backend::Backend;

use crate::batch::HostBatch;
use crate::error::TrainError;
use crate::evaluate::{log_softmax_rows, MetricsAccumulator};
use crate::layers::BatchNormSync;
use crate::module::{ForwardMode, Module};
use crate::optim::Sgd;

/// What the processes of a data-parallel run share in a training step, each holding a part of the global
/// batch: the loss, before the backward pass (so that every rank stops on a non-finite loss together), and
/// the gradients, after it.
pub trait StepSync<B: Backend> {
    /// The mean loss of the global batch, given this process's mean `loss` over its `images` images.
    fn reduce_loss(&mut self, loss: f32, images: usize) -> Result<f32, TrainError>;

    /// Replaces the gradients `model` accumulated over this process's `images` images with the global
    /// batch's, and shares whatever else the ranks must agree on after the forward pass.
    fn reduce_gradients(
        &mut self,
        backend: &B,
        model: &mut dyn Module<B>,
        images: usize,
    ) -> Result<(), TrainError>;

    /// The ranks whose batches the step's BatchNorm layers normalise over, during its forward and backward
    /// passes (synchronised BatchNorm, [`crate::layers::BatchNormSync`]); `None`, the default, normalises
    /// each process's batch with its own statistics.
    fn batch_norm_sync(&self) -> Option<BatchNormSync> {
        None
    }
}

/// The [`StepSync`] of a single process: its batch is the global batch, so nothing is exchanged.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalStep;

impl<B: Backend> StepSync<B> for LocalStep {
    fn reduce_loss(&mut self, loss: f32, _images: usize) -> Result<f32, TrainError> {
        Ok(loss)
    }

    fn reduce_gradients(
        &mut self,
        _backend: &B,
        _model: &mut dyn Module<B>,
        _images: usize,
    ) -> Result<(), TrainError> {
        Ok(())
    }
}

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
    sgd_step_synchronized(
        backend,
        model,
        optimizer,
        batch,
        lr,
        seed,
        metrics,
        &mut LocalStep,
    )
}

/// [`sgd_step`] on this process's part of a global batch, with `sync` sharing the loss and gradients
/// between the processes. Returns the global batch's mean loss; when it is not finite on one rank it is
/// on all, and none back-propagates. `metrics` counts this process's images only.
#[allow(clippy::too_many_arguments)]
pub fn sgd_step_synchronized<B: Backend>(
    backend: &B,
    model: &mut dyn Module<B>,
    optimizer: &mut Sgd<B>,
    batch: &HostBatch,
    lr: f32,
    seed: u64,
    metrics: &mut MetricsAccumulator,
    sync: &mut dyn StepSync<B>,
) -> Result<f32, TrainError> {
    let Some(batch_norm_sync) = sync.batch_norm_sync() else {
        return train_step(backend, model, optimizer, batch, lr, seed, metrics, sync);
    };
    // The layers are synchronised for this step only, so that evaluation and BatchNorm recomputation
    // between steps, and any step taken without `sync`, see them as they were.
    set_batch_norm_sync(model, Some(&batch_norm_sync));
    let result = train_step(backend, model, optimizer, batch, lr, seed, metrics, sync);
    set_batch_norm_sync(model, None);
    result
}

/// Gives every BatchNorm layer of `model` `sync`, or takes it away with `None`.
pub fn set_batch_norm_sync<B: Backend>(model: &mut dyn Module<B>, sync: Option<&BatchNormSync>) {
    model.visit_batch_norms_mut(&mut |layer| layer.set_synchronization(sync.cloned()));
}

/// The body of [`sgd_step_synchronized`], with the model's BatchNorm layers as they are set.
#[allow(clippy::too_many_arguments)]
fn train_step<B: Backend>(
    backend: &B,
    model: &mut dyn Module<B>,
    optimizer: &mut Sgd<B>,
    batch: &HostBatch,
    lr: f32,
    seed: u64,
    metrics: &mut MetricsAccumulator,
    sync: &mut dyn StepSync<B>,
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
    let local_loss = backend
        .to_host(&ce.loss)
        .map_err(TrainError::backend("reading the loss"))?
        .first()
        .copied()
        .unwrap_or(f32::NAN);
    let loss = sync.reduce_loss(local_loss, batch.len())?;
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
    sync.reduce_gradients(backend, model, batch.len())?;
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
