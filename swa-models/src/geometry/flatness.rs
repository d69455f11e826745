//! Flatness as a number: how far along random rays a solution's loss stays within a threshold of its
//! value at the solution.

use serde::{Deserialize, Serialize};

/// The distance along a curve at which `values` first rise more than `threshold` above `values[0]`,
/// interpolated linearly between the two samples around the crossing; `None` when the curve stays below
/// within the sampled range (or has no samples). `distances` must increase.
pub fn first_rise(distances: &[f64], values: &[f64], threshold: f64) -> Option<f64> {
    let (&start, _) = values.split_first()?;
    let level = start + threshold;
    let mut previous = (*distances.first()?, start);
    for (&d, &v) in distances.iter().zip(values).skip(1) {
        if v > level {
            let (d0, v0) = previous;
            let fraction = if v > v0 { (level - v0) / (v - v0) } else { 1.0 };
            return Some(d0 + fraction.clamp(0.0, 1.0) * (d - d0));
        }
        previous = (d, v);
    }
    None
}

/// The width of a solution's basin along its rays, for one metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RayWidth {
    /// The solution (`SGD`, `SWA`).
    pub solution: String,
    /// The metric (`train_loss`, `test_error`).
    pub metric: String,
    /// The rise above the value at the solution that counts as leaving the basin.
    pub threshold: f64,
    /// The value at the solution (the mean over rays, which all start at the same point).
    pub at_solution: f64,
    /// The distance of the first rise along each ray (`None`: no rise within the range).
    pub per_ray: Vec<Option<f64>>,
    /// Mean of the rays' distances that were found.
    pub mean: Option<f64>,
    /// Their sample standard deviation (0 for a single ray).
    pub std: Option<f64>,
    /// The largest distance sampled: rays without a rise are wider than this.
    pub range: f64,
}

impl RayWidth {
    /// The width over `rays`, each a curve of (distance, value) samples starting at the solution.
    pub fn of(
        solution: &str,
        metric: &str,
        threshold: f64,
        rays: &[(Vec<f64>, Vec<f64>)],
    ) -> RayWidth {
        let per_ray: Vec<Option<f64>> = rays
            .iter()
            .map(|(d, v)| first_rise(d, v, threshold))
            .collect();
        let found: Vec<f64> = per_ray.iter().flatten().copied().collect();
        let (mean, std) = mean_std(&found);
        let starts: Vec<f64> = rays
            .iter()
            .filter_map(|(_, v)| v.first().copied())
            .collect();
        let range = rays
            .iter()
            .filter_map(|(d, _)| d.last().copied())
            .fold(0.0, f64::max);
        RayWidth {
            solution: solution.to_string(),
            metric: metric.to_string(),
            threshold,
            at_solution: mean_std(&starts).0.unwrap_or(f64::NAN),
            per_ray,
            mean,
            std,
            range,
        }
    }

    /// How many rays left the basin within the range.
    pub fn found(&self) -> usize {
        self.per_ray.iter().flatten().count()
    }

    /// `12.3 ± 0.4` (with `> range` for rays that never rose), for tables.
    pub fn describe(&self) -> String {
        let missing = self.per_ray.len() - self.found();
        let mut text = match (self.mean, self.std) {
            (Some(m), Some(s)) => format!("{m:.2} ± {s:.2}"),
            _ => String::from("—"),
        };
        if missing > 0 {
            text.push_str(&format!(
                " ({missing} of {} rays > {:.1})",
                self.per_ray.len(),
                self.range
            ));
        }
        text
    }
}

fn mean_std(values: &[f64]) -> (Option<f64>, Option<f64>) {
    if values.is_empty() {
        return (None, None);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = if values.len() > 1 {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (Some(mean), Some(std))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_rise_interpolates_between_the_samples_around_the_crossing() {
        let d = [0.0, 1.0, 2.0, 3.0];
        let v = [1.0, 1.05, 1.25, 2.0];
        // The level 1.1 lies a quarter of the way from 1.05 (at 1) to 1.25 (at 2).
        let rise = first_rise(&d, &v, 0.1).unwrap();
        assert!((rise - 1.25).abs() < 1e-12, "{rise}");
        assert_eq!(first_rise(&d, &v, 5.0), None);
        assert_eq!(first_rise(&[], &[], 0.1), None);
    }

    #[test]
    fn width_averages_the_rays_that_rose_and_counts_the_others() {
        let rays = vec![
            (vec![0.0, 1.0, 2.0], vec![0.0, 0.0, 1.0]),
            (vec![0.0, 1.0, 2.0], vec![0.0, 1.0, 1.0]),
            (vec![0.0, 1.0, 2.0], vec![0.0, 0.0, 0.0]),
        ];
        let width = RayWidth::of("SWA", "train_loss", 0.5, &rays);
        assert_eq!(width.per_ray, vec![Some(1.5), Some(0.5), None]);
        assert_eq!(width.mean, Some(1.0));
        assert!((width.std.unwrap() - 0.5f64.sqrt()).abs() < 1e-12);
        assert_eq!(width.found(), 2);
        assert_eq!(width.range, 2.0);
        assert!(width.describe().contains("1 of 3 rays > 2.0"));
    }
}
