//! Evaluation: accuracy and mean negative log-likelihood of a network, and of an ensemble of weight sets
//! (Fast Geometric Ensembling averages the predicted probabilities of its snapshots).

use std::borrow::Borrow;

use serde::{Deserialize, Serialize};
use swa_core::backend::Backend;

use crate::batch::HostBatch;
use crate::checkpoint::{StateDict, StoredTensor};
use crate::error::TrainError;
use crate::module::{ForwardMode, Module};

/// Accuracy and loss over a data set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Mean negative log-likelihood of the true class.
    pub loss: f64,
    /// Fraction of images whose most probable class is the true one, in percent.
    pub accuracy: f64,
    /// Fraction of images whose true class is among the five most probable, in percent (ImageNet's
    /// top-5); `None` with five classes or fewer, where it would be 100 by definition, and in records
    /// written before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top5_accuracy: Option<f64>,
    /// Number of images.
    pub count: usize,
}

/// Sums of per-image loss and hits, turned into [`Metrics`] at the end.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetricsAccumulator {
    loss_sum: f64,
    hits: usize,
    top5_hits: usize,
    classes: usize,
    count: usize,
}

impl MetricsAccumulator {
    /// Adds a batch of log-probabilities `[n, classes]` (row-major) with its labels.
    pub fn add_log_probs(&mut self, log_probs: &[f64], classes: usize, labels: &[u32]) {
        for (row, &label) in log_probs.chunks_exact(classes).zip(labels) {
            self.add_outcome(image_outcome(row, label));
        }
        self.note_classes(classes);
    }

    /// Adds one image's [`image_outcome`].
    pub(crate) fn add_outcome(&mut self, [nll, hit, top5_hit]: [f64; 3]) {
        // `+ nll` with `nll = −log p` is `− log p` to the bit.
        self.loss_sum += nll;
        self.hits += usize::from(hit > 0.0);
        self.top5_hits += usize::from(top5_hit > 0.0);
        self.count += 1;
    }

    /// Records that the images added come from `classes` classes (top-5 accuracy needs more than five).
    pub(crate) fn note_classes(&mut self, classes: usize) {
        self.classes = self.classes.max(classes);
    }

    /// The loss sum, hits, top-5 hits and image count, for adding up over the ranks of a data-parallel run
    /// ([`crate::distributed::combine_metrics`]).
    pub(crate) fn sums(&self) -> [f64; 4] {
        [
            self.loss_sum,
            self.hits as f64,
            self.top5_hits as f64,
            self.count as f64,
        ]
    }

    /// Replaces the sums by `sums`, laid out as [`MetricsAccumulator::sums`] gives them.
    pub(crate) fn set_sums(&mut self, [loss_sum, hits, top5_hits, count]: [f64; 4]) {
        self.loss_sum = loss_sum;
        self.hits = hits as usize;
        self.top5_hits = top5_hits as usize;
        self.count = count as usize;
    }

    /// The metrics so far.
    pub fn finish(&self) -> Metrics {
        if self.count == 0 {
            return Metrics::default();
        }
        let percent = |hits: usize| 100.0 * hits as f64 / self.count as f64;
        Metrics {
            loss: self.loss_sum / self.count as f64,
            accuracy: percent(self.hits),
            top5_accuracy: (self.classes > TOP_K).then(|| percent(self.top5_hits)),
            count: self.count,
        }
    }
}

/// What one image adds to [`MetricsAccumulator`]: its negative log-likelihood, 1 when its most probable
/// class is `label` (else 0), and 1 when `label` is among its five most probable classes; `row` holds its
/// log-probabilities.
pub(crate) fn image_outcome(row: &[f64], label: u32) -> [f64; 3] {
    let label = label as usize;
    let nll = -row.get(label).copied().unwrap_or(f64::NEG_INFINITY);
    let hit = argmax(row) == label;
    let top5_hit = rank_of(row, label) < TOP_K;
    [nll, f64::from(u8::from(hit)), f64::from(u8::from(top5_hit))]
}

/// The `k` of top-k accuracy that ImageNet results report besides top-1.
const TOP_K: usize = 5;

/// How many classes score strictly higher than `label` (0: the prediction); ties count for the label, and
/// a missing label or a NaN score ranks last.
fn rank_of(row: &[f64], label: usize) -> usize {
    match row.get(label) {
        Some(&score) if !score.is_nan() => row.iter().filter(|&&v| v > score).count(),
        _ => row.len(),
    }
}

/// The first index of the largest score; a NaN score never wins over a number.
fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || (row[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    best
}

/// Log-softmax of each row of `logits`, in f64 so that the loss of confident predictions stays exact.
pub fn log_softmax_rows(logits: &[f32], classes: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(classes) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let log_sum = row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
        out.extend(row.iter().map(|&v| v as f64 - max - log_sum));
    }
    out
}

/// Runs `model` in evaluation mode on one batch and returns its logits on the host with the class count.
pub fn predict_logits<B: Backend>(
    backend: &B,
    model: &mut dyn Module<B>,
    batch: &HostBatch,
) -> Result<(Vec<f32>, usize), TrainError> {
    batch.validate()?;
    let x = backend
        .from_host(&batch.images, &batch.shape)
        .map_err(TrainError::backend("uploading a batch"))?;
    let logits = model
        .forward(backend, &x, ForwardMode::Eval)
        .map_err(TrainError::backend("evaluation forward pass"))?;
    let values = backend
        .to_host(&logits)
        .map_err(TrainError::backend("reading logits back"))?;
    let classes = if batch.is_empty() {
        0
    } else {
        values.len() / batch.len()
    };
    Ok((values, classes))
}

/// The logits of `model` (in evaluation mode) on every image of `batches`, in order, with the labels and
/// the class count.
pub fn predict_all_logits<B: Backend, I>(
    backend: &B,
    model: &mut dyn Module<B>,
    batches: I,
) -> Result<(Vec<f32>, Vec<u32>, usize), TrainError>
where
    I: IntoIterator,
    I::Item: Borrow<HostBatch>,
{
    let (mut logits, mut labels, mut classes) = (Vec::new(), Vec::new(), 0);
    for batch in batches {
        let batch = batch.borrow();
        let (values, c) = predict_logits(backend, model, batch)?;
        classes = c;
        logits.extend_from_slice(&values);
        labels.extend_from_slice(&batch.labels);
    }
    Ok((logits, labels, classes))
}

/// Accuracy and mean NLL of `model` (in evaluation mode) on `batches`, owned or borrowed.
pub fn evaluate<B: Backend, I>(
    backend: &B,
    model: &mut dyn Module<B>,
    batches: I,
) -> Result<Metrics, TrainError>
where
    I: IntoIterator,
    I::Item: Borrow<HostBatch>,
{
    let mut acc = MetricsAccumulator::default();
    for batch in batches {
        let batch = batch.borrow();
        let (logits, classes) = predict_logits(backend, model, batch)?;
        acc.add_log_probs(&log_softmax_rows(&logits, classes), classes, &batch.labels);
    }
    Ok(acc.finish())
}

/// An ensemble's running mean of predicted probabilities over a fixed, ordered evaluation set.
///
/// Serialised, it holds only its sizes; the probabilities and labels are tensors
/// ([`Ensemble::tensors`], [`Ensemble::restore_tensors`]), which checkpoints keep in safetensors.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ensemble {
    /// Mean probabilities `[images, classes]`, row-major.
    #[serde(skip)]
    mean_probs: Vec<f64>,
    /// The evaluation set's labels, in order.
    #[serde(skip)]
    labels: Vec<u32>,
    /// Images of the evaluation set (the rows of `mean_probs`).
    #[serde(default)]
    images: usize,
    classes: usize,
    members: usize,
}

impl Ensemble {
    /// An empty ensemble.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of weight sets averaged so far.
    pub fn members(&self) -> usize {
        self.members
    }

    /// Adds the predictions of `model` on `batches` (which must be the same images, in the same order, for
    /// every member) and returns that member's own metrics.
    pub fn add_member<B: Backend, I>(
        &mut self,
        backend: &B,
        model: &mut dyn Module<B>,
        batches: I,
    ) -> Result<Metrics, TrainError>
    where
        I: IntoIterator,
        I::Item: Borrow<HostBatch>,
    {
        let mut log_probs = Vec::new();
        let mut labels = Vec::new();
        let mut classes = 0;
        for batch in batches {
            let batch = batch.borrow();
            let (logits, c) = predict_logits(backend, model, batch)?;
            classes = c;
            log_probs.extend(log_softmax_rows(&logits, c));
            labels.extend_from_slice(&batch.labels);
        }
        self.add_member_log_probs(&log_probs, classes, labels)
    }

    /// Adds a member from its log-probabilities `[images, classes]` on the evaluation set, whose labels
    /// are `labels`, and returns that member's own metrics.
    pub(crate) fn add_member_log_probs(
        &mut self,
        log_probs: &[f64],
        classes: usize,
        labels: Vec<u32>,
    ) -> Result<Metrics, TrainError> {
        let mut own = MetricsAccumulator::default();
        if classes > 0 {
            own.add_log_probs(log_probs, classes, &labels);
        }
        let probs: Vec<f64> = log_probs.iter().map(|v| v.exp()).collect();
        if self.members == 0 {
            self.mean_probs = probs;
            self.images = labels.len();
            self.labels = labels;
            self.classes = classes;
        } else {
            if labels != self.labels || classes != self.classes {
                return Err(TrainError::StateMismatch(format!(
                    "ensemble member {} was evaluated on {} images of {classes} classes, the ensemble on {} of {}",
                    self.members + 1,
                    labels.len(),
                    self.labels.len(),
                    self.classes
                )));
            }
            let weight = 1.0 / (self.members as f64 + 1.0);
            for (mean, p) in self.mean_probs.iter_mut().zip(&probs) {
                *mean += weight * (p - *mean);
            }
        }
        self.members += 1;
        Ok(own.finish())
    }

    /// The mean probabilities (`mean_probs`, `F64 [images, classes]`) and labels (`labels`,
    /// `I64 [images]`), for a checkpoint.
    pub fn tensors(&self) -> StateDict {
        let mut dict = StateDict::new();
        dict.insert(
            "mean_probs",
            StoredTensor::F64 {
                shape: vec![self.images, self.classes],
                values: self.mean_probs.clone(),
            },
        );
        dict.insert(
            "labels",
            StoredTensor::I64 {
                shape: vec![self.images],
                values: self.labels.iter().map(|&l| i64::from(l)).collect(),
            },
        );
        dict
    }

    /// Restores the tensors [`Ensemble::tensors`] wrote into an ensemble deserialised from its sizes,
    /// checking that they have those sizes.
    pub fn restore_tensors(&mut self, dict: &StateDict) -> Result<(), TrainError> {
        let mismatch = |what: &str| {
            TrainError::StateMismatch(format!(
                "{}: ensemble tensor {what}, expected [{}, {}] probabilities and [{}] labels",
                dict.origin(),
                self.images,
                self.classes,
                self.images
            ))
        };
        let probs = match dict.get("mean_probs") {
            Some(StoredTensor::F64 { shape, values }) if shape == &[self.images, self.classes] => {
                values.clone()
            }
            Some(other) => {
                return Err(mismatch(&format!(
                    "`mean_probs` is {} {:?}",
                    other.dtype_name(),
                    other.shape()
                )))
            }
            None => return Err(mismatch("`mean_probs` is missing")),
        };
        let labels = match dict.get("labels") {
            Some(StoredTensor::I64 { shape, values }) if shape == &[self.images] => values
                .iter()
                .map(|&l| u32::try_from(l).map_err(|_| mismatch(&format!("label {l}"))))
                .collect::<Result<Vec<u32>, TrainError>>()?,
            Some(other) => {
                return Err(mismatch(&format!(
                    "`labels` is {} {:?}",
                    other.dtype_name(),
                    other.shape()
                )))
            }
            None => return Err(mismatch("`labels` is missing")),
        };
        self.mean_probs = probs;
        self.labels = labels;
        Ok(())
    }

    /// The mean predicted probabilities, `[images, classes]` row-major, in the evaluation set's order.
    pub fn probabilities(&self) -> &[f64] {
        &self.mean_probs
    }

    /// The evaluation set's labels, in order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// The number of classes (0 before the first member).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Accuracy and NLL of the ensemble's mean probabilities.
    pub fn metrics(&self) -> Metrics {
        let mut acc = MetricsAccumulator::default();
        if self.classes > 0 {
            // A floor keeps the log finite when every member gave a class zero probability.
            let log_probs: Vec<f64> = self.mean_probs.iter().map(|p| p.max(1e-300).ln()).collect();
            acc.add_log_probs(&log_probs, self.classes, &self.labels);
        }
        acc.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_probs(rows: &[[f64; 7]]) -> Vec<f64> {
        rows.iter().flatten().copied().collect()
    }

    #[test]
    fn top5_counts_the_true_class_among_the_five_highest_scores() {
        let mut acc = MetricsAccumulator::default();
        // Label 0 ranks first, fifth (four higher) and sixth (five higher); a NaN score ranks last.
        let rows = [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.3, 0.4, 0.5, 0.6, 0.7, 0.1, 0.2],
            [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.2],
            [f64::NAN, 0.4, 0.5, 0.6, 0.7, 0.8, 0.2],
        ];
        acc.add_log_probs(&log_probs(&rows), 7, &[0, 0, 0, 0]);
        let metrics = acc.finish();
        assert_eq!(metrics.accuracy, 25.0);
        assert_eq!(metrics.top5_accuracy, Some(50.0));
    }

    #[test]
    fn top5_is_not_reported_with_five_classes_or_fewer() {
        let mut acc = MetricsAccumulator::default();
        acc.add_log_probs(&[0.1, 0.2, 0.3, 0.4, 0.5], 5, &[0]);
        assert_eq!(acc.finish().top5_accuracy, None);
    }
}
