//! The layout that averages and SWAG moments check models against: what it records of a model, which
//! roles it covers, and the typed errors, in their order of precedence, for models and layouts that do
//! not fit.

mod toy_model;

use swa_core::averaging::{AveragingError, BufferPolicy, WeightAverage, WeightAveraging};
use swa_core::params::{LayoutEntry, LayoutError, RoleFilter, TensorLayout};
use swa_core::swag::{SwagError, SwagMoments};
use swa_core::{Backend, TensorRole};
use toy_model::{backend, Loose, ToyNet, LAYOUT, NUMEL};

const PARAMETERS: RoleFilter = RoleFilter::Only(TensorRole::Parameter);

fn toy(value: f32) -> ToyNet {
    ToyNet::from_flat(&[value; NUMEL])
}

fn layout_of(model: &Loose, roles: RoleFilter) -> TensorLayout {
    TensorLayout::of_model(model, roles).unwrap()
}

#[test]
fn a_layout_records_names_roles_and_shapes_in_visiting_order() {
    let layout = TensorLayout::of_model(&toy(1.0), RoleFilter::All).unwrap();
    assert_eq!(layout.roles(), RoleFilter::All);
    assert_eq!(layout.len(), LAYOUT.len());
    assert!(!layout.is_empty());
    let expected: Vec<LayoutEntry> = LAYOUT
        .iter()
        .map(|(name, role, shape)| LayoutEntry {
            name: name.to_string(),
            role: *role,
            shape: shape.to_vec(),
        })
        .collect();
    assert_eq!(layout.entries(), &expected[..]);
    assert_eq!(
        layout.names(),
        LAYOUT.iter().map(|(name, _, _)| *name).collect::<Vec<_>>()
    );
    assert_eq!(layout.numel(), NUMEL);
    assert_eq!(layout.position("fc.weight"), Some(6));
    assert_eq!(layout.entry("fc.weight"), Some(&expected[6]));
    assert_eq!(layout.position("fc.gamma"), None);
    assert_eq!(layout.entry("fc.gamma"), None);
}

#[test]
fn a_layout_of_parameters_skips_batch_norm_statistics() {
    let layout = TensorLayout::of_model(&toy(1.0), PARAMETERS).unwrap();
    assert_eq!(layout.roles(), PARAMETERS);
    assert_eq!(
        layout.names(),
        [
            "conv.weight",
            "conv.bias",
            "bn.weight",
            "bn.bias",
            "fc.weight",
            "fc.bias"
        ]
    );
    assert!(layout
        .entries()
        .iter()
        .all(|e| e.role == TensorRole::Parameter));
    assert_eq!(layout.numel(), NUMEL - 4);
    // Positions count the covered tensors only.
    assert_eq!(layout.position("fc.weight"), Some(4));
    assert_eq!(layout.position("bn.running_mean"), None);

    let mut only_statistics = Loose::like_toy(1.0);
    only_statistics
        .entries
        .retain(|(_, role, _)| *role == TensorRole::BatchNormStatistic);
    assert!(layout_of(&only_statistics, PARAMETERS).is_empty());
}

#[test]
fn a_repeated_name_is_refused_among_the_covered_tensors_only() {
    let mut twice = Loose::like_toy(0.0);
    twice.entries[3].0 = "conv.bias".to_owned();
    for roles in [RoleFilter::All, PARAMETERS] {
        assert_eq!(
            TensorLayout::of_model(&twice, roles).unwrap_err(),
            LayoutError::DuplicateName {
                name: "conv.bias".to_owned()
            },
            "{roles:?}"
        );
    }

    // Two statistics under one name: a layout of parameters never sees them.
    let mut statistics_twice = Loose::like_toy(0.0);
    statistics_twice.entries[5].0 = "bn.running_mean".to_owned();
    let err = TensorLayout::of_model(&statistics_twice, RoleFilter::All).unwrap_err();
    assert_eq!(
        err,
        LayoutError::DuplicateName {
            name: "bn.running_mean".to_owned()
        }
    );
    assert!(err.to_string().contains("`bn.running_mean`"), "{err}");
    assert_eq!(layout_of(&statistics_twice, PARAMETERS).len(), 6);
}

#[test]
fn push_refuses_a_repeated_name_and_an_uncovered_role_and_changes_nothing() {
    let mut layout = TensorLayout::new(PARAMETERS);
    assert!(layout.is_empty());
    layout
        .push("fc.weight", TensorRole::Parameter, &[3, 4])
        .unwrap();
    let before = layout.clone();
    assert_eq!(
        layout.push("fc.weight", TensorRole::Parameter, &[3]),
        Err(LayoutError::DuplicateName {
            name: "fc.weight".to_owned()
        })
    );
    assert_eq!(
        layout.push("bn.running_mean", TensorRole::BatchNormStatistic, &[2]),
        Err(LayoutError::RoleMismatch {
            name: "bn.running_mean".to_owned(),
            expected: TensorRole::Parameter,
            got: TensorRole::BatchNormStatistic,
        })
    );
    assert_eq!(layout, before);
    assert_eq!(layout.position("bn.running_mean"), None);

    let mut all = TensorLayout::new(RoleFilter::All);
    all.push("bn.running_mean", TensorRole::BatchNormStatistic, &[2])
        .unwrap();
    assert_eq!(all.entries()[0].role, TensorRole::BatchNormStatistic);
}

#[test]
fn a_model_of_the_same_layout_fits_whatever_its_values() {
    let layout = TensorLayout::of_model(&toy(1.0), RoleFilter::All).unwrap();
    assert_eq!(layout.check_model(&toy(-3.0)), Ok(()));
    assert_eq!(layout.check_model(&Loose::like_toy(7.0)), Ok(()));
    let other = TensorLayout::of_model(&Loose::like_toy(2.0), RoleFilter::All).unwrap();
    assert_eq!(layout.check_same(&other), Ok(()));
    assert_eq!(layout, other);
}

#[test]
fn each_kind_of_mismatch_names_the_tensor_and_both_values() {
    let layout = TensorLayout::of_model(&toy(1.0), RoleFilter::All).unwrap();

    let mut renamed = Loose::like_toy(1.0);
    renamed.entries[7].0 = "classifier.bias".to_owned();
    let err = layout.check_model(&renamed).unwrap_err();
    assert_eq!(
        err,
        LayoutError::NameMismatch {
            roles: RoleFilter::All,
            index: 7,
            expected: "fc.bias".to_owned(),
            got: "classifier.bias".to_owned(),
        }
    );
    assert_eq!(
        err.to_string(),
        "tensor #7 is named `classifier.bias`, expected `fc.bias`"
    );

    let mut role = Loose::like_toy(1.0);
    role.entries[5].1 = TensorRole::Parameter;
    let err = layout.check_model(&role).unwrap_err();
    assert_eq!(
        err,
        LayoutError::RoleMismatch {
            name: "bn.running_var".to_owned(),
            expected: TensorRole::BatchNormStatistic,
            got: TensorRole::Parameter,
        }
    );
    assert_eq!(
        err.to_string(),
        "tensor `bn.running_var` has role Parameter, expected BatchNormStatistic"
    );

    let mut reshaped = Loose::like_toy(1.0);
    reshaped.entries[0].2 = backend().zeros(&[2, 1, 9]).unwrap();
    let err = layout.check_model(&reshaped).unwrap_err();
    assert_eq!(
        err,
        LayoutError::ShapeMismatch {
            name: "conv.weight".to_owned(),
            expected: vec![2, 1, 3, 3],
            got: vec![2, 1, 9],
        }
    );
    assert_eq!(
        err.to_string(),
        "tensor `conv.weight` has shape [2, 1, 9], expected [2, 1, 3, 3]"
    );

    let mut shorter = Loose::like_toy(1.0);
    shorter.entries.pop();
    let err = layout.check_model(&shorter).unwrap_err();
    assert_eq!(
        err,
        LayoutError::CountMismatch {
            roles: RoleFilter::All,
            expected: 8,
            got: 7,
        }
    );
    assert_eq!(err.to_string(), "expected 8 tensors, got 7");

    let mut longer = Loose::like_toy(1.0);
    let extra = backend().zeros(&[1]).unwrap();
    longer
        .entries
        .push(("extra".to_owned(), TensorRole::Parameter, extra));
    assert_eq!(
        layout.check_model(&longer),
        Err(LayoutError::CountMismatch {
            roles: RoleFilter::All,
            expected: 8,
            got: 9,
        })
    );
}

#[test]
fn the_first_differing_tensor_is_reported_and_a_mismatch_before_the_count() {
    let layout = TensorLayout::of_model(&toy(1.0), RoleFilter::All).unwrap();

    // A renamed and reshaped tensor: the name is checked first.
    let mut both = Loose::like_toy(1.0);
    both.entries[6].0 = "fc.kernel".to_owned();
    both.entries[6].2 = backend().zeros(&[4, 3]).unwrap();
    assert!(matches!(
        layout.check_model(&both),
        Err(LayoutError::NameMismatch { index: 6, .. })
    ));

    // A role and a shape on one tensor: the role is checked first.
    let mut role_and_shape = Loose::like_toy(1.0);
    role_and_shape.entries[4].1 = TensorRole::Parameter;
    role_and_shape.entries[4].2 = backend().zeros(&[3]).unwrap();
    assert!(matches!(
        layout.check_model(&role_and_shape),
        Err(LayoutError::RoleMismatch { name, .. }) if name == "bn.running_mean"
    ));

    // Two tensors that differ: the earlier one is reported.
    let mut two = Loose::like_toy(1.0);
    two.entries[7].0 = "head.bias".to_owned();
    two.entries[1].2 = backend().zeros(&[5]).unwrap();
    assert!(matches!(
        layout.check_model(&two),
        Err(LayoutError::ShapeMismatch { name, .. }) if name == "conv.bias"
    ));

    // One tensor missing from the middle: the tensors after it are out of place, which is reported
    // rather than the count.
    let mut gap = Loose::like_toy(1.0);
    gap.entries.remove(2);
    assert_eq!(
        layout.check_model(&gap),
        Err(LayoutError::NameMismatch {
            roles: RoleFilter::All,
            index: 2,
            expected: "bn.weight".to_owned(),
            got: "bn.bias".to_owned(),
        })
    );

    // One tensor too many, after a renamed one: the name comes first.
    let mut renamed_and_longer = Loose::like_toy(1.0);
    renamed_and_longer.entries[0].0 = "stem.weight".to_owned();
    let extra = backend().zeros(&[1]).unwrap();
    renamed_and_longer
        .entries
        .push(("extra".to_owned(), TensorRole::Parameter, extra));
    assert!(matches!(
        layout.check_model(&renamed_and_longer),
        Err(LayoutError::NameMismatch { index: 0, .. })
    ));
}

#[test]
fn a_layout_of_parameters_ignores_statistics_and_counts_parameters() {
    let layout = TensorLayout::of_model(&toy(1.0), PARAMETERS).unwrap();

    // Statistics renamed, reshaped or gone: still the same parameters.
    let mut other_statistics = Loose::like_toy(1.0);
    other_statistics.entries[4].0 = "bn.mean".to_owned();
    other_statistics.entries[5].2 = backend().zeros(&[7]).unwrap();
    assert_eq!(layout.check_model(&other_statistics), Ok(()));
    let mut no_statistics = Loose::like_toy(1.0);
    no_statistics
        .entries
        .retain(|(_, role, _)| *role == TensorRole::Parameter);
    assert_eq!(layout.check_model(&no_statistics), Ok(()));

    // fc.weight is the model's tensor #6 but its parameter #4.
    let mut renamed = Loose::like_toy(1.0);
    renamed.entries[6].0 = "fc.kernel".to_owned();
    let err = layout.check_model(&renamed).unwrap_err();
    assert_eq!(
        err,
        LayoutError::NameMismatch {
            roles: PARAMETERS,
            index: 4,
            expected: "fc.weight".to_owned(),
            got: "fc.kernel".to_owned(),
        }
    );
    assert_eq!(
        err.to_string(),
        "Parameter tensor #4 is named `fc.kernel`, expected `fc.weight`"
    );

    // A statistic turned parameter is one parameter too many, out of place.
    let mut promoted = Loose::like_toy(1.0);
    promoted.entries[4].1 = TensorRole::Parameter;
    assert_eq!(
        layout.check_model(&promoted),
        Err(LayoutError::NameMismatch {
            roles: PARAMETERS,
            index: 4,
            expected: "fc.weight".to_owned(),
            got: "bn.running_mean".to_owned(),
        })
    );

    let mut shorter = Loose::like_toy(1.0);
    shorter.entries.pop();
    let err = layout.check_model(&shorter).unwrap_err();
    assert_eq!(
        err,
        LayoutError::CountMismatch {
            roles: PARAMETERS,
            expected: 6,
            got: 5,
        }
    );
    assert_eq!(err.to_string(), "expected 6 Parameter tensors, got 5");
}

#[test]
fn check_same_reports_the_other_layouts_values_as_given() {
    let layout = TensorLayout::of_model(&toy(1.0), RoleFilter::All).unwrap();

    let mut renamed = Loose::like_toy(1.0);
    renamed.entries[2].0 = "bn.gamma".to_owned();
    assert_eq!(
        layout.check_same(&layout_of(&renamed, RoleFilter::All)),
        Err(LayoutError::NameMismatch {
            roles: RoleFilter::All,
            index: 2,
            expected: "bn.weight".to_owned(),
            got: "bn.gamma".to_owned(),
        })
    );

    let mut role = Loose::like_toy(1.0);
    role.entries[4].1 = TensorRole::Parameter;
    assert_eq!(
        layout.check_same(&layout_of(&role, RoleFilter::All)),
        Err(LayoutError::RoleMismatch {
            name: "bn.running_mean".to_owned(),
            expected: TensorRole::BatchNormStatistic,
            got: TensorRole::Parameter,
        })
    );

    let mut reshaped = Loose::like_toy(1.0);
    reshaped.entries[6].2 = backend().zeros(&[4, 3]).unwrap();
    assert_eq!(
        layout.check_same(&layout_of(&reshaped, RoleFilter::All)),
        Err(LayoutError::ShapeMismatch {
            name: "fc.weight".to_owned(),
            expected: vec![3, 4],
            got: vec![4, 3],
        })
    );

    let mut shorter = Loose::like_toy(1.0);
    shorter.entries.pop();
    let shorter = layout_of(&shorter, RoleFilter::All);
    assert_eq!(
        layout.check_same(&shorter),
        Err(LayoutError::CountMismatch {
            roles: RoleFilter::All,
            expected: 8,
            got: 7,
        })
    );
    // The other way round, the layout's own count is the expected one.
    assert_eq!(
        shorter.check_same(&layout),
        Err(LayoutError::CountMismatch {
            roles: RoleFilter::All,
            expected: 7,
            got: 8,
        })
    );
}

#[test]
fn an_average_reports_a_layout_error_with_its_operation() {
    let b = backend();
    let mut swa = WeightAverage::swa(b, &toy(1.0), BufferPolicy::Average).unwrap();
    let mut renamed = Loose::like_toy(1.0);
    renamed.entries[7].0 = "classifier.bias".to_owned();
    let err = swa.update(b, &renamed).unwrap_err();
    assert_eq!(
        err,
        AveragingError::Layout {
            op: "update",
            source: LayoutError::NameMismatch {
                roles: RoleFilter::All,
                index: 7,
                expected: "fc.bias".to_owned(),
                got: "classifier.bias".to_owned(),
            },
        }
    );
    assert_eq!(
        err.to_string(),
        "update: tensor #7 is named `classifier.bias`, expected `fc.bias`"
    );
    let source = std::error::Error::source(&err).expect("the layout error is the source");
    assert_eq!(
        source.to_string(),
        "tensor #7 is named `classifier.bias`, expected `fc.bias`"
    );
}

#[test]
fn swag_reports_a_layout_error_with_its_operation() {
    let b = backend();
    let mut swag = SwagMoments::new(b, &toy(1.0), 3).unwrap();
    let mut shorter = Loose::like_toy(1.0);
    shorter.entries.pop();
    let err = swag.update(b, &shorter).unwrap_err();
    assert_eq!(
        err,
        SwagError::Layout {
            op: "update",
            source: LayoutError::CountMismatch {
                roles: PARAMETERS,
                expected: 6,
                got: 5,
            },
        }
    );
    assert_eq!(
        err.to_string(),
        "update: expected 6 Parameter tensors, got 5"
    );
    let source = std::error::Error::source(&err).expect("the layout error is the source");
    assert_eq!(source.to_string(), "expected 6 Parameter tensors, got 5");

    let mut twice = Loose::like_toy(1.0);
    twice.entries[1].0 = "conv.weight".to_owned();
    assert_eq!(
        SwagMoments::new(b, &twice, 3).unwrap_err(),
        SwagError::Layout {
            op: "new",
            source: LayoutError::DuplicateName {
                name: "conv.weight".to_owned()
            },
        }
    );
}
