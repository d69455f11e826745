//! Evaluation shared between the ranks: each rank runs the network on every `n`-th batch of the test set
//! (batch `i` on rank `i mod n`) and the ranks add up what each image contributes, so that every rank
//! ends with the metrics one process computes on the whole set, to the bit: each image's outcome (its
//! negative log-likelihood, hit and top-5 hit) or log-probabilities are summed over the ranks with
//! zeros from every rank but the one that evaluated it, which is exact, and then accumulated in the
//! images' order as one process accumulates them.
//!
//! Every rank passes the whole test set in the same order (the batches it does not evaluate are only
//! counted). A rank that fails (a backend error, an invalid batch) still takes part in the collectives
//! and every rank then returns an error, so that none waits for it.

use std::borrow::Borrow;

use swa_core::backend::Backend;

use super::{Communicator, DistributedError};
use crate::batch::HostBatch;
use crate::error::TrainError;
use crate::evaluate::{
    evaluate, image_outcome, log_softmax_rows, predict_logits, Ensemble, Metrics,
    MetricsAccumulator,
};
use crate::module::Module;

/// What a rank learnt from its share of the test set.
struct Share {
    /// The labels of every image of the set, in order.
    labels: Vec<u32>,
    /// For each batch this rank evaluated: the index of its first image and its log-probabilities.
    evaluated: Vec<(usize, Vec<f64>)>,
    /// The class count, 0 when this rank evaluated no batch.
    classes: usize,
}

/// Runs `model` on this rank's batches of `batches`.
fn evaluate_share<B: Backend, I>(
    communicator: &dyn Communicator,
    backend: &B,
    model: &mut dyn Module<B>,
    batches: I,
) -> Result<Share, TrainError>
where
    I: IntoIterator,
    I::Item: Borrow<HostBatch>,
{
    let (rank, ranks) = (communicator.rank(), communicator.size());
    let mut share = Share {
        labels: Vec::new(),
        evaluated: Vec::new(),
        classes: 0,
    };
    for (index, batch) in batches.into_iter().enumerate() {
        let batch = batch.borrow();
        if index % ranks == rank {
            let (logits, classes) = predict_logits(backend, model, batch)?;
            share.classes = classes;
            if classes > 0 {
                share
                    .evaluated
                    .push((share.labels.len(), log_softmax_rows(&logits, classes)));
            }
        }
        share.labels.extend_from_slice(&batch.labels);
    }
    Ok(share)
}

/// Agrees with the other ranks on the number of images and classes: returns the class count, or the same
/// error on every rank when a rank failed (its own error on that rank) or the ranks saw different sets.
fn agree(
    communicator: &dyn Communicator,
    share: Result<Share, TrainError>,
) -> Result<(Share, usize), TrainError> {
    let (rank, ranks) = (communicator.rank(), communicator.size());
    // Per rank: its image count; then the sum of the class counts of the ranks that evaluated a batch,
    // how many did, and how many failed.
    let mut facts = vec![0.0f64; ranks + 3];
    match &share {
        Ok(share) => {
            facts[rank] = share.labels.len() as f64;
            if share.classes > 0 {
                facts[ranks] = share.classes as f64;
                facts[ranks + 1] = 1.0;
            }
        }
        Err(_) => facts[ranks + 2] = 1.0,
    }
    communicator.all_reduce_sum_f64("the sharded evaluation's sizes all-reduce", &mut facts)?;
    let share = share?;
    let mismatch = |detail: String| {
        TrainError::from(DistributedError::Mismatch {
            rank,
            ranks,
            operation: "evaluating the test set across the ranks".into(),
            detail,
        })
    };
    if facts[ranks + 2] > 0.0 {
        return Err(mismatch(format!(
            "{} other rank(s) failed to evaluate their batches",
            facts[ranks + 2]
        )));
    }
    if facts[..ranks].iter().any(|&n| n != facts[rank]) {
        return Err(mismatch(format!(
            "the ranks saw test sets of {:?} images; every rank must pass the whole set",
            &facts[..ranks]
        )));
    }
    let evaluating = facts[ranks + 1];
    let classes = if evaluating > 0.0 {
        facts[ranks] / evaluating
    } else {
        0.0
    };
    if share.classes > 0 && classes != share.classes as f64 {
        return Err(mismatch(format!(
            "this rank's network predicts {} classes, the ranks' on average {classes}",
            share.classes
        )));
    }
    Ok((share, classes as usize))
}

/// [`evaluate`] with the test set shared between the ranks: every rank passes all of `batches` and runs
/// `model` on its share, and every rank returns the metrics of the whole set, identical to one process's.
pub fn evaluate_across_ranks<B: Backend, I>(
    communicator: &dyn Communicator,
    backend: &B,
    model: &mut dyn Module<B>,
    batches: I,
) -> Result<Metrics, TrainError>
where
    I: IntoIterator,
    I::Item: Borrow<HostBatch>,
{
    if communicator.size() == 1 {
        return evaluate(backend, model, batches);
    }
    let share = evaluate_share(communicator, backend, model, batches);
    let (share, classes) = agree(communicator, share)?;
    let mut outcomes = vec![0.0f64; 3 * share.labels.len()];
    for (first, log_probs) in &share.evaluated {
        for (image, row) in log_probs.chunks_exact(classes).enumerate() {
            let slot = 3 * (first + image);
            outcomes[slot..slot + 3]
                .copy_from_slice(&image_outcome(row, share.labels[first + image]));
        }
    }
    communicator.all_reduce_sum_f64(
        "the sharded evaluation's outcomes all-reduce",
        &mut outcomes,
    )?;
    let mut metrics = MetricsAccumulator::default();
    for outcome in outcomes.chunks_exact(3) {
        metrics.add_outcome([outcome[0], outcome[1], outcome[2]]);
    }
    metrics.note_classes(classes);
    Ok(metrics.finish())
}

/// [`Ensemble::add_member`] with the test set shared between the ranks (Fast Geometric Ensembling over
/// several processes): every rank passes all of `batches`, runs `model` on its share, and adds the
/// member's predictions on the whole set to its `ensemble`, which stays identical to one process's.
/// Returns the member's own metrics.
pub fn add_ensemble_member_across_ranks<B: Backend, I>(
    communicator: &dyn Communicator,
    ensemble: &mut Ensemble,
    backend: &B,
    model: &mut dyn Module<B>,
    batches: I,
) -> Result<Metrics, TrainError>
where
    I: IntoIterator,
    I::Item: Borrow<HostBatch>,
{
    if communicator.size() == 1 {
        return ensemble.add_member(backend, model, batches);
    }
    let share = evaluate_share(communicator, backend, model, batches);
    let (share, classes) = agree(communicator, share)?;
    let mut log_probs = vec![0.0f64; classes * share.labels.len()];
    for (first, values) in &share.evaluated {
        log_probs[first * classes..first * classes + values.len()].copy_from_slice(values);
    }
    communicator.all_reduce_sum_f64(
        "the ensemble member's predictions all-reduce",
        &mut log_probs,
    )?;
    ensemble.add_member_log_probs(&log_probs, classes, share.labels)
}
