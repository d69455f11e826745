//! Calibration metrics and temperature scaling: ECE, NLL and accuracy against hand-computed values and
//! the evaluation code's own definitions; the fitted temperature satisfies the optimality condition of
//! the NLL; the cross-fitted temperature scores each half with the other half's temperature; bad input
//! names what is wrong.

mod common;

use swa_models::calibration::{
    cross_fitted_temperature, fit_temperature, softmax_with_temperature, Calibration,
    CalibrationError,
};
use swa_models::evaluate::{log_softmax_rows, MetricsAccumulator};

#[test]
fn ece_nll_and_accuracy_match_a_hand_computation() {
    // Four examples, two classes, two bins ((0, ½] and (½, 1]).
    // Confidences 0.9 (right), 0.8 (wrong: label 0, predicted 1), 0.6 (right), 0.5 (class 0 by the tie
    // rule; label 1: wrong).
    let probabilities = [0.9, 0.1, 0.2, 0.8, 0.6, 0.4, 0.5, 0.5];
    let labels = [0, 0, 0, 1];
    let c = Calibration::of_probabilities(&probabilities, 2, &labels, 2).expect("valid input");
    assert_eq!(c.count, 4);
    assert_eq!(c.accuracy, 0.5);
    let nll = -(0.9f64.ln() + 0.2f64.ln() + 0.6f64.ln() + 0.5f64.ln()) / 4.0;
    assert!((c.nll - nll).abs() < 1e-12, "{} vs {nll}", c.nll);
    // Bin 1 holds the 0.5 (0 right); bin 2 holds 0.9, 0.8, 0.6 (2 right).
    assert_eq!((c.bins[0].count, c.bins[1].count), (1, 3));
    assert!((c.bins[0].confidence - 0.5).abs() < 1e-12 && c.bins[0].accuracy == 0.0);
    let high_confidence = (0.9 + 0.8 + 0.6) / 3.0;
    assert!((c.bins[1].confidence - high_confidence).abs() < 1e-12);
    assert!((c.bins[1].accuracy - 2.0 / 3.0).abs() < 1e-12);
    let ece = 0.25 * 0.5 + 0.75 * (high_confidence - 2.0 / 3.0f64).abs();
    assert!((c.ece - ece).abs() < 1e-12, "{} vs {ece}", c.ece);
    assert!((c.bins[1].overconfidence() - (high_confidence - 2.0 / 3.0)).abs() < 1e-12);
}

#[test]
fn a_model_right_as_often_as_it_is_confident_has_zero_ece() {
    // Confidence 0.75 everywhere, right on three of four examples.
    let probabilities = [0.75, 0.25, 0.75, 0.25, 0.25, 0.75, 0.25, 0.75];
    let labels = [0, 0, 1, 0];
    let c = Calibration::of_probabilities(&probabilities, 2, &labels, 20).expect("valid input");
    assert_eq!(c.accuracy, 0.75);
    assert!(c.ece.abs() < 1e-15, "{}", c.ece);
    // 0.75 lies in (0.70, 0.75], the 15th of 20 bins.
    assert_eq!(c.bins[14].count, 4);
}

#[test]
fn logits_at_temperature_one_score_as_evaluation_does() {
    let classes = 10;
    let logits: Vec<f32> = common::random_input(3, 64 * classes)
        .iter()
        .map(|v| 4.0 * v)
        .collect();
    let labels: Vec<u32> = (0..64).map(|i| (i * 7 % classes) as u32).collect();
    let c = Calibration::of_logits(&logits, classes, &labels, 1.0, 15).expect("valid input");
    let mut reference = MetricsAccumulator::default();
    reference.add_log_probs(&log_softmax_rows(&logits, classes), classes, &labels);
    let reference = reference.finish();
    assert!(
        (c.nll - reference.loss).abs() < 1e-9,
        "{} vs {}",
        c.nll,
        reference.loss
    );
    assert!((100.0 * c.accuracy - reference.accuracy).abs() < 1e-9);
    // A temperature changes confidence, never the predicted class.
    let cooler = Calibration::of_logits(&logits, classes, &labels, 3.0, 15).expect("valid input");
    assert_eq!(cooler.accuracy, c.accuracy);
}

/// Logits of an overconfident model: the right class leads on 70% of examples, by a wide margin.
fn overconfident(examples: usize, classes: usize) -> (Vec<f32>, Vec<u32>) {
    let noise = common::random_input(11, examples * classes);
    let labels: Vec<u32> = (0..examples).map(|i| (i * 3 % classes) as u32).collect();
    let mut logits = Vec::new();
    for (i, &label) in labels.iter().enumerate() {
        let lead = if i % 10 < 7 {
            label as usize
        } else {
            (label as usize + 1) % classes
        };
        for k in 0..classes {
            let boost = if k == lead { 8.0 } else { 0.0 };
            logits.push(boost + 2.0 * noise[i * classes + k]);
        }
    }
    (logits, labels)
}

#[test]
fn the_fitted_temperature_zeroes_the_nlls_derivative() {
    let classes = 5;
    let (logits, labels) = overconfident(400, classes);
    let t = fit_temperature(&logits, classes, &labels).expect("valid input");
    assert!(t > 1.0, "an overconfident model is cooled, got T = {t}");
    // d NLL / d(1/T) = mean(E_p[z]) − mean(z_y) = 0 at the optimum, p = softmax(z/T).
    let probabilities = softmax_with_temperature(&logits, classes, &labels, t).expect("valid");
    let (mut expected_logit, mut label_logit) = (0.0f64, 0.0f64);
    for ((row, p), &label) in logits
        .chunks_exact(classes)
        .zip(probabilities.chunks_exact(classes))
        .zip(&labels)
    {
        expected_logit += row
            .iter()
            .zip(p)
            .map(|(&z, &q)| f64::from(z) * q)
            .sum::<f64>();
        label_logit += f64::from(row[label as usize]);
    }
    let gradient = (expected_logit - label_logit) / labels.len() as f64;
    assert!(
        gradient.abs() < 1e-4,
        "d NLL/d(1/T) = {gradient} at T = {t}"
    );
    // And the NLL is lower there than a little to either side.
    let nll = |t: f64| {
        Calibration::of_logits(&logits, classes, &labels, t, 10)
            .expect("valid")
            .nll
    };
    assert!(nll(t) <= nll(t * 1.01) && nll(t) <= nll(t / 1.01));
    assert!(nll(t) < nll(1.0));
}

#[test]
fn cross_fitting_scores_each_half_with_the_other_halfs_temperature() {
    let classes = 4;
    let (logits, labels) = overconfident(101, classes);
    let (probabilities, [t_even, t_odd]) =
        cross_fitted_temperature(&logits, classes, &labels).expect("valid input");
    let fold = |parity: usize| -> (Vec<f32>, Vec<u32>) {
        let mut l = Vec::new();
        let mut y = Vec::new();
        for (i, (row, &label)) in logits.chunks_exact(classes).zip(&labels).enumerate() {
            if i % 2 == parity {
                l.extend_from_slice(row);
                y.push(label);
            }
        }
        (l, y)
    };
    let (even_logits, even_labels) = fold(0);
    let (odd_logits, odd_labels) = fold(1);
    assert_eq!(
        t_even,
        fit_temperature(&even_logits, classes, &even_labels).expect("fit")
    );
    assert_eq!(
        t_odd,
        fit_temperature(&odd_logits, classes, &odd_labels).expect("fit")
    );
    for example in [0usize, 1, 50, 100] {
        let t = if example % 2 == 0 { t_odd } else { t_even };
        let row = &logits[example * classes..(example + 1) * classes];
        let expected = softmax_with_temperature(row, classes, &labels[example..=example], t)
            .expect("valid row");
        assert_eq!(
            &probabilities[example * classes..(example + 1) * classes],
            &expected[..],
            "example {example}"
        );
    }
}

#[test]
fn bad_input_names_the_example_and_what_was_expected() {
    let out_of_range = Calibration::of_probabilities(&[0.5, 0.5, 0.5, 0.5], 2, &[0, 2], 10);
    assert_eq!(
        out_of_range,
        Err(CalibrationError::LabelOutOfRange {
            index: 1,
            label: 2,
            classes: 2
        })
    );
    let message = Calibration::of_probabilities(&[0.5, 0.5, 0.5], 2, &[0, 1], 10)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("3 values") && message.contains("2 classes"),
        "{message}"
    );
    assert_eq!(
        Calibration::of_probabilities(&[0.5, 0.5], 2, &[0], 0),
        Err(CalibrationError::NoBins)
    );
    let nan = Calibration::of_probabilities(&[0.5, 0.5, f64::NAN, 0.5], 2, &[0, 1], 10)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(nan.contains("example 1") && nan.contains("NaN"), "{nan}");
    let infinite_logit = fit_temperature(&[0.0, f32::INFINITY], 2, &[0])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(infinite_logit.contains("finite logit"), "{infinite_logit}");
    assert!(matches!(
        Calibration::of_probabilities(&[], 2, &[], 10),
        Err(CalibrationError::Empty { .. })
    ));
}
