//! Property tests of the averages against exact arithmetic, on the CPU backend.
//!
//! # Tolerance of the SWA running mean
//!
//! With unit roundoff `u = 2⁻²⁴` and `M` the largest magnitude of an element over the snapshots, one update
//! `a' = fl(a + fl(fl(w)·fl(x − a)))` with `w = 1/(k+1)` commits a local error of at most
//! `u·M` (the final addition, `|a'| ≤ M`) plus `3u·w·|x − a| ≤ 6u·w·M` (the rounded weight, difference and
//! product). The exact update maps an error `e` in `a` to `(1 − w)·e`, so the local error of update `k`
//! (`k = 1 … n−1`) is damped by `∏_{j>k}(1 − 1/(j+1)) = (k+1)/n` by the end, and after `n` snapshots
//!
//! `|a_n − mean| ≤ Σ_k (k+1)/n · (u·M + 6u·M/(k+1)) ≤ u·M·((n+1)/2 + 6)`.
//!
//! The tests use `u·M·(n/2 + 8)`, which also covers second-order terms; the reference mean is computed in
//! `f64`, whose own error (`n·2⁻⁵³·M`) is negligible. The bound grows linearly in `n` (random rounding
//! errors typically grow like `√n`), and is still far below the error of a wrong weight: averaging with
//! `1/(n+2)` instead of `1/(n+1)` gives the first snapshot weight `2/(n+1)`, an error of order `M/n`.

mod toy_model;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swa_core::averaging::{
    AverageState, BufferPolicy, CustomRule, WeightAverage, WeightAveraging, WeightRule,
};
use toy_model::{backend, is_statistic, ToyNet, NUMEL};

const UNIT_ROUNDOFF: f64 = f32::EPSILON as f64 / 2.0;

/// The bound derived in the module doc for `n` snapshots of magnitude at most `max_abs`.
fn swa_tolerance(n: usize, max_abs: f64) -> f64 {
    UNIT_ROUNDOFF * max_abs * (n as f64 / 2.0 + 8.0)
}

/// Element-wise exact mean (in f64) and largest magnitude of the snapshots.
fn mean_and_scale(snapshots: &[Vec<f32>]) -> (Vec<f64>, Vec<f64>) {
    let mut sum = vec![0.0f64; NUMEL];
    let mut scale = vec![0.0f64; NUMEL];
    for s in snapshots {
        for (i, &v) in s.iter().enumerate() {
            sum[i] += f64::from(v);
            scale[i] = scale[i].max(f64::from(v).abs());
        }
    }
    let n = snapshots.len() as f64;
    (sum.into_iter().map(|s| s / n).collect(), scale)
}

fn swa_of(snapshots: &[Vec<f32>], policy: BufferPolicy) -> WeightAverage<swa_core::CpuBackend> {
    let b = backend();
    let mut avg = WeightAverage::swa(b, &ToyNet::from_flat(&snapshots[0]), policy).unwrap();
    for s in &snapshots[1..] {
        avg.update(b, &ToyNet::from_flat(s)).unwrap();
    }
    avg
}

fn averaged_values(avg: &dyn WeightAveraging<swa_core::CpuBackend>) -> Vec<f32> {
    let mut out = ToyNet::from_flat(&[0.0; NUMEL]);
    avg.copy_into(backend(), &mut out).unwrap();
    out.to_flat()
}

/// `n` snapshots drawn from `seed`: each element is `offset + spread·N(0, 1)`-like uniform noise, with the
/// offset and spread themselves drawn per element so that both cancellation (large offset, small spread)
/// and wide ranges occur.
fn seeded_snapshots(seed: u64, n: usize) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let centre: Vec<f32> = (0..NUMEL)
        .map(|_| rng.random_range(-1000.0..1000.0))
        .collect();
    let spread: Vec<f32> = (0..NUMEL)
        .map(|_| 10f32.powf(rng.random_range(-3.0..3.0)))
        .collect();
    (0..n)
        .map(|_| {
            (0..NUMEL)
                .map(|i| centre[i] + spread[i] * rng.random_range(-1.0f32..1.0))
                .collect()
        })
        .collect()
}

fn snapshot_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-1.0e3f32..1.0e3, NUMEL)
}

fn assert_within_mean(values: &[f32], mean: &[f64], scale: &[f64], tol: impl Fn(f64) -> f64) {
    for i in 0..NUMEL {
        let err = (f64::from(values[i]) - mean[i]).abs();
        assert!(
            err <= tol(scale[i]),
            "element {i}: average {} differs from the exact mean {} by {err:e} > {:e}",
            values[i],
            mean[i],
            tol(scale[i])
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Up to thousands of snapshots: the running mean stays within the derived bound of the exact mean.
    #[test]
    fn swa_mean_matches_exact_mean_for_many_snapshots(seed in any::<u64>(), n in 1usize..3000) {
        let snapshots = seeded_snapshots(seed, n);
        let avg = swa_of(&snapshots, BufferPolicy::Average);
        prop_assert_eq!(avg.count(), n as u64);
        let (mean, scale) = mean_and_scale(&snapshots);
        assert_within_mean(&averaged_values(&avg), &mean, &scale, |m| swa_tolerance(n, m));
    }

    /// Averaging the snapshots in another order changes each element by at most twice the bound (both
    /// orders are within the bound of the same exact mean).
    #[test]
    fn reordering_changes_the_mean_by_at_most_the_tolerance(seed in any::<u64>(), n in 2usize..300) {
        let snapshots = seeded_snapshots(seed, n);
        let mut shuffled = snapshots.clone();
        // A deterministic permutation from the seed: reverse, then rotate.
        shuffled.reverse();
        shuffled.rotate_left((seed % n as u64) as usize);
        let a = averaged_values(&swa_of(&snapshots, BufferPolicy::Average));
        let b = averaged_values(&swa_of(&shuffled, BufferPolicy::Average));
        let (_, scale) = mean_and_scale(&snapshots);
        for i in 0..NUMEL {
            let diff = (f64::from(a[i]) - f64::from(b[i])).abs();
            prop_assert!(diff <= 2.0 * swa_tolerance(n, scale[i]), "element {}: {} vs {}", i, a[i], b[i]);
        }
    }

    /// Merging the averages of two disjoint sets of snapshots equals averaging all of them: the count is
    /// the sum and the values are within the bound (plus one merge step's rounding, 8·u·M) of the exact mean.
    #[test]
    fn merged_averages_equal_the_average_of_all_snapshots(seed in any::<u64>(), n in 2usize..400, split in 0.0f64..1.0) {
        let snapshots = seeded_snapshots(seed, n);
        let m = ((n as f64 * split) as usize).clamp(1, n - 1);
        let mut first = swa_of(&snapshots[..m], BufferPolicy::Average);
        let second = swa_of(&snapshots[m..], BufferPolicy::Average);
        first.merge(backend(), &second).unwrap();
        prop_assert_eq!(first.count(), n as u64);
        let (mean, scale) = mean_and_scale(&snapshots);
        assert_within_mean(&averaged_values(&first), &mean, &scale, |s| {
            swa_tolerance(n, s) + 8.0 * UNIT_ROUNDOFF * s
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Few snapshots, arbitrary values: within the bound of the exact mean (where a wrong weight shows most).
    #[test]
    fn swa_mean_matches_exact_mean(snapshots in prop::collection::vec(snapshot_strategy(), 1..12)) {
        let avg = swa_of(&snapshots, BufferPolicy::Average);
        let (mean, scale) = mean_and_scale(&snapshots);
        assert_within_mean(&averaged_values(&avg), &mean, &scale, |m| swa_tolerance(snapshots.len(), m));
    }

    /// Averaging the same snapshot any number of times returns it bit for bit, with SWA and with EMA.
    #[test]
    fn identical_snapshots_average_to_themselves_exactly(
        snapshot in snapshot_strategy(),
        n in 1usize..50,
        decay in 0.0f32..=1.0,
    ) {
        let b = backend();
        let model = ToyNet::from_flat(&snapshot);
        let mut swa = WeightAverage::swa(b, &model, BufferPolicy::Average).unwrap();
        let mut ema = WeightAverage::ema(b, &model, decay, BufferPolicy::Average).unwrap();
        for _ in 1..n {
            swa.update(b, &model).unwrap();
            ema.update(b, &model).unwrap();
        }
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        prop_assert_eq!(bits(averaged_values(&swa)), bits(snapshot.clone()));
        prop_assert_eq!(bits(averaged_values(&ema)), bits(snapshot));
    }

    /// Every element of the average lies between the smallest and largest value it had in the snapshots.
    #[test]
    fn swa_mean_lies_within_elementwise_min_max(
        snapshots in prop::collection::vec(snapshot_strategy(), 1..40),
    ) {
        let values = averaged_values(&swa_of(&snapshots, BufferPolicy::Average));
        for i in 0..NUMEL {
            let lo = snapshots.iter().map(|s| s[i]).fold(f32::INFINITY, f32::min);
            let hi = snapshots.iter().map(|s| s[i]).fold(f32::NEG_INFINITY, f32::max);
            prop_assert!(lo <= values[i] && values[i] <= hi, "element {}: {} outside [{}, {}]", i, values[i], lo, hi);
        }
    }

    /// EMA with decay 0 keeps the latest snapshot and with decay 1 the first, bit for bit.
    #[test]
    fn ema_extreme_decays_keep_the_last_or_the_first_snapshot(
        snapshots in prop::collection::vec(snapshot_strategy(), 1..10),
    ) {
        let b = backend();
        let mut keep_last = WeightAverage::ema(b, &ToyNet::from_flat(&snapshots[0]), 0.0, BufferPolicy::Average).unwrap();
        let mut keep_first = WeightAverage::ema(b, &ToyNet::from_flat(&snapshots[0]), 1.0, BufferPolicy::Average).unwrap();
        for s in &snapshots[1..] {
            keep_last.update(b, &ToyNet::from_flat(s)).unwrap();
            keep_first.update(b, &ToyNet::from_flat(s)).unwrap();
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&averaged_values(&keep_last)), bits(snapshots.last().unwrap()));
        prop_assert_eq!(bits(&averaged_values(&keep_first)), bits(&snapshots[0]));
        prop_assert_eq!(keep_last.count(), snapshots.len() as u64);
    }

    /// EMA with any decay matches its closed form `d^(n−1)·x_1 + Σ_{k≥2} (1−d)·d^(n−k)·x_k` in f64. Each
    /// update commits at most about 7·u·M and damps earlier errors by `d`, so `8·u·M·n` bounds the error.
    #[test]
    fn ema_matches_its_closed_form(
        snapshots in prop::collection::vec(snapshot_strategy(), 1..30),
        decay in 0.0f32..=1.0,
    ) {
        let b = backend();
        let mut ema = WeightAverage::ema(b, &ToyNet::from_flat(&snapshots[0]), decay, BufferPolicy::Average).unwrap();
        for s in &snapshots[1..] {
            ema.update(b, &ToyNet::from_flat(s)).unwrap();
        }
        let d = f64::from(decay);
        let n = snapshots.len();
        let mut exact = vec![0.0f64; NUMEL];
        for (k, s) in snapshots.iter().enumerate() {
            let weight = if k == 0 { d.powi(n as i32 - 1) } else { (1.0 - d) * d.powi((n - 1 - k) as i32) };
            for i in 0..NUMEL {
                exact[i] += weight * f64::from(s[i]);
            }
        }
        let (_, scale) = mean_and_scale(&snapshots);
        assert_within_mean(&averaged_values(&ema), &exact, &scale, |m| 8.0 * UNIT_ROUNDOFF * m * n as f64);
    }

    /// A custom rule matches its closed form: snapshot `k` (1-based, weight `r_1 = 1` for the copied first
    /// one and `r_k = rule(k − 1)` after) ends with coefficient `r_k·∏_{j>k}(1 − r_j)`, computed in f64. As
    /// for EMA, each update commits at most about 7·u·M and damps earlier errors, so `8·u·M·n` bounds it.
    #[test]
    fn custom_rule_matches_its_closed_form(
        snapshots in prop::collection::vec(snapshot_strategy(), 1..30),
    ) {
        fn ramp(averaged: u64) -> f32 {
            2.0 / (averaged as f32 + 2.0)
        }
        let b = backend();
        let rule = WeightRule::Custom(CustomRule::new("ramp", ramp));
        let mut avg = WeightAverage::new(b, &ToyNet::from_flat(&snapshots[0]), rule, BufferPolicy::Average).unwrap();
        for s in &snapshots[1..] {
            avg.update(b, &ToyNet::from_flat(s)).unwrap();
        }
        let n = snapshots.len();
        let weights: Vec<f64> = (0..n).map(|k| if k == 0 { 1.0 } else { f64::from(ramp(k as u64)) }).collect();
        let mut exact = vec![0.0f64; NUMEL];
        for (k, s) in snapshots.iter().enumerate() {
            let coefficient = weights[k] * weights[k + 1..].iter().map(|w| 1.0 - w).product::<f64>();
            for i in 0..NUMEL {
                exact[i] += coefficient * f64::from(s[i]);
            }
        }
        let (_, scale) = mean_and_scale(&snapshots);
        prop_assert_eq!(avg.count(), n as u64);
        assert_within_mean(&averaged_values(&avg), &exact, &scale, |m| 8.0 * UNIT_ROUNDOFF * m * n as f64);
    }

    /// A custom rule giving SWA's weight `1/(n + 1)` reproduces the equal-weight average bit for bit: the
    /// rules differ only in where the weight comes from.
    #[test]
    fn custom_rule_with_equal_weights_is_the_swa_mean_bit_for_bit(
        snapshots in prop::collection::vec(snapshot_strategy(), 1..30),
    ) {
        let b = backend();
        let rule = WeightRule::Custom(CustomRule::new("equal", |n| (1.0 / (n as f64 + 1.0)) as f32));
        let mut custom = WeightAverage::new(b, &ToyNet::from_flat(&snapshots[0]), rule, BufferPolicy::Average).unwrap();
        for s in &snapshots[1..] {
            custom.update(b, &ToyNet::from_flat(s)).unwrap();
        }
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        prop_assert_eq!(
            bits(averaged_values(&custom)),
            bits(averaged_values(&swa_of(&snapshots, BufferPolicy::Average)))
        );
    }

    /// A checkpoint through JSON restores the count and every value bit for bit, and averaging continues
    /// identically from the original and from the restored average.
    #[test]
    fn serde_round_trip_preserves_count_values_and_continuation(
        snapshots in prop::collection::vec(snapshot_strategy(), 2..10),
        policy in prop_oneof![Just(BufferPolicy::Average), Just(BufferPolicy::CopyLatest), Just(BufferPolicy::RecomputeLater)],
        ema in any::<bool>(),
    ) {
        let b = backend();
        let (first, rest) = snapshots.split_at(snapshots.len() - 1);
        let rule = if ema { WeightRule::Ema { decay: 0.75 } } else { WeightRule::Equal };
        let mut original = WeightAverage::new(b, &ToyNet::from_flat(&first[0]), rule, policy).unwrap();
        for s in &first[1..] {
            original.update(b, &ToyNet::from_flat(s)).unwrap();
        }
        let state = original.to_state(b).unwrap();
        let json = serde_json::to_string(&state).unwrap();
        let read: AverageState = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&read, &state);
        let mut restored = WeightAverage::from_state(b, &read).unwrap();
        prop_assert_eq!(restored.count(), original.count());
        prop_assert_eq!(restored.rule(), original.rule());
        prop_assert_eq!(restored.buffer_policy(), policy);
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        prop_assert_eq!(bits(averaged_values(&restored)), bits(averaged_values(&original)));
        let next = ToyNet::from_flat(&rest[0]);
        original.update(b, &next).unwrap();
        restored.update(b, &next).unwrap();
        prop_assert_eq!(bits(averaged_values(&restored)), bits(averaged_values(&original)));
    }

    /// The buffer policies: BN statistics averaged, copied from the latest snapshot, or left to the caller,
    /// while parameters are averaged under all three.
    #[test]
    fn buffer_policies_treat_statistics_as_documented(
        snapshots in prop::collection::vec(snapshot_strategy(), 1..8),
        untouched in -5.0f32..5.0,
    ) {
        let averaged = averaged_values(&swa_of(&snapshots, BufferPolicy::Average));
        let latest = averaged_values(&swa_of(&snapshots, BufferPolicy::CopyLatest));
        let recompute = swa_of(&snapshots, BufferPolicy::RecomputeLater);
        let mut model = ToyNet::from_flat(&[untouched; NUMEL]);
        recompute.copy_into(backend(), &mut model).unwrap();
        let recomputed = model.to_flat();
        prop_assert!(recompute.tensor("bn.running_mean").is_none());
        let last = snapshots.last().unwrap();
        for i in 0..NUMEL {
            if is_statistic(i) {
                prop_assert_eq!(latest[i].to_bits(), last[i].to_bits());
                prop_assert_eq!(recomputed[i].to_bits(), untouched.to_bits());
            } else {
                prop_assert_eq!(latest[i].to_bits(), averaged[i].to_bits());
                prop_assert_eq!(recomputed[i].to_bits(), averaged[i].to_bits());
            }
        }
    }
}
