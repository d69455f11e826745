//! How well predicted probabilities match how often they are right: accuracy, negative log-likelihood,
//! expected calibration error and the reliability diagram's bins, and temperature scaling.
//!
//! The definitions are those of Guo et al. (2017, *On Calibration of Modern Neural Networks*) as the SWAG
//! paper uses them (Maddox et al., 2019): an example's *confidence* is its largest predicted probability;
//! the confidences are sorted into `M` equal-width bins `((m − 1)/M, m/M]` (a confidence of exactly 0
//! falls into the first); per bin, `acc(B_m)` is the fraction of its examples predicted right and
//! `conf(B_m)` their mean confidence; and
//!
//! `ECE = Σ_m |B_m|/n · |acc(B_m) − conf(B_m)|`.
//!
//! The reliability diagram plots `conf(B_m) − acc(B_m)` per bin: above zero the model is
//! overconfident, below it underconfident.
//!
//! Temperature scaling divides a single model's logits by one scalar `T > 0` fitted to minimise the NLL
//! on held-out examples ([`fit_temperature`]); it changes no prediction's class, only its confidence.
//!
//! [`calibrate_runs`] puts these together into the SWAG paper's table for the runs of one seed: SGD,
//! SWA, SWA with a temperature, SWAG-Diagonal, SWAG and FGE on the same test images.

pub mod runs;

pub use runs::{
    calibrate_runs, CalibrationData, CalibrationEvent, MethodCalibration, RunsCalibration,
    RunsCalibrationConfig, RunsCalibrationError,
};

use crate::evaluate::log_softmax_rows;

/// The bin count of the SWAG paper's calibration figures and tables.
pub const DEFAULT_BINS: usize = 20;

/// Predicted probabilities or logits that do not fit their labels.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CalibrationError {
    /// Values that are not `classes` per label.
    #[error("{values} values are not {classes} classes for each of {labels} labels")]
    LengthMismatch {
        /// The number of probabilities or logits given.
        values: usize,
        /// The class count.
        classes: usize,
        /// The number of labels.
        labels: usize,
    },
    /// No example at all, or no class.
    #[error("calibration needs at least one example and one class ({labels} labels, {classes} classes given)")]
    Empty {
        /// The number of labels.
        labels: usize,
        /// The class count.
        classes: usize,
    },
    /// A label that is not a class.
    #[error("label {label} of example {index} is not one of the {classes} classes")]
    LabelOutOfRange {
        /// The example.
        index: usize,
        /// Its label.
        label: u32,
        /// The class count.
        classes: usize,
    },
    /// A probability below zero, above one, or NaN; or a non-finite logit.
    #[error("example {index} has the value {value}, expected {expected}")]
    BadValue {
        /// The example.
        index: usize,
        /// The value.
        value: f64,
        /// What it should be.
        expected: &'static str,
    },
    /// Zero bins.
    #[error("the reliability diagram needs at least one bin")]
    NoBins,
}

/// One confidence bin of a reliability diagram.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReliabilityBin {
    /// The bin's lower edge (exclusive, except for the first bin).
    pub lower: f64,
    /// The bin's upper edge (inclusive).
    pub upper: f64,
    /// The examples whose confidence falls into the bin.
    pub count: usize,
    /// Their mean confidence (0 for an empty bin).
    pub confidence: f64,
    /// The fraction of them predicted right (0 for an empty bin).
    pub accuracy: f64,
}

impl ReliabilityBin {
    /// `conf − acc`: above zero, overconfident.
    pub fn overconfidence(&self) -> f64 {
        self.confidence - self.accuracy
    }
}

/// Accuracy, NLL and calibration of predicted probabilities on labelled examples.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Calibration {
    /// The number of examples.
    pub count: usize,
    /// The fraction predicted right (the arg-max class; the first of tied classes).
    pub accuracy: f64,
    /// The mean negative log-likelihood of the labels, in nats.
    pub nll: f64,
    /// The expected calibration error over [`Calibration::bins`].
    pub ece: f64,
    /// The reliability diagram's equal-width confidence bins.
    pub bins: Vec<ReliabilityBin>,
}

/// Probabilities below this count as this for the NLL, so that one class given exactly zero (an
/// ensemble all of whose members underflowed) gives a large finite loss rather than infinity.
const PROBABILITY_FLOOR: f64 = 1e-300;

impl Calibration {
    /// The metrics of `probabilities` (`[labels.len(), classes]`, row-major, each row summing to one up to
    /// rounding) against `labels`, with `bins` equal-width confidence bins.
    pub fn of_probabilities(
        probabilities: &[f64],
        classes: usize,
        labels: &[u32],
        bins: usize,
    ) -> Result<Self, CalibrationError> {
        check_shape(probabilities.len(), classes, labels)?;
        if bins == 0 {
            return Err(CalibrationError::NoBins);
        }
        let mut sums = vec![(0usize, 0.0f64, 0usize); bins];
        let (mut correct, mut nll) = (0usize, 0.0f64);
        for (index, (row, &label)) in probabilities.chunks_exact(classes).zip(labels).enumerate() {
            let mut best = 0;
            for (class, &p) in row.iter().enumerate() {
                if !(0.0..=1.0 + 1e-6).contains(&p) {
                    return Err(CalibrationError::BadValue {
                        index,
                        value: p,
                        expected: "a probability in [0, 1]",
                    });
                }
                if p > row[best] {
                    best = class;
                }
            }
            let confidence = row[best].min(1.0);
            let right = best == label as usize;
            correct += usize::from(right);
            nll -= row[label as usize].max(PROBABILITY_FLOOR).ln();
            // Bin m holds ((m − 1)/M, m/M]: ceil(conf·M) − 1, with 0 in the first bin.
            let bin = ((confidence * bins as f64).ceil() as usize).clamp(1, bins) - 1;
            let entry = &mut sums[bin];
            entry.0 += 1;
            entry.1 += confidence;
            entry.2 += usize::from(right);
        }
        let n = labels.len() as f64;
        let bins: Vec<ReliabilityBin> = sums
            .iter()
            .enumerate()
            .map(|(m, &(count, confidence, right))| {
                let per = |total: f64| {
                    if count == 0 {
                        0.0
                    } else {
                        total / count as f64
                    }
                };
                ReliabilityBin {
                    lower: m as f64 / sums.len() as f64,
                    upper: (m + 1) as f64 / sums.len() as f64,
                    count,
                    confidence: per(confidence),
                    accuracy: per(right as f64),
                }
            })
            .collect();
        let ece = bins
            .iter()
            .map(|b| b.count as f64 / n * (b.accuracy - b.confidence).abs())
            .sum();
        Ok(Calibration {
            count: labels.len(),
            accuracy: correct as f64 / n,
            nll: nll / n,
            ece,
            bins,
        })
    }

    /// The metrics of one model's `logits` divided by `temperature` (1: the plain softmax).
    pub fn of_logits(
        logits: &[f32],
        classes: usize,
        labels: &[u32],
        temperature: f64,
        bins: usize,
    ) -> Result<Self, CalibrationError> {
        let probabilities = softmax_with_temperature(logits, classes, labels, temperature)?;
        Self::of_probabilities(&probabilities, classes, labels, bins)
    }
}

fn check_shape(values: usize, classes: usize, labels: &[u32]) -> Result<(), CalibrationError> {
    if labels.is_empty() || classes == 0 {
        return Err(CalibrationError::Empty {
            labels: labels.len(),
            classes,
        });
    }
    if values != classes * labels.len() {
        return Err(CalibrationError::LengthMismatch {
            values,
            classes,
            labels: labels.len(),
        });
    }
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        return Err(CalibrationError::LabelOutOfRange {
            index,
            label,
            classes,
        });
    }
    Ok(())
}

/// `softmax(logits / temperature)` per row, in `f64`.
pub fn softmax_with_temperature(
    logits: &[f32],
    classes: usize,
    labels: &[u32],
    temperature: f64,
) -> Result<Vec<f64>, CalibrationError> {
    check_shape(logits.len(), classes, labels)?;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(CalibrationError::BadValue {
            index: 0,
            value: temperature,
            expected: "a positive, finite temperature",
        });
    }
    if let Some(index) = logits.iter().position(|v| !v.is_finite()) {
        return Err(CalibrationError::BadValue {
            index: index / classes,
            value: f64::from(logits[index]),
            expected: "a finite logit",
        });
    }
    let scaled: Vec<f32> = logits
        .iter()
        .map(|&v| (f64::from(v) / temperature) as f32)
        .collect();
    Ok(log_softmax_rows(&scaled, classes)
        .into_iter()
        .map(f64::exp)
        .collect())
}

/// The mean NLL of `labels` under `softmax(logits / temperature)`, computed in `f64` throughout.
fn nll_at(logits: &[f32], classes: usize, labels: &[u32], temperature: f64) -> f64 {
    let mut total = 0.0;
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        let scaled = |v: f32| f64::from(v) / temperature;
        let max = row
            .iter()
            .map(|&v| scaled(v))
            .fold(f64::NEG_INFINITY, f64::max);
        let log_sum = row
            .iter()
            .map(|&v| (scaled(v) - max).exp())
            .sum::<f64>()
            .ln();
        total -= scaled(row[label as usize]) - max - log_sum;
    }
    total / labels.len() as f64
}

/// The temperature in `[0.05, 20]` that minimises the mean NLL of `labels` under
/// `softmax(logits / T)`: golden-section search on `ln T`, to a relative precision of 1e-6 (the NLL is
/// convex in `1/T`, so the minimum in the bracket is unique).
pub fn fit_temperature(
    logits: &[f32],
    classes: usize,
    labels: &[u32],
) -> Result<f64, CalibrationError> {
    // Validates shapes, labels and logits once.
    softmax_with_temperature(logits, classes, labels, 1.0)?;
    let f = |log_t: f64| nll_at(logits, classes, labels, log_t.exp());
    let inverse_golden = (5f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (0.05f64.ln(), 20f64.ln());
    let mut c = b - inverse_golden * (b - a);
    let mut d = a + inverse_golden * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    while b - a > 1e-6 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - inverse_golden * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + inverse_golden * (b - a);
            fd = f(d);
        }
    }
    Ok(((a + b) / 2.0).exp())
}

/// Temperature scaling without a validation split: the examples are split into two interleaved folds
/// (even and odd positions), a temperature is fitted on each ([`fit_temperature`]) and applied to the
/// other, so that no example's probabilities depend on its own label. Returns the probabilities of every
/// example, in order, and the two temperatures (fitted on the even and on the odd fold).
///
/// Needs at least two examples.
pub fn cross_fitted_temperature(
    logits: &[f32],
    classes: usize,
    labels: &[u32],
) -> Result<(Vec<f64>, [f64; 2]), CalibrationError> {
    check_shape(logits.len(), classes, labels)?;
    if labels.len() < 2 {
        return Err(CalibrationError::Empty {
            labels: labels.len(),
            classes,
        });
    }
    let fold = |parity: usize| -> (Vec<f32>, Vec<u32>) {
        let rows = logits
            .chunks_exact(classes)
            .zip(labels)
            .skip(parity)
            .step_by(2);
        let mut fold_logits = Vec::new();
        let mut fold_labels = Vec::new();
        for (row, &label) in rows {
            fold_logits.extend_from_slice(row);
            fold_labels.push(label);
        }
        (fold_logits, fold_labels)
    };
    let folds = [fold(0), fold(1)];
    let temperatures = [
        fit_temperature(&folds[0].0, classes, &folds[0].1)?,
        fit_temperature(&folds[1].0, classes, &folds[1].1)?,
    ];
    let mut probabilities = vec![0.0; logits.len()];
    for (parity, (fold_logits, fold_labels)) in folds.iter().enumerate() {
        // Each fold is scored with the other fold's temperature.
        let scaled =
            softmax_with_temperature(fold_logits, classes, fold_labels, temperatures[1 - parity])?;
        for (k, row) in scaled.chunks_exact(classes).enumerate() {
            let example = 2 * k + parity;
            probabilities[example * classes..(example + 1) * classes].copy_from_slice(row);
        }
    }
    Ok((probabilities, temperatures))
}
