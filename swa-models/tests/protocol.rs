//! The paper's protocol: the runs a recipe makes, the laws of [`RunConfig::shared_epochs`] (the count is
//! symmetric, every step before it has the same learning rate in both runs and no snapshot, and it is
//! maximal: at the first epoch it excludes, the rates differ or a run ends or takes its first snapshot),
//! and the plan by which a seed's runs start from each other's checkpoints.

use std::path::Path;

use proptest::prelude::*;
use swa_core::schedule::LrSchedule;
use swa_models::optim::SgdConfig;
use swa_models::protocol::{plan_seed, Branch, Recipe, RunKind};
use swa_models::train::RunConfig;
use swa_models::Architecture;

/// A recipe with the paper's weight decay for one budget, its SWA run 1.5 budgets long and FGE cycles
/// of two epochs.
fn recipe(lr_init: f32, swa_lr: f32, budget: usize, swa_start: usize) -> Recipe {
    Recipe {
        architecture: Architecture::PreResNet { depth: 8 },
        budget,
        swa_epochs: budget + budget / 2,
        lr_init,
        swa_start,
        swa_lr,
        weight_decay: 5e-4,
        batch_size: 128,
        fge_cycle: 2,
        fge_test_every: 0,
        swa_eval_every: 1,
        train_limit: None,
        test_limit: None,
        swag_max_rank: None,
        holdout: 0,
    }
}

/// The runs of the paper's protocol for one budget: SGD, SWA and FGE (cycles from `swa_start − 1`).
fn protocol(lr_init: f32, swa_lr: f32, budget: usize, swa_start: usize) -> [RunConfig; 3] {
    let recipe = recipe(lr_init, swa_lr, budget, swa_start);
    RunKind::ALL.map(|kind| recipe.run_config(kind, 1).expect("a valid recipe"))
}

fn first_snapshot_epoch(c: &RunConfig) -> usize {
    c.snapshots.map_or(usize::MAX, |s| s.start_epoch)
}

#[test]
fn the_quick_and_paper_protocols_share_their_constant_phase() {
    // PreResNet-20 quick preset: budget 16, swa_start 13 — lr 0.1 for epochs 0–6 in both (t ≤ 0.5).
    let [sgd, swa, fge] = protocol(0.1, 0.01, 16, 13);
    assert_eq!(sgd.shared_epochs(&swa, 391), 7);
    // FGE follows the SWA schedule until its cycles start after epoch swa_start − 1 = 12.
    assert_eq!(fge.shared_epochs(&swa, 391), 12);
    // VGG-16 paper preset: budget 200, swa_start 161 — SWA decays from epoch 81, SGD from epoch 101.
    let [sgd, swa, fge] = protocol(0.05, 0.01, 200, 161);
    assert_eq!(sgd.shared_epochs(&swa, 391), 81);
    assert_eq!(fge.shared_epochs(&swa, 391), 160);
    assert_eq!(fge.shared_epochs(&sgd, 391), 81);
}

#[test]
fn another_seed_weight_decay_or_held_out_set_shares_nothing() {
    let [sgd, swa, _] = protocol(0.1, 0.01, 16, 13);
    let reseeded = RunConfig {
        seed: 2,
        ..swa.clone()
    };
    assert_eq!(sgd.shared_epochs(&reseeded, 10), 0);
    // Runs that trained on other images share no epoch, even with the same learning rates.
    let held_out = RunConfig {
        holdout: 5000,
        ..swa.clone()
    };
    assert_eq!(sgd.shared_epochs(&held_out, 10), 0);
    let both_held_out = RunConfig {
        holdout: 5000,
        ..sgd.clone()
    };
    let shared = sgd.shared_epochs(&swa, 10);
    assert!(shared > 0);
    assert_eq!(both_held_out.shared_epochs(&held_out, 10), shared);
    let decayed = RunConfig {
        sgd: SgdConfig::momentum(1e-4),
        ..swa
    };
    assert_eq!(sgd.shared_epochs(&decayed, 10), 0);
    assert_eq!(
        sgd.shared_epochs(&sgd, 10),
        16,
        "a run shares all of itself"
    );
}

proptest! {
    #[test]
    fn shared_epochs_is_the_longest_identical_prefix(
        lr_init in 0.01f32..0.5,
        swa_ratio in 0.02f32..1.0,
        budget in 4usize..40,
        start_fraction in 0.3f64..1.0,
        steps in 1usize..6,
        pick in (0usize..3, 0usize..3),
    ) {
        let swa_start = ((budget as f64 * start_fraction) as usize).clamp(2, budget);
        let runs = protocol(lr_init, lr_init * swa_ratio, budget, swa_start);
        let (a, b) = (&runs[pick.0], &runs[pick.1]);
        let shared = a.shared_epochs(b, steps);
        prop_assert_eq!(shared, b.shared_epochs(a, steps));
        let limit = a.epochs.min(b.epochs)
            .min(first_snapshot_epoch(a).saturating_sub(1))
            .min(first_snapshot_epoch(b).saturating_sub(1));
        prop_assert!(shared <= limit);
        for epoch in 0..shared {
            for step in 0..steps {
                prop_assert_eq!(
                    a.schedule.lr(epoch, step, steps).to_bits(),
                    b.schedule.lr(epoch, step, steps).to_bits()
                );
            }
        }
        if shared < limit {
            let differs = (0..steps)
                .any(|step| a.schedule.lr(shared, step, steps) != b.schedule.lr(shared, step, steps));
            prop_assert!(differs, "epoch {} has the same rates and is still excluded", shared);
        }
    }
}

#[test]
fn a_seed_plans_each_run_from_the_earlier_run_sharing_most_epochs(
) -> Result<(), Box<dyn std::error::Error>> {
    let quick = recipe(0.1, 0.01, 16, 13);
    let seed_dir = Path::new("out/cifar10/preresnet8/seed-1");
    let plans = plan_seed(&quick, &RunKind::ALL, 1, 391, seed_dir)?;
    let kinds: Vec<RunKind> = plans.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, RunKind::ALL);
    for plan in &plans {
        assert_eq!(plan.config, quick.run_config(plan.kind, 1)?);
        assert_eq!(plan.dir, seed_dir.join(plan.kind.to_string()));
    }
    let [sgd, swa, fge] = [&plans[0], &plans[1], &plans[2]];
    assert_eq!(sgd.branch, None, "the first run trains everything");
    // SWA shares the 7 epochs at lr 0.1 with SGD; FGE shares 12 with SWA, more than its 7 with SGD.
    assert_eq!(
        swa.branch,
        Some(Branch {
            from: RunKind::Sgd,
            checkpoints: sgd.checkpoint_dir(),
            epochs: 7
        })
    );
    assert_eq!(
        fge.branch,
        Some(Branch {
            from: RunKind::Swa,
            checkpoints: swa.checkpoint_dir(),
            epochs: 12
        })
    );
    // Besides the branch points, the SWA and FGE runs keep the checkpoints of their first, middle and
    // last three snapshots for the loss-surface planes: SWA averages after epochs 13..=24, FGE at the
    // low points of its 2-epoch cycles, after epochs 13 and 15.
    assert_eq!(swa.config.snapshot_epochs(), (13..=24).collect::<Vec<_>>());
    assert_eq!(fge.config.snapshot_epochs(), vec![13, 15]);
    assert_eq!(
        (
            sgd.keep.as_slice(),
            swa.keep.as_slice(),
            fge.keep.as_slice()
        ),
        (&[7][..], &[13, 19, 22, 23, 24, 12][..], &[13, 15][..])
    );
    assert_eq!(fge.taken_epochs(), 12);
    // Another seed's runs start from that seed's checkpoints only.
    let other = plan_seed(&quick, &[RunKind::Swa], 2, 391, seed_dir)?;
    assert_eq!(other[0].branch, None);
    Ok(())
}

#[test]
fn recipes_outside_the_protocol_are_refused_with_the_value() {
    let late_start = recipe(0.1, 0.01, 16, 17);
    let message = late_start
        .run_config(RunKind::Swa, 1)
        .map(|_| ())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(message.contains("swa_start 17"), "{message}");
    let short = Recipe {
        swa_epochs: 10,
        ..recipe(0.1, 0.01, 16, 13)
    };
    assert!(short.validate().is_err());
    assert!(recipe(0.1, 0.01, 16, 13).validate().is_ok());
}

#[test]
fn run_kinds_parse_from_their_names_and_nothing_else() {
    for kind in RunKind::ALL {
        assert_eq!(kind.to_string().parse::<RunKind>().ok(), Some(kind));
    }
    assert_eq!("SWA".parse::<RunKind>().ok(), Some(RunKind::Swa));
    let message = "swag"
        .parse::<RunKind>()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(message.contains("sgd, swa, fge"), "{message}");
}

#[test]
fn a_shorter_budget_keeps_the_protocols_proportions() -> Result<(), Box<dyn std::error::Error>> {
    // The quick preset: 16 epochs, SWA from 11, 24 epochs of SWA.
    let quick = Recipe {
        swa_epochs: 24,
        ..recipe(0.1, 0.01, 16, 11)
    };
    let short = quick.with_budget(8)?;
    assert_eq!(
        (short.budget, short.swa_start, short.swa_epochs),
        (8, 6, 12)
    );
    assert_eq!(
        (short.lr_init, short.swa_lr, short.batch_size),
        (0.1, 0.01, 128)
    );
    // The paper's PreResNet recipe at a tenth of its budget: 126/150 and 225/150 kept.
    let paper = Recipe {
        swa_epochs: 225,
        ..recipe(0.1, 0.05, 150, 126)
    };
    let tenth = paper.with_budget(15)?;
    assert_eq!((tenth.swa_start, tenth.swa_epochs), (13, 23));
    // swa_start stays at least one epoch and within the budget.
    let one = quick.with_budget(1)?;
    assert_eq!((one.budget, one.swa_start, one.swa_epochs), (1, 1, 2));
    assert!(quick.with_budget(0).is_err());
    Ok(())
}

#[test]
fn recipes_round_trip_through_json_and_name_what_would_train_differently(
) -> Result<(), Box<dyn std::error::Error>> {
    let ours = Recipe {
        architecture: "shakeshake26-2x32d".parse()?,
        train_limit: Some(2500),
        ..recipe(0.2, 0.02, 6, 4)
    };
    let json = serde_json::to_string(&ours)?;
    assert!(
        json.contains("\"architecture\":\"shakeshake26-2x32d\""),
        "{json}"
    );
    let back: Recipe = serde_json::from_str(&json)?;
    assert_eq!(back, ours);
    assert!(ours.training_differences(&back).is_empty());
    // Evaluation settings may change between invocations; training settings may not.
    let evaluated_differently = Recipe {
        test_limit: Some(100),
        swa_eval_every: 3,
        fge_test_every: 50,
        ..ours.clone()
    };
    assert!(ours.training_differences(&evaluated_differently).is_empty());
    let trained_differently = Recipe {
        swa_lr: 0.05,
        train_limit: None,
        ..ours.clone()
    };
    assert_eq!(
        ours.training_differences(&trained_differently),
        ["swa_lr: 0.02 vs 0.05", "train_limit: Some(2500) vs None"]
    );
    let unknown = json.replace("shakeshake26-2x32d", "resnext50");
    assert!(serde_json::from_str::<Recipe>(&unknown).is_err());
    Ok(())
}
