//! Recomputation of BatchNorm statistics for averaged weights (PyTorch's `update_bn`, the original SWA
//! code's `bn_update`).
//!
//! The running statistics of an average of weights are not the average of the running statistics: they are
//! recomputed with one pass over the training data. Each batch's statistics enter with momentum
//! `b / (n + b)` (batch size `b` after `n` images), which makes the running statistics the exact
//! batch-size-weighted mean of the per-batch statistics, as the original code computes them. PyTorch's
//! `update_bn` (momentum `None`) weighs every batch equally instead; the two agree whenever the batches
//! have one size, and differ only through a smaller last batch.

use std::borrow::Borrow;

use swa_core::backend::Backend;
use swa_core::params::TensorRole;

use crate::batch::HostBatch;
use crate::error::TrainError;
use crate::module::{ForwardMode, Module};

/// Whether the module has BatchNorm statistics at all (VGG-16 without BN has none, and needs no pass).
pub fn has_batch_norm<B: Backend>(model: &dyn Module<B>) -> bool {
    let mut found = false;
    model.visit_tensors(&mut |_, role, _| found |= role == TensorRole::BatchNormStatistic);
    found
}

/// Resets every BatchNorm's running mean to 0 and running variance to 1, as PyTorch does.
pub fn reset_batch_norm<B: Backend>(
    backend: &B,
    model: &mut dyn Module<B>,
) -> Result<(), TrainError> {
    let mut failure = None;
    model.visit_tensors_mut(&mut |name, role, tensor| {
        if role != TensorRole::BatchNormStatistic || failure.is_some() {
            return;
        }
        let value = if name.ends_with("running_var") {
            1.0
        } else {
            0.0
        };
        if let Err(source) = backend.fill_(tensor, value) {
            failure = Some(TrainError::Backend {
                context: format!("resetting `{name}`"),
                source,
            });
        }
    });
    if let Some(failure) = failure {
        return Err(failure);
    }
    // PyTorch's `reset_running_stats` zeroes the batch counters too; the recomputation pass counts anew.
    model.visit_batch_counters_mut(&mut |_, count| *count = 0);
    Ok(())
}

/// Recomputes the BatchNorm running statistics of `model` from `batches`, returning the number of images
/// seen. A model without BatchNorm is left as it is, and no batch is drawn.
///
/// The batches may be owned or borrowed (`&HostBatch`), so that a caller that recomputes the statistics of
/// many weight sets over the same data (a loss-surface survey) keeps one copy of it.
pub fn update_bn<B: Backend, I>(
    backend: &B,
    model: &mut dyn Module<B>,
    batches: I,
    seed: u64,
) -> Result<usize, TrainError>
where
    I: IntoIterator,
    I::Item: Borrow<HostBatch>,
{
    if !has_batch_norm(model) {
        return Ok(0);
    }
    reset_batch_norm(backend, model)?;
    let mut seen = 0usize;
    for (index, batch) in batches.into_iter().enumerate() {
        let batch = batch.borrow();
        batch.validate()?;
        if batch.is_empty() {
            continue;
        }
        let b = batch.len();
        let momentum = b as f32 / (seen + b) as f32;
        let x = backend
            .from_host(&batch.images, &batch.shape)
            .map_err(TrainError::backend("uploading a batch"))?;
        let mode = ForwardMode::RecomputeBatchNorm {
            momentum,
            seed: seed.wrapping_add(index as u64),
        };
        model
            .forward(backend, &x, mode)
            .map_err(TrainError::backend("BatchNorm recomputation pass"))?;
        seen += b;
    }
    Ok(seen)
}
