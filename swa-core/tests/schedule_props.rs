//! Learning-rate schedules: golden values worked out by hand from the published formulas, exact values at
//! the points the formulas pin down, bounds, and continuity inside each piece.

use proptest::prelude::*;
use swa_core::schedule::{AnnealStrategy, LrSchedule, Period, Schedule, ScheduleError};

/// Relative closeness for values computed in f64 and rounded to f32 once (half an ulp is 2⁻²⁴ relative).
fn close(got: f32, expected: f64) -> bool {
    (f64::from(got) - expected).abs() <= 1e-6 * expected.abs().max(1e-12)
}

#[track_caller]
fn assert_close(got: f32, expected: f64) {
    assert!(close(got, expected), "got {got}, expected {expected}");
}

/// One ulp of the largest magnitude in `[a, b]`: the most that the final rounding to f32 adds to a step.
fn ulp_of(a: f32, b: f32) -> f64 {
    f64::from(a.abs().max(b.abs())) * f64::from(f32::EPSILON)
}

#[test]
fn original_schedule_golden_values_for_the_vgg16_preset() {
    // train.py --lr_init 0.05 --swa --swa_start 161 --swa_lr 0.01: t = epoch/161, lr_ratio = 0.2,
    // lr = 0.05·factor with factor = 1 (t ≤ 0.5), 1 − 0.8(t − 0.5)/0.4 (t ≤ 0.9), 0.2 (after).
    let s = Schedule::original_swa(0.05, 0.01, 161).unwrap();
    // Epoch 0 and epoch 80 (t = 80/161 = 0.49689 ≤ 0.5): lr_init.
    assert_eq!(s.lr(0, 0, 391), 0.05);
    assert_eq!(s.lr(80, 390, 391), 0.05);
    // Epoch 81: t = 0.503106, factor = 1 − 2·0.003106 = 0.993789, lr = 0.0496894.
    assert_close(s.lr(81, 0, 391), 0.049_689_440_993_788_83);
    // Epoch 100: t = 0.621118, factor = 1 − 2·0.121118 = 0.757764, lr = 0.0378882.
    assert_close(s.lr(100, 0, 391), 0.037_888_198_757_763_98);
    // Epoch 120: t = 0.745342, factor = 1 − 2·0.245342 = 0.509317, lr = 0.0254658.
    assert_close(s.lr(120, 0, 391), 0.025_465_838_509_316_77);
    // Epoch 144: t = 0.894410, factor = 1 − 2·0.394410 = 0.211180, lr = 0.0105590.
    assert_close(s.lr(144, 0, 391), 0.010_559_006_211_180_12);
    // Epoch 145: t = 0.900621 > 0.9: swa_lr, and every later epoch too.
    for epoch in [145, 160, 161, 200, 299] {
        assert_eq!(s.lr(epoch, 17, 391), 0.01, "epoch {epoch}");
    }
    // Evaluated per epoch: every step of an epoch has the epoch's value.
    assert_eq!(s.lr(100, 0, 391), s.lr(100, 390, 391));
}

#[test]
fn original_sgd_schedule_decays_to_a_hundredth_over_the_budget() {
    // train.py --lr_init 0.05 --epochs 200 (no --swa): t = epoch/200, lr_ratio = 0.01.
    let s = Schedule::original_sgd(0.05, 200).unwrap();
    assert_eq!(s.lr(100, 0, 1), 0.05); // t = 0.5 exactly
    assert_close(s.lr(140, 0, 1), 0.025_25); // t = 0.7: factor = 1 − 0.99·0.5 = 0.505
    assert_eq!(s.lr(180, 0, 1), 0.0005); // t = 0.9 exactly: factor = lr_ratio
    assert_eq!(s.lr(199, 0, 1), 0.0005);
}

#[test]
fn cyclic_schedule_golden_values() {
    // α1 = 0.05, α2 = 0.0005, c = 4: t(i) = 1/4, 2/4, 3/4, 1 for i = 1..4, then again.
    let s = Schedule::cyclic(0.05, 0.0005, Period::Iterations(4)).unwrap();
    let expected = [0.037_625, 0.025_25, 0.012_875, 0.0005];
    for i in 0..8 {
        // 3 steps per epoch: iteration i + 1 is epoch i / 3, step i % 3.
        let lr = s.lr(i / 3, i % 3, 3);
        assert_close(lr, expected[i % 4]);
    }
    assert_eq!(s.lr(1, 0, 3), 0.0005); // i = 4, the cycle's last iteration: α2 exactly
                                       // Cycles of whole epochs: c = 2 epochs of 5 steps = 10 iterations, ending at epoch 1 step 4.
    let e = Schedule::cyclic(0.1, 0.001, Period::Epochs(2)).unwrap();
    assert_eq!(e.lr(1, 4, 5), 0.001);
    assert_eq!(e.lr(3, 4, 5), 0.001);
    assert_close(e.lr(2, 0, 5), 0.9 * 0.1 + 0.1 * 0.001);
}

#[test]
fn triangular_schedule_golden_values() {
    // FGE with α1 = 0.05, α2 = 0.0005, c = 4: t = 1/4 → 0.5·α1 + 0.5·α2; t = 1/2 → α2;
    // t = 3/4 → 0.5·α2 + 0.5·α1; t = 1 → α1.
    let s = Schedule::triangular(0.05, 0.0005, Period::Iterations(4)).unwrap();
    let mid = 0.5 * 0.05 + 0.5 * 0.0005;
    assert_close(s.lr(0, 0, 100), mid);
    assert_eq!(s.lr(0, 1, 100), 0.0005);
    assert_close(s.lr(0, 2, 100), mid);
    assert_eq!(s.lr(0, 3, 100), 0.05);
    assert_close(s.lr(0, 4, 100), mid);
}

/// PyTorch's `SWALR.get_lr` as a recurrence over scheduler steps: each step recovers the start from the
/// current learning rate and the previous step's α, then moves to the new α. Returns the learning rate
/// after `k` calls of `step()` following construction.
fn pytorch_swalr(start_lr: f64, swa_lr: f64, anneal_epochs: usize, cosine: bool, k: usize) -> f64 {
    let anneal = |t: f64| {
        if cosine {
            (1.0 - (std::f64::consts::PI * t).cos()) / 2.0
        } else {
            t
        }
    };
    let mut lr = start_lr;
    // Step 0 is the step the constructor takes (`_initial_step`): with anneal_epochs = 0 it already jumps
    // to swa_lr.
    for step_count in 0..=k {
        let step = if anneal_epochs == 0 {
            step_count.max(1)
        } else {
            step_count
        };
        let prev_t = ((step as f64 - 1.0) / anneal_epochs.max(1) as f64).clamp(0.0, 1.0);
        let prev_alpha = anneal(prev_t);
        let initial = if prev_alpha == 1.0 {
            swa_lr
        } else {
            (lr - prev_alpha * swa_lr) / (1.0 - prev_alpha)
        };
        let t = (step as f64 / anneal_epochs.max(1) as f64).clamp(0.0, 1.0);
        let alpha = anneal(t);
        lr = swa_lr * alpha + initial * (1.0 - alpha);
    }
    lr
}

#[test]
fn swa_anneal_matches_pytorch_swalr() {
    for (strategy, cosine) in [(AnnealStrategy::Cos, true), (AnnealStrategy::Linear, false)] {
        for anneal_epochs in [0, 1, 3, 10] {
            let s = Schedule::swa_anneal(0.1, 0.02, anneal_epochs, strategy).unwrap();
            for k in 0..15 {
                let expected = pytorch_swalr(0.1, 0.02, anneal_epochs, cosine, k);
                assert!(
                    close(s.lr(k, 0, 1), expected),
                    "{strategy:?}, {anneal_epochs} epochs, k = {k}: {} vs {expected}",
                    s.lr(k, 0, 1)
                );
            }
        }
    }
    // Hand values for cosine over 4 epochs from 0.1 to 0.02: α(k/4) = 0, 0.1464, 0.5, 0.8536, 1.
    let s = Schedule::swa_anneal(0.1, 0.02, 4, AnnealStrategy::Cos).unwrap();
    assert_eq!(s.lr(0, 0, 1), 0.1);
    assert_close(s.lr(2, 0, 1), 0.06);
    assert_eq!(s.lr(4, 0, 1), 0.02);
    assert_eq!(s.lr(40, 0, 1), 0.02);
}

#[test]
fn cosine_and_step_decay_golden_values() {
    let c = Schedule::cosine(0.1, 0.0, 100, false).unwrap();
    assert_eq!(c.lr(0, 0, 10), 0.1);
    assert_close(c.lr(50, 0, 10), 0.05);
    assert_close(
        c.lr(25, 9, 10),
        0.1 * (1.0 + (std::f64::consts::PI / 4.0).cos()) / 2.0,
    );
    assert_eq!(c.lr(100, 0, 10), 0.0);
    let per_step = Schedule::cosine(0.1, 0.0, 100, true).unwrap();
    // Per step, epoch 49 step 5 of 10 is progress 49.5/100.
    let progress = 0.495 * std::f64::consts::PI;
    assert_close(per_step.lr(49, 5, 10), 0.1 * (1.0 + progress.cos()) / 2.0);
    assert_ne!(per_step.lr(49, 5, 10), per_step.lr(49, 0, 10));

    let s = Schedule::step_decay(0.1, 0.1, vec![100, 150]).unwrap();
    assert_eq!(s.lr(99, 0, 1), 0.1);
    assert_close(s.lr(100, 0, 1), 0.01);
    assert_close(s.lr(150, 0, 1), 0.001);
}

#[test]
fn then_switches_and_counts_epochs_from_the_switch() {
    let s = Schedule::constant(0.1)
        .unwrap()
        .then(10, Schedule::cyclic(0.05, 0.01, Period::Epochs(1)).unwrap());
    assert_eq!(s.lr(9, 4, 5), 0.1);
    assert_close(s.lr(10, 0, 5), 0.8 * 0.05 + 0.2 * 0.01); // the first cycle's first iteration
    assert_eq!(s.lr(10, 4, 5), 0.01);
    // Annealing continues from the preceding schedule's learning rate at the switch.
    let a = Schedule::cosine(0.1, 0.0, 100, false)
        .unwrap()
        .then_anneal_to(50, 0.02, 5, AnnealStrategy::Linear)
        .unwrap();
    assert_eq!(
        a.lr(50, 0, 1),
        Schedule::cosine(0.1, 0.0, 100, false).unwrap().lr(50, 0, 1)
    );
    assert_eq!(a.lr(55, 0, 1), 0.02);
}

#[test]
fn invalid_configurations_are_rejected_with_the_field_named() {
    assert_eq!(
        Schedule::cyclic(0.1, 0.01, Period::Iterations(0)),
        Err(ScheduleError::ZeroLength {
            field: "cyclic.cycle"
        })
    );
    assert!(matches!(
        Schedule::constant(-1.0),
        Err(ScheduleError::InvalidLearningRate {
            field: "constant.lr",
            ..
        })
    ));
    assert!(Schedule::original_swa(f32::NAN, 0.01, 161).is_err());
    assert!(Schedule::original_swa(0.05, 0.01, 0).is_err());
    assert!(Schedule::step_decay(0.1, f32::INFINITY, vec![1]).is_err());
    let err = Schedule::cosine(0.1, 0.0, 0, true).unwrap_err();
    assert!(err.to_string().contains("cosine.epochs"), "{err}");
    // A deserialised configuration is checked with validate(), and evaluating it never panics.
    let bad: Schedule = serde_json::from_str(
        r#"{"kind":"triangular","alpha1":0.1,"alpha2":0.01,"cycle":{"iterations":0}}"#,
    )
    .unwrap();
    assert!(bad.validate().is_err());
    assert!(bad.lr(3, 2, 0).is_finite());
}

fn lr_strategy() -> impl Strategy<Value = f32> {
    prop_oneof![Just(0.0f32), 1e-5f32..1.0]
}

fn period_strategy() -> impl Strategy<Value = Period> {
    prop_oneof![
        (1usize..6).prop_map(Period::Epochs),
        (1usize..200).prop_map(Period::Iterations)
    ]
}

fn schedule_strategy() -> impl Strategy<Value = Schedule> {
    let leaf = prop_oneof![
        lr_strategy().prop_map(|lr| Schedule::Constant { lr }),
        (lr_strategy(), lr_strategy(), 1usize..300).prop_map(|(a, b, h)| Schedule::Original {
            lr_init: a,
            final_lr: b,
            horizon_epochs: h
        }),
        (lr_strategy(), lr_strategy(), period_strategy()).prop_map(|(a, b, c)| Schedule::Cyclic {
            alpha1: a,
            alpha2: b,
            cycle: c
        }),
        (lr_strategy(), lr_strategy(), period_strategy()).prop_map(|(a, b, c)| {
            Schedule::Triangular {
                alpha1: a,
                alpha2: b,
                cycle: c,
            }
        }),
        (lr_strategy(), lr_strategy(), 0usize..20, any::<bool>()).prop_map(|(a, b, k, cos)| {
            Schedule::SwaAnneal {
                from_lr: a,
                swa_lr: b,
                anneal_epochs: k,
                strategy: if cos {
                    AnnealStrategy::Cos
                } else {
                    AnnealStrategy::Linear
                },
            }
        }),
        (lr_strategy(), lr_strategy(), 1usize..300, any::<bool>()).prop_map(|(a, b, e, p)| {
            Schedule::Cosine {
                lr_max: a,
                lr_min: b,
                epochs: e,
                per_step: p,
            }
        }),
        (
            lr_strategy(),
            0.0f32..1.5,
            prop::collection::vec(0usize..300, 0..4)
        )
            .prop_map(|(a, g, m)| Schedule::StepDecay {
                lr_init: a,
                gamma: g,
                milestones: m
            }),
    ];
    leaf.prop_recursive(2, 4, 2, |inner| {
        (inner.clone(), 0usize..200, inner).prop_map(|(a, s, b)| a.then(s, b))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every schedule stays within its bounds, and configurations survive a JSON round trip unchanged.
    #[test]
    fn schedules_stay_within_bounds_and_round_trip(
        s in schedule_strategy(),
        epoch in 0usize..400,
        steps_per_epoch in 1usize..500,
        step_fraction in 0.0f64..1.0,
    ) {
        prop_assert!(s.validate().is_ok());
        let step = (step_fraction * steps_per_epoch as f64) as usize;
        let lr = s.lr(epoch, step, steps_per_epoch);
        let (lo, hi) = s.bounds();
        prop_assert!(lo <= lr && lr <= hi, "{} outside [{}, {}]", lr, lo, hi);
        let json = serde_json::to_string(&s).unwrap();
        let back: Schedule = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &s);
        prop_assert_eq!(back.lr(epoch, step, steps_per_epoch).to_bits(), lr.to_bits());
    }

    /// The original schedule: exact at 0, 50 % and 90 % of the horizon, and its per-epoch steps are no
    /// larger than the slope of the linear piece, |lr_init − final|/(0.4·horizon), plus one rounding.
    #[test]
    fn original_schedule_exact_points_and_slope(
        lr_init in lr_strategy(),
        final_lr in lr_strategy(),
        tenths in 1usize..40,
    ) {
        let horizon = 10 * tenths;
        let s = Schedule::original_swa(lr_init, final_lr, horizon).unwrap();
        prop_assert_eq!(s.lr(0, 0, 1), lr_init);
        prop_assert_eq!(s.lr(5 * tenths, 0, 1), lr_init);
        prop_assert_eq!(s.lr(9 * tenths, 0, 1), final_lr);
        let slope = f64::from((lr_init - final_lr).abs()) / (0.4 * horizon as f64);
        for epoch in 0..horizon + 5 {
            let step = f64::from((s.lr(epoch + 1, 0, 1) - s.lr(epoch, 0, 1)).abs());
            prop_assert!(step <= slope + 2.0 * ulp_of(lr_init, final_lr), "epoch {}: step {} > {}", epoch, step, slope);
        }
    }

    /// The cyclical schedule: α2 exactly at every cycle's last iteration, α1 + (α2 − α1)/c at its first,
    /// and steps of |α1 − α2|/c inside a cycle.
    #[test]
    fn cyclic_schedule_cycle_ends_and_continuity(
        alpha1 in lr_strategy(),
        alpha2 in lr_strategy(),
        cycle in period_strategy(),
        steps_per_epoch in 1usize..50,
    ) {
        let s = Schedule::cyclic(alpha1, alpha2, cycle).unwrap();
        let c = cycle.iterations(steps_per_epoch) as usize;
        let at = |i: usize| s.lr((i - 1) / steps_per_epoch, (i - 1) % steps_per_epoch, steps_per_epoch);
        let slope = f64::from((alpha1 - alpha2).abs()) / c as f64;
        for i in 1..=3 * c {
            if i % c == 0 {
                prop_assert_eq!(at(i), alpha2, "iteration {}", i);
            } else {
                let step = f64::from((at(i + 1) - at(i)).abs());
                prop_assert!(step <= slope + 2.0 * ulp_of(alpha1, alpha2), "iteration {}", i);
            }
            if c > 1 && i % c == 1 {
                let first = f64::from(alpha1) + (f64::from(alpha2) - f64::from(alpha1)) / c as f64;
                prop_assert!((f64::from(at(i)) - first).abs() <= ulp_of(alpha1, alpha2), "iteration {}", i);
            }
        }
    }

    /// The triangular cycle: α2 exactly at the middle (even cycles), α1 exactly at the end, steps of
    /// 2|α1 − α2|/c in between.
    #[test]
    fn triangular_schedule_extremes_and_continuity(
        alpha1 in lr_strategy(),
        alpha2 in lr_strategy(),
        half in 1usize..100,
    ) {
        let c = 2 * half;
        let s = Schedule::triangular(alpha1, alpha2, Period::Iterations(c)).unwrap();
        let at = |i: usize| s.lr(0, i - 1, usize::MAX);
        let slope = 2.0 * f64::from((alpha1 - alpha2).abs()) / c as f64;
        for i in 1..=2 * c {
            match i % c {
                0 => prop_assert_eq!(at(i), alpha1),
                m if m == half => prop_assert_eq!(at(i), alpha2),
                _ => {}
            }
            if i % c != 0 {
                let step = f64::from((at(i + 1) - at(i)).abs());
                prop_assert!(step <= slope + 2.0 * ulp_of(alpha1, alpha2), "iteration {}", i);
            }
        }
    }

    /// SWALR-style annealing and cosine decay: exact ends, and per-epoch (or per-step) changes bounded by
    /// their largest slope: π/2·|Δ|/k for cosine shapes, |Δ|/k for linear ones.
    #[test]
    fn annealing_and_cosine_ends_and_continuity(
        from in lr_strategy(),
        to in lr_strategy(),
        k in 1usize..60,
        steps_per_epoch in 1usize..40,
        cos in any::<bool>(),
    ) {
        let strategy = if cos { AnnealStrategy::Cos } else { AnnealStrategy::Linear };
        let shape = if cos { std::f64::consts::FRAC_PI_2 } else { 1.0 };
        let a = Schedule::swa_anneal(from, to, k, strategy).unwrap();
        prop_assert_eq!(a.lr(0, 0, 1), from);
        prop_assert_eq!(a.lr(k, 0, 1), to);
        let slope = shape * f64::from((from - to).abs()) / k as f64;
        for e in 0..k + 2 {
            let step = f64::from((a.lr(e + 1, 0, 1) - a.lr(e, 0, 1)).abs());
            prop_assert!(step <= slope + 2.0 * ulp_of(from, to), "epoch {}", e);
        }
        let c = Schedule::cosine(from, to, k, true).unwrap();
        prop_assert_eq!(c.lr(0, 0, steps_per_epoch), from);
        prop_assert_eq!(c.lr(k, 0, steps_per_epoch), to);
        let per_step = std::f64::consts::FRAC_PI_2 * f64::from((from - to).abs()) / (k * steps_per_epoch) as f64;
        for i in 0..(k + 1) * steps_per_epoch {
            let (e, s) = (i / steps_per_epoch, i % steps_per_epoch);
            let (e2, s2) = ((i + 1) / steps_per_epoch, (i + 1) % steps_per_epoch);
            let step = f64::from((c.lr(e2, s2, steps_per_epoch) - c.lr(e, s, steps_per_epoch)).abs());
            prop_assert!(step <= per_step + 2.0 * ulp_of(from, to), "iteration {}", i);
        }
    }
}
