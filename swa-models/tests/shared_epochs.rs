//! Laws of [`RunConfig::shared_epochs`]: the count is symmetric, every step before it has the same learning
//! rate in both runs and no snapshot, and it is maximal: at the first epoch it excludes, the rates differ
//! or a run ends or takes its first snapshot.

use proptest::prelude::*;
use swa_core::averaging::{BufferPolicy, WeightRule};
use swa_core::schedule::{LrSchedule, Period, Schedule};
use swa_models::optim::SgdConfig;
use swa_models::train::{RunConfig, SnapshotUse, Snapshots};

/// The runs of the paper's protocol for one budget: SGD, SWA and FGE (cycles from `swa_start − 1`).
fn protocol(lr_init: f32, swa_lr: f32, budget: usize, swa_start: usize) -> [RunConfig; 3] {
    let base = RunConfig {
        epochs: budget,
        schedule: Schedule::original_sgd(lr_init, budget).expect("valid"),
        snapshots: None,
        sgd: SgdConfig::momentum(5e-4),
        seed: 1,
        swa_eval_epochs: Vec::new(),
        swa_eval_every: 0,
    };
    let swa_schedule = Schedule::original_swa(lr_init, swa_lr, swa_start).expect("valid");
    let swa = RunConfig {
        epochs: budget + budget / 2,
        schedule: swa_schedule.clone(),
        snapshots: Some(Snapshots {
            start_epoch: swa_start,
            every: Period::Epochs(1),
            usage: SnapshotUse::AverageWeights {
                buffers: BufferPolicy::RecomputeLater,
                rule: WeightRule::Equal,
            },
        }),
        ..base.clone()
    };
    let cycle = 2;
    let fge = RunConfig {
        schedule: swa_schedule.then(
            swa_start - 1,
            Schedule::triangular(lr_init / 2.0, lr_init / 200.0, Period::Epochs(cycle))
                .expect("valid"),
        ),
        snapshots: Some(Snapshots {
            start_epoch: swa_start - 1 + cycle / 2,
            every: Period::Epochs(cycle),
            usage: SnapshotUse::EnsemblePredictions,
        }),
        ..base.clone()
    };
    [base, swa, fge]
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
fn another_seed_or_weight_decay_shares_nothing() {
    let [sgd, swa, _] = protocol(0.1, 0.01, 16, 13);
    let reseeded = RunConfig {
        seed: 2,
        ..swa.clone()
    };
    assert_eq!(sgd.shared_epochs(&reseeded, 10), 0);
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
