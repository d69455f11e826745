//! The averaging API's contracts: worked values, buffer handling in merges, and the typed errors for
//! snapshots and checkpoints that do not fit.

mod toy_model;

use swa_core::averaging::{
    AveragingError, BufferPolicy, CustomRule, WeightAverage, WeightAveraging, WeightRule,
};
use swa_core::{Backend, CpuBackend, LayoutError, TensorRole};
use toy_model::{backend, is_statistic, Loose, ToyNet, NUMEL};

fn flat(value: f32) -> Vec<f32> {
    vec![value; NUMEL]
}

fn values_of(avg: &dyn WeightAveraging<CpuBackend>) -> Vec<f32> {
    let mut out = ToyNet::from_flat(&flat(0.0));
    avg.copy_into(backend(), &mut out).unwrap();
    out.to_flat()
}

#[test]
fn swa_of_worked_example_is_the_arithmetic_mean() {
    // Snapshots 1, 2, 6 (every element): weights 1/2 then 1/3 give 1 → 1.5 → 1.5 + (6 − 1.5)/3 = 3.
    let b = backend();
    let mut swa =
        WeightAverage::swa(b, &ToyNet::from_flat(&flat(1.0)), BufferPolicy::Average).unwrap();
    assert_eq!(swa.count(), 1);
    swa.update(b, &ToyNet::from_flat(&flat(2.0))).unwrap();
    assert_eq!(values_of(&swa), flat(1.5));
    swa.update(b, &ToyNet::from_flat(&flat(6.0))).unwrap();
    assert_eq!(swa.count(), 3);
    assert_eq!(values_of(&swa), flat(3.0));
    assert_eq!(swa.rule(), WeightRule::Equal);
    assert_eq!(swa.names()[6], "fc.weight");
    let fc = b.to_host(swa.tensor("fc.weight").unwrap()).unwrap();
    assert_eq!(fc, vec![3.0; 12]);
}

#[test]
fn ema_of_worked_example() {
    // decay 0.75: 4 → 0.75·4 + 0.25·8 = 5 → 0.75·5 + 0.25·(−3) = 3.
    let b = backend();
    let mut ema = WeightAverage::ema(
        b,
        &ToyNet::from_flat(&flat(4.0)),
        0.75,
        BufferPolicy::Average,
    )
    .unwrap();
    ema.update(b, &ToyNet::from_flat(&flat(8.0))).unwrap();
    assert_eq!(values_of(&ema), flat(5.0));
    ema.update(b, &ToyNet::from_flat(&flat(-3.0))).unwrap();
    assert_eq!(values_of(&ema), flat(3.0));
    assert_eq!(ema.count(), 3);
    assert_eq!(ema.rule(), WeightRule::Ema { decay: 0.75 });
}

#[test]
fn merge_weights_by_counts_and_treats_buffers_by_policy() {
    // A = mean of {0, 0, 0} = 0 (count 3), B = 8 (count 1): merged = 8·1/4 = 2 with count 4.
    let b = backend();
    for policy in [
        BufferPolicy::Average,
        BufferPolicy::CopyLatest,
        BufferPolicy::RecomputeLater,
    ] {
        let mut a = WeightAverage::swa(b, &ToyNet::from_flat(&flat(0.0)), policy).unwrap();
        a.update(b, &ToyNet::from_flat(&flat(0.0))).unwrap();
        a.update(b, &ToyNet::from_flat(&flat(0.0))).unwrap();
        let other = WeightAverage::swa(b, &ToyNet::from_flat(&flat(8.0)), policy).unwrap();
        a.merge(b, &other).unwrap();
        assert_eq!(a.count(), 4);
        let mut model = ToyNet::from_flat(&flat(-1.0));
        a.copy_into(b, &mut model).unwrap();
        for (i, v) in model.to_flat().into_iter().enumerate() {
            let expected = match (is_statistic(i), policy) {
                (false, _) | (true, BufferPolicy::Average) => 2.0,
                (true, BufferPolicy::CopyLatest) => 0.0, // the receiver keeps its own latest statistics
                (true, BufferPolicy::RecomputeLater) => -1.0, // left to the caller
            };
            assert_eq!(v, expected, "element {i} under {policy:?}");
        }
    }
}

#[test]
fn merge_rejects_different_buffer_policies_and_layouts() {
    let b = backend();
    let mut a =
        WeightAverage::swa(b, &ToyNet::from_flat(&flat(0.0)), BufferPolicy::Average).unwrap();
    let other =
        WeightAverage::swa(b, &ToyNet::from_flat(&flat(1.0)), BufferPolicy::CopyLatest).unwrap();
    let err = a.merge(b, &other).unwrap_err();
    assert!(
        matches!(err, AveragingError::Incompatible { op: "merge", .. }),
        "{err}"
    );

    let mut renamed = Loose::like_toy(1.0);
    renamed.entries[2].0 = "bn.gamma".to_owned();
    let other = WeightAverage::swa(b, &renamed, BufferPolicy::Average).unwrap();
    let err = a.merge(b, &other).unwrap_err();
    assert!(
        matches!(&err, AveragingError::Layout { op: "merge", source: LayoutError::NameMismatch { index: 2, expected, got, .. } }
            if expected == "bn.weight" && got == "bn.gamma"),
        "{err}"
    );
    assert_eq!(a.count(), 1);
    assert_eq!(values_of(&a), flat(0.0));
}

/// Updates the average with a snapshot that does not fit and checks the error, and that nothing changed.
fn rejects(snapshot: &Loose, check: impl Fn(&AveragingError) -> bool) {
    let b = backend();
    let mut swa =
        WeightAverage::swa(b, &ToyNet::from_flat(&flat(1.0)), BufferPolicy::Average).unwrap();
    let err = swa.update(b, snapshot).unwrap_err();
    assert!(check(&err), "unexpected error: {err}");
    assert_eq!(swa.count(), 1, "a rejected snapshot is not counted");
    assert_eq!(
        values_of(&swa),
        flat(1.0),
        "a rejected snapshot changes nothing"
    );
}

#[test]
fn update_names_the_mismatching_tensor() {
    let mut renamed = Loose::like_toy(5.0);
    renamed.entries[7].0 = "classifier.bias".to_owned();
    rejects(&renamed, |e| {
        matches!(e, AveragingError::Layout { op: "update", source: LayoutError::NameMismatch { index: 7, expected, got, .. } }
            if expected == "fc.bias" && got == "classifier.bias")
            && e.to_string().contains("fc.bias")
    });

    let mut reshaped = Loose::like_toy(5.0);
    reshaped.entries[6].2 = backend().zeros(&[4, 3]).unwrap();
    rejects(&reshaped, |e| {
        matches!(e, AveragingError::Layout { op: "update", source: LayoutError::ShapeMismatch { name, expected, got } }
            if name == "fc.weight" && expected == &[3, 4] && got == &[4, 3])
    });

    let mut role = Loose::like_toy(5.0);
    role.entries[4].1 = TensorRole::Parameter;
    rejects(&role, |e| {
        matches!(e, AveragingError::Layout { op: "update", source: LayoutError::RoleMismatch { name, expected: TensorRole::BatchNormStatistic, got: TensorRole::Parameter } }
            if name == "bn.running_mean")
    });

    let mut shorter = Loose::like_toy(5.0);
    shorter.entries.pop();
    rejects(&shorter, |e| {
        matches!(
            e,
            AveragingError::Layout {
                op: "update",
                source: LayoutError::CountMismatch {
                    expected: 8,
                    got: 7,
                    ..
                }
            }
        )
    });

    let mut longer = Loose::like_toy(5.0);
    let extra = backend().zeros(&[1]).unwrap();
    longer
        .entries
        .push(("extra".to_owned(), TensorRole::Parameter, extra));
    rejects(&longer, |e| {
        matches!(
            e,
            AveragingError::Layout {
                op: "update",
                source: LayoutError::CountMismatch {
                    expected: 8,
                    got: 9,
                    ..
                }
            }
        )
    });
}

#[test]
fn copy_into_rejects_a_different_model_and_leaves_it_unchanged() {
    let b = backend();
    let swa = WeightAverage::swa(b, &ToyNet::from_flat(&flat(1.0)), BufferPolicy::Average).unwrap();
    let mut other = Loose::like_toy(7.0);
    other.entries[0].0 = "features.0.weight".to_owned();
    let err = swa.copy_into(b, &mut other).unwrap_err();
    assert!(
        matches!(
            &err,
            AveragingError::Layout {
                op: "copy_into",
                source: LayoutError::NameMismatch { index: 0, expected, got, .. },
            } if expected == "conv.weight" && got == "features.0.weight"
        ),
        "{err}"
    );
    for (_, _, t) in &other.entries {
        assert!(b.to_host(t).unwrap().iter().all(|&v| v == 7.0));
    }
}

#[test]
fn invalid_models_and_decays_are_rejected() {
    let b = backend();
    let mut dup = Loose::like_toy(0.0);
    dup.entries[1].0 = "conv.weight".to_owned();
    let err = WeightAverage::swa(b, &dup, BufferPolicy::Average).unwrap_err();
    assert!(
        matches!(&err, AveragingError::Layout { op: "new", source: LayoutError::DuplicateName { name } } if name == "conv.weight"),
        "{err}"
    );

    for decay in [-0.1, 1.5, f32::NAN] {
        let err = WeightAverage::ema(
            b,
            &ToyNet::from_flat(&flat(0.0)),
            decay,
            BufferPolicy::Average,
        )
        .unwrap_err();
        assert!(
            matches!(err, AveragingError::InvalidDecay { .. }),
            "decay {decay}: {err}"
        );
    }
}

#[test]
fn from_state_rejects_inconsistent_checkpoints() {
    let b = backend();
    let mut swa = WeightAverage::swa(
        b,
        &ToyNet::from_flat(&flat(2.0)),
        BufferPolicy::RecomputeLater,
    )
    .unwrap();
    swa.update(b, &ToyNet::from_flat(&flat(4.0))).unwrap();
    let state = swa.to_state(b).unwrap();
    assert_eq!(state.n_averaged, 2);
    assert!(
        state.tensors[4].values.is_none(),
        "RecomputeLater holds no BN statistics"
    );
    assert_eq!(state.tensors[0].values.as_deref(), Some(&[3.0f32; 18][..]));

    let mut zero = state.clone();
    zero.n_averaged = 0;
    assert!(matches!(
        WeightAverage::from_state(b, &zero),
        Err(AveragingError::InvalidState { .. })
    ));

    let mut short = state.clone();
    short.tensors[6].values.as_mut().unwrap().pop();
    let err = WeightAverage::from_state(b, &short).unwrap_err();
    assert!(
        matches!(&err, AveragingError::InvalidState { name, .. } if name == "fc.weight"),
        "{err}"
    );

    let mut held = state.clone();
    held.tensors[4].values = Some(vec![0.0, 0.0]);
    assert!(matches!(
        WeightAverage::from_state(b, &held),
        Err(AveragingError::InvalidState { .. })
    ));

    let mut missing = state.clone();
    missing.tensors[0].values = None;
    assert!(matches!(
        WeightAverage::from_state(b, &missing),
        Err(AveragingError::InvalidState { .. })
    ));

    let mut duplicated = state.clone();
    duplicated.tensors[1].name = "conv.weight".to_owned();
    assert!(matches!(
        WeightAverage::from_state(b, &duplicated),
        Err(AveragingError::InvalidState { .. })
    ));

    // One type restores every rule: the rule comes from the state, so an equal-weight state never comes
    // back as an EMA and the reverse.
    let mut ema_state = state.clone();
    ema_state.rule = WeightRule::Ema { decay: 0.5 };
    let ema = WeightAverage::from_state(b, &ema_state).unwrap();
    assert_eq!(ema.rule(), WeightRule::Ema { decay: 0.5 });
    let mut bad_decay = state.clone();
    bad_decay.rule = WeightRule::Ema { decay: 2.0 };
    assert!(matches!(
        WeightAverage::from_state(b, &bad_decay),
        Err(AveragingError::InvalidDecay { .. })
    ));

    let restored = WeightAverage::from_state(b, &state).unwrap();
    assert_eq!(restored.count(), 2);
    assert_eq!(restored.rule(), WeightRule::Equal);
}

#[test]
fn merge_refuses_averages_that_do_not_follow_equal_weights() {
    let b = backend();
    let ramp = WeightRule::Custom(CustomRule::new("ramp", |n| 2.0 / (n as f32 + 2.0)));
    for rule in [WeightRule::Ema { decay: 0.5 }, ramp] {
        let mut equal =
            WeightAverage::swa(b, &ToyNet::from_flat(&flat(0.0)), BufferPolicy::Average).unwrap();
        let mut other = WeightAverage::new(
            b,
            &ToyNet::from_flat(&flat(8.0)),
            rule,
            BufferPolicy::Average,
        )
        .unwrap();
        let err = equal.merge(b, &other).unwrap_err();
        assert_eq!(err, AveragingError::MergeNeedsEqualWeights { rule });
        let err = other.merge(b, &equal).unwrap_err();
        assert_eq!(err, AveragingError::MergeNeedsEqualWeights { rule });
        assert_eq!((equal.count(), other.count()), (1, 1));
        assert_eq!(values_of(&equal), flat(0.0));
        assert_eq!(values_of(&other), flat(8.0));
    }
}

#[test]
fn a_custom_rule_weighs_snapshots_by_its_function() {
    // Weight 2/(n + 2): 4 → 4 + (2/3)·(10 − 4) = 8 → 8 + (2/4)·(0 − 8) = 4.
    let b = backend();
    let rule = WeightRule::Custom(CustomRule::new("ramp", |n| 2.0 / (n as f32 + 2.0)));
    let mut avg = WeightAverage::new(
        b,
        &ToyNet::from_flat(&flat(4.0)),
        rule,
        BufferPolicy::Average,
    )
    .unwrap();
    avg.update(b, &ToyNet::from_flat(&flat(10.0))).unwrap();
    assert_eq!(values_of(&avg), flat(8.0));
    avg.update(b, &ToyNet::from_flat(&flat(0.0))).unwrap();
    assert_eq!(values_of(&avg), flat(4.0));
    assert_eq!(avg.count(), 3);
    assert_eq!(avg.rule(), rule);
}

#[test]
fn a_custom_weight_outside_the_unit_interval_is_refused_and_changes_nothing() {
    let b = backend();
    let rule = WeightRule::Custom(CustomRule::new("overshoot", |n| n as f32));
    let mut avg = WeightAverage::new(
        b,
        &ToyNet::from_flat(&flat(1.0)),
        rule,
        BufferPolicy::Average,
    )
    .unwrap();
    avg.update(b, &ToyNet::from_flat(&flat(2.0))).unwrap(); // weight 1: copies
    let err = avg.update(b, &ToyNet::from_flat(&flat(3.0))).unwrap_err();
    assert_eq!(
        err,
        AveragingError::InvalidWeight {
            rule: "overshoot",
            averaged: 2,
            weight: 2.0
        }
    );
    assert!(err.to_string().contains("overshoot"), "{err}");
    assert_eq!(avg.count(), 2);
    assert_eq!(values_of(&avg), flat(2.0));
}

#[test]
fn rules_are_written_as_text_except_custom_ones_which_are_refused_by_name() {
    let equal = serde_json::to_string(&WeightRule::Equal).unwrap();
    assert_eq!(equal, r#"{"kind":"equal"}"#);
    let ema = serde_json::to_string(&WeightRule::Ema { decay: 0.5 }).unwrap();
    assert_eq!(ema, r#"{"kind":"ema","decay":0.5}"#);
    for (text, rule) in [
        (equal, WeightRule::Equal),
        (ema, WeightRule::Ema { decay: 0.5 }),
    ] {
        assert_eq!(serde_json::from_str::<WeightRule>(&text).unwrap(), rule);
    }
    let custom = WeightRule::Custom(CustomRule::new("ramp", |n| 1.0 / n as f32));
    let err = serde_json::to_string(&custom).unwrap_err();
    assert!(
        err.to_string().contains("custom weight rule `ramp`"),
        "{err}"
    );
    assert!(serde_json::from_str::<WeightRule>(r#"{"kind":"custom"}"#).is_err());
}
