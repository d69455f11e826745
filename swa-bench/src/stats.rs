//! Median, minimum and maximum of repeated measurements.
//!
//! The median is reported rather than the mean because a shared machine adds one-sided noise (a run is
//! only ever slowed down by other work), which drags a mean but barely moves a median.

use std::time::Duration;

use serde::Serialize;

/// The median, minimum and maximum of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// The middle sample; the mean of the two middle samples for an even count.
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
    /// How many samples were summarised.
    pub runs: usize,
}

impl Summary {
    /// The summary of `samples`; `None` when there are none or one is not a number.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            runs: n,
        })
    }

    /// The summary of `work / duration` over runs that each did `work` (for rates: GB/s, GFLOP/s, img/s).
    /// Runs that took no measurable time are left out.
    pub fn rates(work: f64, durations: &[Duration]) -> Option<Summary> {
        Summary::of(&rates(work, durations))
    }

    /// The summary of durations in milliseconds.
    pub fn millis(durations: &[Duration]) -> Option<Summary> {
        let ms: Vec<f64> = durations.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Summary::of(&ms)
    }

    /// Every statistic scaled by a positive `factor` (unit conversions).
    pub fn scaled(self, factor: f64) -> Summary {
        Summary {
            median: self.median * factor,
            min: self.min * factor,
            max: self.max * factor,
            runs: self.runs,
        }
    }
}

/// The ratios `ours / theirs` of rounds that measured two sides alternately, one per round: their
/// median says how the sides compare, their extreme the worst round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundRatios {
    ratios: Vec<f64>,
}

impl RoundRatios {
    /// Adds one round's ratio. A round where either side has no figure, or one that is not a positive
    /// finite number (a failed or unmeasurable run), adds nothing rather than a meaningless ratio.
    pub fn add(&mut self, ours: Option<f64>, theirs: Option<f64>) {
        let usable = |v: f64| v.is_finite() && v > 0.0;
        if let (Some(ours), Some(theirs)) = (ours, theirs) {
            if usable(ours) && usable(theirs) {
                self.ratios.push(ours / theirs);
            }
        }
    }

    /// The ratios so far, in round order.
    pub fn ratios(&self) -> &[f64] {
        &self.ratios
    }

    /// Their median, minimum and maximum; `None` before any round had both sides.
    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.ratios)
    }
}

/// The rate `work / duration` of each run that took measurable time, in order.
pub fn rates(work: f64, durations: &[Duration]) -> Vec<f64> {
    durations
        .iter()
        .map(Duration::as_secs_f64)
        .filter(|&s| s > 0.0)
        .map(|s| work / s)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_count_takes_the_middle_sample_whatever_the_order() {
        let s = Summary::of(&[9.0, 1.0, 5.0, 7.0, 3.0]).unwrap();
        assert_eq!(
            s,
            Summary {
                median: 5.0,
                min: 1.0,
                max: 9.0,
                runs: 5
            }
        );
    }

    #[test]
    fn even_count_averages_the_two_middle_samples() {
        let s = Summary::of(&[4.0, 1.0, 10.0, 2.0]).unwrap();
        assert_eq!(s.median, 3.0);
        assert_eq!((s.min, s.max, s.runs), (1.0, 10.0, 4));
    }

    #[test]
    fn one_sample_is_its_own_median_min_and_max() {
        let s = Summary::of(&[2.5]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.runs), (2.5, 2.5, 2.5, 1));
    }

    #[test]
    fn no_samples_or_a_nan_give_no_summary() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn rates_divide_work_by_each_duration_and_skip_zero_durations() {
        let durations = [
            Duration::from_millis(500),
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_secs(1),
        ];
        let s = Summary::rates(100.0, &durations).unwrap();
        // 100 / {0.5, 0.25, 1} s = {200, 400, 100}.
        assert_eq!((s.median, s.min, s.max, s.runs), (200.0, 100.0, 400.0, 3));
    }

    #[test]
    fn round_ratios_divide_ours_by_theirs_and_skip_incomplete_rounds() {
        let mut rounds = RoundRatios::default();
        rounds.add(Some(300.0), Some(200.0));
        rounds.add(Some(100.0), None);
        rounds.add(None, Some(100.0));
        rounds.add(Some(100.0), Some(0.0));
        rounds.add(Some(f64::NAN), Some(1.0));
        rounds.add(Some(50.0), Some(100.0));
        rounds.add(Some(100.0), Some(100.0));
        assert_eq!(rounds.ratios(), &[1.5, 0.5, 1.0]);
        let s = rounds.summary().unwrap();
        assert_eq!((s.median, s.min, s.max, s.runs), (1.0, 0.5, 1.5, 3));
        assert_eq!(RoundRatios::default().summary(), None);
    }

    #[test]
    fn scaling_keeps_the_order_and_count() {
        let s = Summary::of(&[1.0, 2.0, 4.0]).unwrap().scaled(0.5);
        assert_eq!((s.median, s.min, s.max, s.runs), (1.0, 0.5, 2.0, 3));
    }
}
