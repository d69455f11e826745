//! Property tests of SWAG's moments, ring of deviations, merge, checkpoints and samples against exact
//! arithmetic in `f64`, on the CPU backend.
//!
//! # Tolerances
//!
//! With unit roundoff `u = 2⁻²⁴` and `M` the largest magnitude of an element over the snapshots, the running
//! mean after `n` snapshots is within `u·M·(n/2 + 8)` of the exact mean (the bound derived in
//! `averaging_props.rs`, the same `lerp_` update). The second moment is the same running mean of the
//! squares, whose magnitudes are at most `M²` and which are rounded once each (one more `u·M²`), so it is
//! within `u·M²·(n/2 + 9)`. The variance `θ²‾ − θ̄²` adds the error of `θ̄²` (`2M` times the mean's error,
//! plus `u·M²`) and one rounding of the difference (`u·M²`): within `u·M²·(3n/2 + 35)` in all, the bound
//! the tests use. A deviation column `θ_i − θ̄_i` carries the mean's error plus one rounding of a value of
//! magnitude at most `2M`: within `u·M·(n/2 + 10)`.
//!
//! These bounds grow like `n·u`, far below the error of a wrong formula: a weight `1/(n+2)` instead of
//! `1/(n+1)`, the sample variance `1/(n−1)` instead of the population variance `1/n`, or deviations taken
//! from the mean before the snapshot was included, all move the result by a fraction of order `1/n` of
//! the values themselves.

mod toy_model;

use proptest::prelude::*;
use swa_core::swag::{Covariance, SwagError, SwagMoments, SwagState, DEFAULT_MAX_RANK};
use swa_core::{Backend, CpuBackend, CpuTensor, LayoutError, NamedTensors, RoleFilter, TensorRole};
use toy_model::{backend, is_statistic, Loose, ToyNet, NUMEL};

const UNIT_ROUNDOFF: f64 = f32::EPSILON as f64 / 2.0;

/// The number of parameter elements of [`ToyNet`]: everything but its two BN statistics of 2 values.
const PARAMS: usize = NUMEL - 4;

fn mean_tolerance(n: usize, max_abs: f64) -> f64 {
    UNIT_ROUNDOFF * max_abs * (n as f64 / 2.0 + 8.0)
}

fn variance_tolerance(n: usize, max_abs: f64) -> f64 {
    UNIT_ROUNDOFF * max_abs * max_abs * (1.5 * n as f64 + 35.0)
}

fn deviation_tolerance(n: usize, max_abs: f64) -> f64 {
    UNIT_ROUNDOFF * max_abs * (n as f64 / 2.0 + 10.0)
}

/// The parameter elements of a flat snapshot, in visiting order (BN statistics left out).
fn params_of(flat: &[f32]) -> Vec<f32> {
    flat.iter()
        .enumerate()
        .filter(|(i, _)| !is_statistic(*i))
        .map(|(_, &v)| v)
        .collect()
}

fn swag_of(snapshots: &[Vec<f32>], max_rank: usize) -> SwagMoments<CpuBackend> {
    let b = backend();
    let mut swag = SwagMoments::new(b, &ToyNet::from_flat(&snapshots[0]), max_rank).unwrap();
    for s in &snapshots[1..] {
        swag.update(b, &ToyNet::from_flat(s)).unwrap();
    }
    swag
}

fn host(t: &CpuTensor) -> Vec<f32> {
    backend().to_host(t).unwrap()
}

fn mean_flat(swag: &SwagMoments<CpuBackend>) -> Vec<f32> {
    swag.names()
        .iter()
        .flat_map(|n| host(swag.mean(n).unwrap()))
        .collect()
}

fn variance_flat(swag: &SwagMoments<CpuBackend>) -> Vec<f32> {
    swag.names()
        .iter()
        .flat_map(|n| host(&swag.diagonal_variance(backend(), n).unwrap()))
        .collect()
}

/// The deviation columns, oldest first, each concatenated over the tensors.
fn deviations_flat(swag: &SwagMoments<CpuBackend>) -> Vec<Vec<f32>> {
    let mut columns = vec![Vec::new(); swag.rank()];
    for name in swag.names() {
        let held = swag.deviations(name).unwrap();
        assert_eq!(held.len(), swag.rank(), "every tensor holds rank columns");
        for (column, t) in columns.iter_mut().zip(held) {
            column.extend(host(t));
        }
    }
    columns
}

/// Exact element-wise mean, population variance (1/n) and largest magnitude of parameter vectors.
fn exact_moments(params: &[Vec<f32>]) -> (Vec<f64>, Vec<f64>, f64) {
    let n = params.len() as f64;
    let d = params[0].len();
    let mut mean = vec![0.0f64; d];
    let mut max_abs = 0.0f64;
    for p in params {
        for (m, &v) in mean.iter_mut().zip(p) {
            *m += f64::from(v) / n;
            max_abs = max_abs.max(f64::from(v).abs());
        }
    }
    let mut variance = vec![0.0f64; d];
    for p in params {
        for ((s, &m), &v) in variance.iter_mut().zip(&mean).zip(p) {
            *s += (f64::from(v) - m).powi(2) / n;
        }
    }
    (mean, variance, max_abs)
}

/// The deviations `θ_i − mean(θ_1 … θ_i)` of the last `min(n, k)` snapshots, oldest first, in `f64`.
fn exact_last_deviations(params: &[Vec<f32>], k: usize) -> Vec<Vec<f64>> {
    let n = params.len();
    (n.saturating_sub(k)..n)
        .map(|i| {
            let (running, _, _) = exact_moments(&params[..=i]);
            params[i]
                .iter()
                .zip(&running)
                .map(|(&v, &m)| f64::from(v) - m)
                .collect()
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], tolerance: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(g) - w).abs() <= tolerance,
            "{what}[{i}]: got {g}, want {w} (tolerance {tolerance:e})"
        );
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn state_bits(state: &SwagState) -> Vec<Vec<u32>> {
    state
        .tensors
        .iter()
        .flat_map(|t| {
            [bits(&t.mean), bits(&t.sq_mean)]
                .into_iter()
                .chain(t.columns.iter().map(|c| bits(c)))
        })
        .collect()
}

/// A model to sample into whose BN statistics hold a sentinel, to see that sampling leaves them alone.
fn canvas() -> ToyNet {
    let flat: Vec<f32> = (0..NUMEL)
        .map(|i| {
            if is_statistic(i) {
                42.0 + i as f32
            } else {
                -7.0
            }
        })
        .collect();
    ToyNet::from_flat(&flat)
}

/// Samples into a fresh canvas and returns its parameter elements, checking the BN statistics survived.
fn sample(
    swag: &SwagMoments<CpuBackend>,
    scale: f32,
    covariance: Covariance,
    seed: u64,
) -> Vec<f32> {
    let mut model = canvas();
    swag.sample_into(backend(), &mut model, scale, covariance, seed)
        .unwrap();
    let flat = model.to_flat();
    for (i, &v) in flat.iter().enumerate() {
        if is_statistic(i) {
            assert_eq!(
                v,
                42.0 + i as f32,
                "sampling wrote BN statistic element {i}"
            );
        }
    }
    params_of(&flat)
}

fn snapshots(max_len: usize) -> impl Strategy<Value = Vec<Vec<f32>>> {
    prop::collection::vec(prop::collection::vec(-4.0f32..4.0, NUMEL), 1..=max_len)
}

proptest! {
    #[test]
    fn mean_is_the_arithmetic_mean_and_variance_the_population_variance(
        snaps in snapshots(12),
        offset in -50.0f32..50.0,
    ) {
        // An offset moves the mean away from 0, where θ²‾ − θ̄² cancels.
        let snaps: Vec<Vec<f32>> =
            snaps.iter().map(|s| s.iter().map(|v| v + offset).collect()).collect();
        let swag = swag_of(&snaps, 5);
        let params: Vec<Vec<f32>> = snaps.iter().map(|s| params_of(s)).collect();
        let (mean, variance, max_abs) = exact_moments(&params);
        let n = snaps.len();
        prop_assert_eq!(swag.count(), n as u64);
        prop_assert_eq!(swag.parameter_count(), PARAMS);
        prop_assert!(!swag.names().iter().any(|n| n.contains("running")), "BN statistics are not held");
        assert_close(&mean_flat(&swag), &mean, mean_tolerance(n, max_abs), "mean");
        let clamped: Vec<f64> = variance.iter().map(|&v| v.max(1e-30)).collect();
        assert_close(&variance_flat(&swag), &clamped, variance_tolerance(n, max_abs), "variance");
        for v in variance_flat(&swag) {
            prop_assert!(v >= 1e-30, "the variance is clamped at var_clamp");
        }
    }

    #[test]
    fn merging_two_halves_gives_the_moments_of_the_whole(
        snaps in snapshots(14).prop_filter("two halves", |s| s.len() >= 2),
        split in 0.0f64..1.0,
        max_rank in 1usize..6,
    ) {
        let n = snaps.len();
        let at = 1 + ((n - 1) as f64 * split) as usize; // 1 ..= n − 1
        let mut first = swag_of(&snaps[..at], max_rank);
        let second = swag_of(&snaps[at..], max_rank);
        let mut columns = deviations_flat(&first);
        columns.extend(deviations_flat(&second));
        first.merge(backend(), &second).unwrap();

        let params: Vec<Vec<f32>> = snaps.iter().map(|s| params_of(s)).collect();
        let (mean, variance, max_abs) = exact_moments(&params);
        prop_assert_eq!(first.count(), n as u64);
        prop_assert_eq!(first.rank(), n.min(max_rank));
        // The merge adds one lerp to each half's running mean: a few more roundings of the same size.
        assert_close(&mean_flat(&first), &mean, mean_tolerance(n + 16, max_abs), "merged mean");
        let clamped: Vec<f64> = variance.iter().map(|&v| v.max(1e-30)).collect();
        let tolerance = variance_tolerance(n + 16, max_abs);
        assert_close(&variance_flat(&first), &clamped, tolerance, "merged variance");
        // The most recent K columns of the first half's followed by the second half's, bit for bit.
        let kept = columns.len() - first.rank();
        let want: Vec<Vec<u32>> = columns[kept..].iter().map(|c| bits(c)).collect();
        let got: Vec<Vec<u32>> = deviations_flat(&first).iter().map(|c| bits(c)).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn the_ring_keeps_exactly_the_last_k_deviations(
        snaps in snapshots(15),
        max_rank in 1usize..7,
    ) {
        let swag = swag_of(&snaps, max_rank);
        check_ring(&swag, &snaps, max_rank);
    }

    #[test]
    fn scale_zero_samples_the_mean_exactly(snaps in snapshots(6), seed: u64) {
        let swag = swag_of(&snaps, 4);
        let mean = mean_flat(&swag);
        prop_assert_eq!(bits(&sample(&swag, 0.0, Covariance::Diagonal, seed)), bits(&mean));
        if swag.rank() >= 2 {
            let low_rank = sample(&swag, 0.0, Covariance::LowRankPlusDiagonal, seed);
            prop_assert_eq!(bits(&low_rank), bits(&mean));
        }
    }

    #[test]
    fn a_seed_gives_one_sample_and_other_seeds_others(
        snaps in snapshots(6).prop_filter("rank 2", |s| s.len() >= 2),
        seed: u64,
        scale in 0.01f32..4.0,
    ) {
        let swag = swag_of(&snaps, 4);
        for covariance in [Covariance::Diagonal, Covariance::LowRankPlusDiagonal] {
            let a = sample(&swag, scale, covariance, seed);
            let b = sample(&swag, scale, covariance, seed);
            prop_assert_eq!(bits(&a), bits(&b));
            let c = sample(&swag, scale, covariance, seed.wrapping_add(1));
            prop_assert_ne!(bits(&a), bits(&c));
            // sample_into is sample_with_noise with the noise draw_noise returns.
            let (z1, z2) = swag.draw_noise(covariance, seed);
            let mut model = canvas();
            swag.sample_with_noise(backend(), &mut model, scale, covariance, &z1, &z2).unwrap();
            prop_assert_eq!(bits(&params_of(&model.to_flat())), bits(&a));
        }
        // A diagonal and a low-rank draw of one seed share z₁.
        prop_assert_eq!(
            swag.draw_noise(Covariance::Diagonal, seed).0,
            swag.draw_noise(Covariance::LowRankPlusDiagonal, seed).0
        );
    }

    #[test]
    fn a_checkpoint_resumes_bit_identically(
        snaps in snapshots(12).prop_filter("a snapshot after the save", |s| s.len() >= 2),
        split in 0.0f64..1.0,
        max_rank in 1usize..5,
        seed: u64,
    ) {
        let b = backend();
        let n = snaps.len();
        let at = 1 + ((n - 1) as f64 * split) as usize; // saved after 1 ..= n − 1 snapshots
        let straight = swag_of(&snaps, max_rank);

        let saved = swag_of(&snaps[..at], max_rank).to_state(b).unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let reread: SwagState = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(state_bits(&reread), state_bits(&saved));
        let mut resumed = SwagMoments::from_state(b, &reread).unwrap();
        for s in &snaps[at..] {
            resumed.update(b, &ToyNet::from_flat(s)).unwrap();
        }

        let (want, got) = (straight.to_state(b).unwrap(), resumed.to_state(b).unwrap());
        prop_assert_eq!(
            (got.n_models, got.max_rank, got.next_column),
            (want.n_models, want.max_rank, want.next_column)
        );
        prop_assert_eq!(state_bits(&got), state_bits(&want));
        let covariance = if straight.rank() >= 2 {
            Covariance::LowRankPlusDiagonal
        } else {
            Covariance::Diagonal
        };
        prop_assert_eq!(
            bits(&sample(&resumed, 1.0, covariance, seed)),
            bits(&sample(&straight, 1.0, covariance, seed))
        );
    }
}

fn check_ring(swag: &SwagMoments<CpuBackend>, snaps: &[Vec<f32>], max_rank: usize) {
    let n = snaps.len();
    assert_eq!(swag.rank(), n.min(max_rank), "rank = min(n, K)");
    assert_eq!(swag.max_rank(), max_rank);
    let params: Vec<Vec<f32>> = snaps.iter().map(|s| params_of(s)).collect();
    let (_, _, max_abs) = exact_moments(&params);
    let want = exact_last_deviations(&params, max_rank);
    let got = deviations_flat(swag);
    assert_eq!(got.len(), want.len());
    for (j, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(
            g,
            w,
            deviation_tolerance(n, max_abs),
            &format!("deviation column {j} (n = {n}, K = {max_rank})"),
        );
    }
    if n <= max_rank {
        // The first snapshot's deviation from itself is exactly zero.
        assert!(got[0].iter().all(|&v| v == 0.0));
    }
}

/// Snapshot `i` of a deterministic sequence with distinct values everywhere.
fn snapshot(i: usize) -> Vec<f32> {
    (0..NUMEL)
        .map(|j| ((i * 37 + j * 11) % 23) as f32 * 0.25 - 2.5 + (i as f32).sqrt())
        .collect()
}

#[test]
fn the_ring_holds_the_last_k_for_fewer_as_many_and_more_snapshots_than_k() {
    let k = 4;
    for n in [1, k - 1, k, k + 1, 2 * k, 3 * k + 2] {
        let snaps: Vec<Vec<f32>> = (0..n).map(snapshot).collect();
        check_ring(&swag_of(&snaps, k), &snaps, k);
    }
}

/// Per-element mean and variance of samples, and the covariance of element pairs.
fn empirical(samples: &[Vec<f32>]) -> (Vec<f64>, Vec<f64>) {
    let (mean, variance, _) = exact_moments(samples);
    (mean, variance)
}

fn empirical_covariance(samples: &[Vec<f32>], mean: &[f64], a: usize, b: usize) -> f64 {
    samples
        .iter()
        .map(|s| (f64::from(s[a]) - mean[a]) * (f64::from(s[b]) - mean[b]))
        .sum::<f64>()
        / samples.len() as f64
}

const DRAWS: usize = 3000;

#[test]
fn diagonal_samples_have_variance_scale_times_the_diagonal_variance() {
    let snaps: Vec<Vec<f32>> = (0..7).map(snapshot).collect();
    let swag = swag_of(&snaps, 5);
    let scale = 2.5;
    let samples: Vec<Vec<f32>> = (0..DRAWS as u64)
        .map(|seed| sample(&swag, scale, Covariance::Diagonal, seed))
        .collect();
    let (mean, variance) = empirical(&samples);
    let theta_bar = mean_flat(&swag);
    let sigma2 = variance_flat(&swag);
    let n = DRAWS as f64;
    for i in 0..PARAMS {
        let want = f64::from(scale) * f64::from(sigma2[i]);
        // The sample variance of n normal draws has relative standard deviation √(2/n) (2.6 %); 6 of them
        // stay far from the factors a wrong formula gives (scale² vs scale, 1/2, …).
        assert!(
            (variance[i] / want - 1.0).abs() < 6.0 * (2.0 / n).sqrt(),
            "element {i}: empirical variance {} against scale·σ² = {want}",
            variance[i]
        );
        assert!(
            (mean[i] - f64::from(theta_bar[i])).abs() < 6.0 * (want / n).sqrt(),
            "element {i}: empirical mean {} against θ̄ = {}",
            mean[i],
            theta_bar[i]
        );
    }
    // Independent elements: no covariance beyond sampling noise.
    for (a, b) in [(0, 1), (3, 20), (17, 34)] {
        let c = empirical_covariance(&samples, &mean, a, b);
        let sd =
            (f64::from(scale).powi(2) * f64::from(sigma2[a]) * f64::from(sigma2[b]) / n).sqrt();
        assert!(c.abs() < 6.0 * sd, "elements {a}, {b}: covariance {c}");
    }
}

#[test]
fn low_rank_samples_have_covariance_half_diagonal_plus_low_rank() {
    let snaps: Vec<Vec<f32>> = (0..9).map(snapshot).collect();
    let swag = swag_of(&snaps, 5);
    let scale = 0.8;
    let samples: Vec<Vec<f32>> = (0..DRAWS as u64)
        .map(|seed| sample(&swag, scale, Covariance::LowRankPlusDiagonal, seed))
        .collect();
    let (mean, _) = empirical(&samples);
    let sigma2 = variance_flat(&swag);
    let columns = deviations_flat(&swag);
    let k = columns.len() as f64;
    // scale · ½(Σ_diag + D̂D̂ᵀ/(K − 1)), entry (a, b).
    let model = |a: usize, b: usize| {
        let low_rank: f64 = columns
            .iter()
            .map(|c| f64::from(c[a]) * f64::from(c[b]))
            .sum::<f64>()
            / (k - 1.0);
        let diagonal = if a == b { f64::from(sigma2[a]) } else { 0.0 };
        f64::from(scale) * 0.5 * (diagonal + low_rank)
    };
    let n = DRAWS as f64;
    for a in 0..PARAMS {
        for b in [a, (a + 5) % PARAMS, (a + 13) % PARAMS] {
            let want = model(a, b);
            let got = empirical_covariance(&samples, &mean, a, b);
            // The sample covariance of n draws has standard deviation √((Σ_aa·Σ_bb + Σ_ab²)/n).
            let sd = ((model(a, a) * model(b, b) + want * want) / n).sqrt();
            assert!(
                (got - want).abs() < 6.0 * sd,
                "entry ({a}, {b}): empirical {got} against {want} (sd {sd})"
            );
        }
    }
}

// ---------------------------------------------------------------- the golden case

/// Three parameters in two tensors, and a BN statistic that SWAG ignores.
struct Tiny {
    a: CpuTensor,
    stat: CpuTensor,
    b: CpuTensor,
}

impl Tiny {
    fn new(values: [f32; 3]) -> Tiny {
        let be = backend();
        Tiny {
            a: be.from_host(&values[..2], &[2]).unwrap(),
            stat: be.from_host(&[values[0] * 100.0], &[1]).unwrap(),
            b: be.from_host(&values[2..], &[1]).unwrap(),
        }
    }

    fn params(&self) -> Vec<f32> {
        [host(&self.a), host(&self.b)].concat()
    }
}

impl NamedTensors<CpuBackend> for Tiny {
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, TensorRole, &CpuTensor)) {
        f("a", TensorRole::Parameter, &self.a);
        f("bn.running_var", TensorRole::BatchNormStatistic, &self.stat);
        f("b", TensorRole::Parameter, &self.b);
    }
    fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&str, TensorRole, &mut CpuTensor)) {
        f("a", TensorRole::Parameter, &mut self.a);
        f(
            "bn.running_var",
            TensorRole::BatchNormStatistic,
            &mut self.stat,
        );
        f("b", TensorRole::Parameter, &mut self.b);
    }
}

const GOLDEN_SNAPSHOTS: [[f32; 3]; 4] = [
    [0.5, -1.25, 2.0],
    [1.0, -0.75, 2.5],
    [0.25, -1.0, 1.5],
    [1.5, -0.5, 3.25],
];

/// The SWAG sample of the module documentation, computed from the snapshots in `f64`: the moments
/// directly, the deviations against the running means after each snapshot, the last `k` of them.
fn golden_sample(
    snaps: &[[f32; 3]],
    k: usize,
    scale: f64,
    covariance: Covariance,
    z1: &[f64; 3],
    z2: &[f64],
) -> [f64; 3] {
    let n = snaps.len();
    let mean_of = |upto: usize, e: usize| {
        snaps[..upto].iter().map(|s| f64::from(s[e])).sum::<f64>() / upto as f64
    };
    let mut theta = [0.0f64; 3];
    for e in 0..3 {
        let mean = mean_of(n, e);
        let sq_mean = snaps.iter().map(|s| f64::from(s[e]).powi(2)).sum::<f64>() / n as f64;
        let sigma = (sq_mean - mean * mean).max(1e-30).sqrt();
        theta[e] = match covariance {
            Covariance::Diagonal => mean + scale.sqrt() * sigma * z1[e],
            Covariance::LowRankPlusDiagonal => {
                let first = n.saturating_sub(k);
                let rank = n - first;
                let low_rank: f64 = (first..n)
                    .zip(z2)
                    .map(|(i, z)| (f64::from(snaps[i][e]) - mean_of(i + 1, e)) * z)
                    .sum();
                mean + scale.sqrt()
                    * (sigma * z1[e] / 2f64.sqrt() + low_rank / (2.0 * (rank as f64 - 1.0)).sqrt())
            }
        };
    }
    theta
}

fn tiny_swag(snaps: &[[f32; 3]], k: usize) -> SwagMoments<CpuBackend> {
    let be = backend();
    let mut swag = SwagMoments::new(be, &Tiny::new(snaps[0]), k).unwrap();
    for s in &snaps[1..] {
        swag.update(be, &Tiny::new(*s)).unwrap();
    }
    swag
}

#[test]
fn a_sample_matches_the_formula_computed_in_f64() {
    let z1 = [0.3f32, -1.7, 0.9];
    let z2 = [1.1f32, -0.4, 2.2];
    let z1_64 = z1.map(f64::from);
    let z2_64 = z2.map(f64::from);
    // 4 snapshots with K = 3 (the ring has wrapped), and 3 snapshots with K = 4 (fewer columns than K:
    // the divisor is the columns held, 2, not K − 1 = 3).
    for (snaps, k) in [(&GOLDEN_SNAPSHOTS[..], 3), (&GOLDEN_SNAPSHOTS[..3], 4)] {
        let swag = tiny_swag(snaps, k);
        assert_eq!(swag.names(), ["a", "b"]);
        let rank = swag.rank();
        for (covariance, z2) in [
            (Covariance::LowRankPlusDiagonal, &z2[..rank]),
            (Covariance::Diagonal, &[][..]),
        ] {
            for scale in [0.49f32, 1.0, 3.0] {
                let mut model = Tiny::new([9.0; 3]);
                swag.sample_with_noise(backend(), &mut model, scale, covariance, &z1, z2)
                    .unwrap();
                let want = golden_sample(
                    snaps,
                    k,
                    f64::from(scale),
                    covariance,
                    &z1_64,
                    &z2_64[..z2.len()],
                );
                // f32 moments and a few f32 operations on values of magnitude ≤ 8: far below the
                // differences a wrong factor would make (√2, √scale against scale, K − 1 against rank − 1).
                assert_close(
                    &model.params(),
                    &want,
                    2e-6 * 8.0,
                    &format!(
                        "{covariance:?}, scale {scale}, {} snapshots, K = {k}",
                        snaps.len()
                    ),
                );
                assert_eq!(
                    host(&model.stat),
                    vec![900.0],
                    "the BN statistic is untouched"
                );
            }
        }
    }
}

#[test]
fn the_golden_moments_and_deviations() {
    let swag = tiny_swag(&GOLDEN_SNAPSHOTS, 3);
    let mean = [host(swag.mean("a").unwrap()), host(swag.mean("b").unwrap())].concat();
    assert_close(&mean, &[0.8125, -0.875, 2.3125], 1e-6, "mean");
    assert_eq!((swag.count(), swag.rank(), swag.max_rank()), (4, 3, 3));
    // The oldest column held is θ_2 − θ̄_2 with θ̄_2 = (θ_1 + θ_2)/2, exact in f32 for these values; a
    // deviation from the mean before θ_2 was included would be θ_2 − θ_1 = (0.5, 0.5).
    let oldest = host(swag.deviations("a").unwrap()[0]);
    assert_eq!(oldest, vec![0.25, 0.25]);
    assert!(swag.mean("bn.running_var").is_none());
    let err = swag
        .diagonal_variance(backend(), "bn.running_var")
        .unwrap_err();
    assert!(matches!(err, SwagError::UnknownTensor { .. }), "{err}");
}

// ---------------------------------------------------------------- errors

fn toy(value: f32) -> ToyNet {
    ToyNet::from_flat(&[value; NUMEL])
}

#[test]
fn a_maximum_rank_of_zero_is_refused() {
    let err = SwagMoments::new(backend(), &toy(1.0), 0).unwrap_err();
    assert_eq!(err, SwagError::ZeroMaxRank);
}

#[test]
fn a_model_without_parameters_is_refused() {
    let only_stats = Loose {
        entries: vec![(
            "bn.running_mean".to_owned(),
            TensorRole::BatchNormStatistic,
            backend().from_host(&[1.0], &[1]).unwrap(),
        )],
    };
    let err = SwagMoments::new(backend(), &only_stats, 3).unwrap_err();
    assert!(matches!(err, SwagError::NoParameters { .. }), "{err}");
}

#[test]
fn low_rank_sampling_needs_two_columns() {
    let mut swag = SwagMoments::new(backend(), &toy(1.0), DEFAULT_MAX_RANK).unwrap();
    let mut model = canvas();
    let err = swag
        .sample_into(
            backend(),
            &mut model,
            1.0,
            Covariance::LowRankPlusDiagonal,
            0,
        )
        .unwrap_err();
    assert_eq!(err, SwagError::RankTooLow { rank: 1 });
    // A diagonal sample of one snapshot is its mean plus noise of the clamped variance.
    swag.sample_into(backend(), &mut model, 1.0, Covariance::Diagonal, 0)
        .unwrap();
    swag.update(backend(), &toy(2.0)).unwrap();
    swag.sample_into(
        backend(),
        &mut model,
        1.0,
        Covariance::LowRankPlusDiagonal,
        0,
    )
    .unwrap();

    // K = 1 never holds two columns.
    let mut one = SwagMoments::new(backend(), &toy(1.0), 1).unwrap();
    one.update(backend(), &toy(3.0)).unwrap();
    assert_eq!(one.rank(), 1);
    let err = one
        .sample_into(
            backend(),
            &mut model,
            1.0,
            Covariance::LowRankPlusDiagonal,
            0,
        )
        .unwrap_err();
    assert_eq!(err, SwagError::RankTooLow { rank: 1 });
}

#[test]
fn a_scale_that_is_negative_or_not_finite_is_refused() {
    let swag = swag_of(&[snapshot(0), snapshot(1)], 3);
    for scale in [-0.5, f32::NAN, f32::INFINITY] {
        let mut model = canvas();
        let before = model.to_flat();
        let err = swag
            .sample_into(backend(), &mut model, scale, Covariance::Diagonal, 1)
            .unwrap_err();
        assert!(matches!(err, SwagError::InvalidScale { .. }), "{err}");
        assert_eq!(
            bits(&model.to_flat()),
            bits(&before),
            "the model is unchanged"
        );
    }
}

#[test]
fn models_of_another_layout_are_refused_and_left_unchanged() {
    let b = backend();
    let mut swag = swag_of(&[snapshot(0), snapshot(1)], 3);
    let before = swag.to_state(b).unwrap();

    let mut renamed = Loose::like_toy(1.0);
    renamed.entries[0].0 = "conv.kernel".to_owned();
    let err = swag.update(b, &renamed).unwrap_err();
    assert!(
        matches!(&err, SwagError::Layout { op: "update", source: LayoutError::NameMismatch { index: 0, expected, got, .. } }
            if expected == "conv.weight" && got == "conv.kernel"),
        "{err}"
    );

    let mut reshaped = Loose::like_toy(1.0);
    reshaped.entries[7].2 = b.from_host(&[1.0; 4], &[4]).unwrap();
    let err = swag.update(b, &reshaped).unwrap_err();
    assert!(
        matches!(&err, SwagError::Layout { op: "update", source: LayoutError::ShapeMismatch { name, expected, got } }
            if name == "fc.bias" && expected == &[3] && got == &[4]),
        "{err}"
    );

    let mut shorter = Loose::like_toy(1.0);
    shorter.entries.pop();
    let err = swag.update(b, &shorter).unwrap_err();
    assert!(
        matches!(
            err,
            SwagError::Layout {
                op: "update",
                source: LayoutError::CountMismatch {
                    roles: RoleFilter::Only(TensorRole::Parameter),
                    expected: 6,
                    got: 5,
                }
            }
        ),
        "{err}"
    );
    assert_eq!(
        swag.to_state(b).unwrap(),
        before,
        "failed updates change nothing"
    );

    let mut target = Loose::like_toy(5.0);
    target.entries[1].0 = "conv.offset".to_owned();
    let err = swag
        .sample_into(b, &mut target, 1.0, Covariance::Diagonal, 3)
        .unwrap_err();
    let renamed_bias = |op: &str, err: &SwagError| {
        matches!(err, SwagError::Layout { op: got_op, source: LayoutError::NameMismatch { index: 1, expected, got, .. } }
            if *got_op == op && expected == "conv.bias" && got == "conv.offset")
    };
    assert!(renamed_bias("sample_into", &err), "{err}");
    let err = swag.copy_mean_into(b, &mut target).unwrap_err();
    assert!(renamed_bias("copy_mean_into", &err), "{err}");
    for (_, _, t) in &target.entries {
        assert!(host(t).iter().all(|&v| v == 5.0), "the model is unchanged");
    }

    // BN statistics are not part of the layout: a model whose statistics differ still fits.
    let mut other_stats = Loose::like_toy(1.0);
    other_stats
        .entries
        .retain(|(_, role, _)| *role == TensorRole::Parameter);
    swag.update(b, &other_stats).unwrap();
}

#[test]
fn noise_of_the_wrong_length_is_refused() {
    let swag = swag_of(&[snapshot(0), snapshot(1), snapshot(2)], 3);
    let mut model = canvas();
    let z1 = vec![0.0; PARAMS];
    let err = swag
        .sample_with_noise(
            backend(),
            &mut model,
            1.0,
            Covariance::Diagonal,
            &z1[1..],
            &[],
        )
        .unwrap_err();
    assert_eq!(
        err,
        SwagError::NoiseLength {
            which: "z1",
            expected: PARAMS,
            got: PARAMS - 1
        }
    );
    let err = swag
        .sample_with_noise(
            backend(),
            &mut model,
            1.0,
            Covariance::LowRankPlusDiagonal,
            &z1,
            &[0.0; 2],
        )
        .unwrap_err();
    assert_eq!(
        err,
        SwagError::NoiseLength {
            which: "z2",
            expected: 3,
            got: 2
        }
    );
}

#[test]
fn merging_needs_equal_maximum_ranks() {
    let mut a = swag_of(&[snapshot(0)], 3);
    let b = swag_of(&[snapshot(1)], 4);
    let err = a.merge(backend(), &b).unwrap_err();
    assert!(matches!(err, SwagError::Incompatible { .. }), "{err}");
    assert_eq!(a.count(), 1);
}

#[test]
fn inconsistent_states_are_refused() {
    let b = backend();
    let good = swag_of(&[snapshot(0), snapshot(1)], 3).to_state(b).unwrap();
    assert_eq!(good.next_column, 2);
    SwagMoments::from_state(b, &good).unwrap();

    let mut zero_count = good.clone();
    zero_count.n_models = 0;
    let mut bad_position = good.clone();
    bad_position.next_column = 0; // two of three columns held: the next one goes to slot 2
    let mut extra_column = good.clone();
    extra_column.tensors[0].columns.push(vec![0.0; 18]);
    let mut short_mean = good.clone();
    short_mean.tensors[2].mean.pop();
    let mut twice = good.clone();
    twice.tensors[1].name = twice.tensors[0].name.clone();
    for state in [zero_count, bad_position, extra_column, short_mean, twice] {
        let err = SwagMoments::from_state(b, &state).unwrap_err();
        assert!(matches!(err, SwagError::InvalidState { .. }), "{err}");
    }
    let mut zero_rank = good;
    zero_rank.max_rank = 0;
    assert_eq!(
        SwagMoments::from_state(b, &zero_rank).unwrap_err(),
        SwagError::ZeroMaxRank
    );
}

#[test]
fn moments_larger_than_the_available_memory_are_refused_before_anything_is_allocated() {
    let b = backend();
    let available = b
        .memory_available()
        .expect("the CPU backend reads /proc/meminfo on Linux");
    let parameters = SwagMoments::new(b, &toy(1.0), 2)
        .expect("moments")
        .parameter_count();
    // Enough columns that K + 2 copies of the toy's parameters need twice the host's available memory
    // (which moves a little between two readings).
    let max_rank = usize::try_from(available / (parameters as u64 * 4)).expect("fits usize") * 2;
    let err = SwagMoments::new(b, &toy(1.0), max_rank).unwrap_err();
    let expected_parameters = parameters;
    match &err {
        SwagError::DoesNotFit {
            parameters,
            max_rank: rank,
            copies,
            needed_bytes,
            available_bytes,
            backend,
        } => {
            assert_eq!(*parameters, expected_parameters);
            assert_eq!(*rank, max_rank);
            assert_eq!(*copies, max_rank as u64 + 2);
            assert_eq!(
                *needed_bytes,
                SwagMoments::<CpuBackend>::bytes_needed(expected_parameters, max_rank)
            );
            assert!(needed_bytes > available_bytes);
            assert!(backend.starts_with("cpu"), "{backend}");
        }
        other => panic!("expected DoesNotFit, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&format!("maximum rank {max_rank}"))
            && message.contains("bytes available"),
        "{message}"
    );
    // The paper's rank fits easily.
    assert!(SwagMoments::<CpuBackend>::check_fits(b, expected_parameters, 20).is_ok());
}

#[test]
fn bytes_needed_counts_two_moments_and_k_columns() {
    assert_eq!(
        SwagMoments::<CpuBackend>::bytes_needed(1000, 20),
        22 * 1000 * 4
    );
    assert_eq!(SwagMoments::<CpuBackend>::bytes_needed(0, 20), 0);
    assert_eq!(
        SwagMoments::<CpuBackend>::bytes_needed(usize::MAX, usize::MAX),
        u64::MAX
    );
}

#[test]
fn the_mean_is_the_swa_solution_and_bn_statistics_are_ignored() {
    let b = backend();
    // Snapshots whose BN statistics differ wildly: they must not reach the moments.
    let snaps: Vec<Vec<f32>> = (0..5)
        .map(|i| {
            let mut s = snapshot(i);
            for (j, v) in s.iter_mut().enumerate() {
                if is_statistic(j) {
                    *v = 1e6 * (i as f32 + 1.0);
                }
            }
            s
        })
        .collect();
    let swag = swag_of(&snaps, 3);
    let mut swa = swa_core::averaging::WeightAverage::swa(
        b,
        &ToyNet::from_flat(&snaps[0]),
        swa_core::averaging::BufferPolicy::RecomputeLater,
    )
    .unwrap();
    for s in &snaps[1..] {
        swa_core::averaging::WeightAveraging::update(&mut swa, b, &ToyNet::from_flat(s)).unwrap();
    }
    let mut from_swa = canvas();
    swa_core::averaging::WeightAveraging::copy_into(&swa, b, &mut from_swa).unwrap();
    let mut from_swag = canvas();
    swag.copy_mean_into(b, &mut from_swag).unwrap();
    // The same lerp_ updates with the same weights: bit-identical to WeightAverage's SWA.
    assert_eq!(bits(&from_swag.to_flat()), bits(&from_swa.to_flat()));
}
