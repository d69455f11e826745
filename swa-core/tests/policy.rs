//! The SWA policy: when it averages, at which learning rate, and that a training loop driven by it
//! averages exactly the snapshots the original code and the paper average.

mod toy_model;

use proptest::prelude::*;
use swa_core::averaging::{BufferPolicy, WeightAverage, WeightAveraging};
use swa_core::policy::SwaPolicy;
use swa_core::schedule::{AnnealStrategy, LrSchedule, Period, Schedule, ScheduleError};
use toy_model::{backend, ToyNet, NUMEL};

/// Every `(epoch, step)` after which the policy averages, in training order; `step = None` marks an
/// average after the epoch.
fn averaging_points(
    policy: &SwaPolicy,
    epochs: usize,
    steps_per_epoch: usize,
) -> Vec<(usize, Option<usize>)> {
    let mut points = Vec::new();
    for epoch in 0..epochs {
        for step in 0..steps_per_epoch {
            if policy.average_after_step(epoch, step, steps_per_epoch) {
                points.push((epoch, Some(step)));
            }
        }
        if policy.average_after_epoch(epoch) {
            points.push((epoch, None));
        }
    }
    points
}

#[test]
fn original_preset_averages_like_train_py() {
    // train.py averages after epoch index e when (e + 1) >= swa_start and (e + 1 − swa_start) % c == 0.
    let every_epoch = SwaPolicy::original(0.05, 0.01, 161, 1).unwrap();
    let points = averaging_points(&every_epoch, 300, 3);
    assert_eq!(points.first(), Some(&(160, None)));
    assert_eq!(points.last(), Some(&(299, None)));
    assert_eq!(points.len(), 140);
    assert!(!every_epoch.average_after_epoch(159));

    let every_third = SwaPolicy::original(0.05, 0.01, 161, 3).unwrap();
    let epochs: Vec<usize> = averaging_points(&every_third, 300, 3)
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(&epochs[..4], &[160, 163, 166, 169]);
    assert_eq!(epochs.len() as u64, every_third.snapshots_by_end(300, 3));

    // The schedule is the original one: swa_lr from 90 % of swa_start on, so every averaged epoch runs at it.
    for (epoch, _) in &points {
        assert_eq!(every_epoch.lr(*epoch, 0, 3), 0.01);
    }
    assert_eq!(every_epoch.lr(0, 0, 3), 0.05);
}

#[test]
fn cyclic_preset_averages_at_every_cycle_end_at_alpha2() {
    // Pre-train at 0.1 for 4 epochs of 5 steps, then cycles of 3 iterations from 0.05 to 0.001.
    let pretrain = Schedule::constant(0.1).unwrap();
    let policy = SwaPolicy::cyclic(pretrain, 4, 0.05, 0.001, Period::Iterations(3)).unwrap();
    let points = averaging_points(&policy, 10, 5);
    // k = 0: the pre-trained model at the end of epoch 3 (Algorithm 1 starts w_SWA from it) ...
    assert_eq!(points[0], (3, Some(4)));
    assert_eq!(policy.lr(3, 4, 5), 0.1);
    // ... then every third iteration of the SWA phase, each the last of a cycle, run at α2.
    assert_eq!(&points[1..4], &[(4, Some(2)), (5, Some(0)), (5, Some(3))]);
    for &(epoch, step) in &points[1..] {
        let step = step.unwrap();
        assert_eq!(
            policy.lr(epoch, step, 5),
            0.001,
            "epoch {epoch} step {step}"
        );
    }
    assert_eq!(points.len() as u64, policy.snapshots_by_end(10, 5));
    // 30 SWA-phase iterations: k = 0 and 10 cycle ends.
    assert_eq!(points.len(), 11);
}

#[test]
fn swalr_preset_continues_from_the_base_schedule() {
    let base = Schedule::cosine(0.1, 0.0, 100, false).unwrap();
    let policy = SwaPolicy::swalr(
        base.clone(),
        60,
        0.01,
        5,
        AnnealStrategy::Cos,
        Period::Epochs(1),
    )
    .unwrap();
    assert_eq!(policy.lr(59, 0, 1), base.lr(59, 0, 1));
    assert_eq!(policy.lr(60, 0, 1), base.lr(60, 0, 1));
    assert!(policy.lr(62, 0, 1) < base.lr(60, 0, 1));
    assert_eq!(policy.lr(65, 0, 1), 0.01);
    assert_eq!(policy.lr(99, 0, 1), 0.01);
    assert!(policy.average_after_epoch(59) && policy.average_after_epoch(60));
    assert!(!policy.average_after_epoch(58));
}

#[test]
fn invalid_policies_are_rejected_and_configs_round_trip() {
    let schedule = Schedule::constant(0.05).unwrap();
    assert_eq!(
        SwaPolicy::new(schedule.clone(), 10, Period::Epochs(0)),
        Err(ScheduleError::ZeroLength {
            field: "policy.every"
        })
    );
    assert!(SwaPolicy::original(0.05, -0.01, 161, 1).is_err());
    let policy = SwaPolicy::cyclic(schedule, 10, 0.05, 0.0005, Period::Epochs(2)).unwrap();
    let json = serde_json::to_string(&policy).unwrap();
    let back: SwaPolicy = serde_json::from_str(&json).unwrap();
    assert_eq!(back, policy);
}

#[test]
fn a_loop_driven_by_the_policy_averages_exactly_the_selected_snapshots() {
    // The "model" holds its global iteration index, so the average must be the mean of the indices of the
    // averaged iterations: for SWA from epoch 2 every 4 iterations with 6 steps per epoch, over 5 epochs,
    // the completed-iteration counts 12, 16, 20, 24, 28 (model values 11, 15, 19, 23, 27), mean 19.
    let b = backend();
    let policy =
        SwaPolicy::new(Schedule::constant(0.01).unwrap(), 2, Period::Iterations(4)).unwrap();
    let mut average: Option<WeightAverage<swa_core::CpuBackend>> = None;
    for epoch in 0..5 {
        for step in 0..6 {
            let index = (epoch * 6 + step) as f32;
            if policy.average_after_step(epoch, step, 6) {
                let model = ToyNet::from_flat(&[index; NUMEL]);
                match average.as_mut() {
                    Some(avg) => avg.update(b, &model).unwrap(),
                    None => {
                        average =
                            Some(WeightAverage::swa(b, &model, BufferPolicy::Average).unwrap())
                    }
                }
            }
        }
        assert!(!policy.average_after_epoch(epoch));
    }
    let average = average.unwrap();
    assert_eq!(average.count(), 5);
    assert_eq!(average.count(), policy.snapshots_by_end(5, 6));
    let mut out = ToyNet::from_flat(&[0.0; NUMEL]);
    average.copy_into(b, &mut out).unwrap();
    assert!(
        out.to_flat().iter().all(|&v| v == 19.0),
        "{:?}",
        out.to_flat()
    );
}

proptest! {
    /// The counted snapshots equal the answers of the two questions over a run, and exactly one kind of
    /// question is ever answered `true`.
    #[test]
    fn snapshot_count_matches_the_questions(
        swa_start in 0usize..12,
        c in 1usize..9,
        by_epochs in any::<bool>(),
        epochs in 0usize..20,
        steps_per_epoch in 1usize..8,
    ) {
        let every = if by_epochs { Period::Epochs(c) } else { Period::Iterations(c) };
        let policy = SwaPolicy::new(Schedule::constant(0.01).unwrap(), swa_start, every).unwrap();
        let points = averaging_points(&policy, epochs, steps_per_epoch);
        prop_assert_eq!(points.len() as u64, policy.snapshots_by_end(epochs, steps_per_epoch));
        prop_assert!(points.iter().all(|p| p.1.is_none() == by_epochs));
        // Consecutive snapshots are exactly one period apart, and none comes before the SWA phase's k = 0.
        let completed: Vec<usize> = points
            .iter()
            .map(|&(e, s)| match s {
                Some(s) => e * steps_per_epoch + s + 1,
                None => e + 1,
            })
            .collect();
        let unit = if by_epochs { swa_start } else { swa_start * steps_per_epoch };
        prop_assert!(completed.iter().all(|&k| k >= unit.max(1)));
        prop_assert!(completed.windows(2).all(|w| w[1] - w[0] == c));
        if let Some(&first) = completed.first() {
            prop_assert_eq!((first - unit) % c, 0);
            prop_assert!(first - unit < c || unit == 0);
        }
    }

    /// With the cyclical preset every snapshot inside the SWA phase runs at exactly α2, whatever the cycle.
    #[test]
    fn cyclic_policy_snapshots_are_at_alpha2(
        swa_start in 1usize..5,
        alpha1 in 1e-4f32..1.0,
        alpha2 in 1e-5f32..1.0,
        cycle in prop_oneof![(1usize..4).prop_map(Period::Epochs), (1usize..30).prop_map(Period::Iterations)],
        steps_per_epoch in 1usize..12,
    ) {
        let pretrain = Schedule::original_sgd(0.1, 10).unwrap();
        let policy = SwaPolicy::cyclic(pretrain, swa_start, alpha1, alpha2, cycle).unwrap();
        let epochs = swa_start + 8;
        let mut in_phase = 0;
        for epoch in swa_start..epochs {
            for step in 0..steps_per_epoch {
                let last_of_epoch = step + 1 == steps_per_epoch;
                if policy.average_after_step(epoch, step, steps_per_epoch)
                    || (last_of_epoch && policy.average_after_epoch(epoch))
                {
                    prop_assert_eq!(policy.lr(epoch, step, steps_per_epoch), alpha2);
                    in_phase += 1;
                }
            }
        }
        let total = policy.snapshots_by_end(epochs, steps_per_epoch);
        prop_assert_eq!(in_phase + 1, total, "all but the k = 0 snapshot lie in the SWA phase");
    }
}
