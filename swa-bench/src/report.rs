//! Figures, the table they print as, and the JSON report.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::machine::Machine;
use crate::stats::Summary;

/// How a figure compares with a reference measured in the same run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    /// What the figure is compared with (`copy bandwidth`, `GEMM peak`, `PyTorch`).
    pub against: String,
    /// The figure's median divided by the reference's median.
    pub ratio: f64,
    /// The ratio the project aims for, when it has a target: met when the ratio is at least this (or at
    /// most, for a `max_ratio`).
    pub target: Option<Target>,
}

/// A target on a comparison's ratio.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The ratio should be at least this.
    MinRatio(f64),
    /// The ratio should be at most this.
    MaxRatio(f64),
}

impl Target {
    /// Whether `ratio` meets the target.
    pub fn met(&self, ratio: f64) -> bool {
        match *self {
            Target::MinRatio(min) => ratio >= min,
            Target::MaxRatio(max) => ratio <= max,
        }
    }
}

/// One measured figure: a summary over runs, in a unit, perhaps compared with a reference.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figure {
    /// The suite that measured it.
    pub suite: String,
    /// What was measured.
    pub name: String,
    /// The unit of the summary (`GB/s`, `GFLOP/s`, `img/s`, `ms`, `%`).
    pub unit: String,
    /// Median, minimum and maximum over the runs.
    #[serde(flatten)]
    pub summary: Summary,
    /// The comparison with a reference, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
    /// Whether the comparison's target is met (absent without a target).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_met: Option<bool>,
    /// Anything a reader needs to interpret the figure (a smaller batch, a derived value, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Figure {
    /// A figure without comparison or note.
    pub fn new(suite: &str, name: impl Into<String>, unit: &str, summary: Summary) -> Self {
        Figure {
            suite: suite.into(),
            name: name.into(),
            unit: unit.into(),
            summary,
            comparison: None,
            target_met: None,
            note: None,
        }
    }

    /// Compares the figure's median with `reference` (a median in the same unit).
    pub fn against(
        mut self,
        what: impl Into<String>,
        reference: f64,
        target: Option<Target>,
    ) -> Self {
        let ratio = self.summary.median / reference;
        self.target_met = target.map(|t| t.met(ratio));
        self.comparison = Some(Comparison {
            against: what.into(),
            ratio,
            target,
        });
        self
    }

    /// Sets a ratio computed elsewhere (for figures whose reference is not in the same unit).
    pub fn with_ratio(
        mut self,
        what: impl Into<String>,
        ratio: f64,
        target: Option<Target>,
    ) -> Self {
        self.target_met = target.map(|t| t.met(ratio));
        self.comparison = Some(Comparison {
            against: what.into(),
            ratio,
            target,
        });
        self
    }

    /// Adds a note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// The figure as one table row.
    pub fn row(&self) -> String {
        let s = &self.summary;
        let comparison = match &self.comparison {
            Some(c) => {
                let verdict = match (self.target_met, c.target) {
                    (Some(true), Some(t)) => format!(" (target {} met)", describe_target(t)),
                    (Some(false), Some(t)) => format!(" (target {} MISSED)", describe_target(t)),
                    _ => String::new(),
                };
                format!("{} of {}{verdict}", format_ratio(c.ratio), c.against)
            }
            None => String::new(),
        };
        let mut row = format!(
            "{:<10} {:<60} {:>10} {:>10} {:>10} {:<8} {:>3}  {}",
            self.suite,
            self.name,
            format_value(s.median),
            format_value(s.min),
            format_value(s.max),
            self.unit,
            s.runs,
            comparison
        );
        if let Some(note) = &self.note {
            let _ = write!(row, "  [{note}]");
        }
        row.trim_end().to_string()
    }
}

fn describe_target(target: Target) -> String {
    match target {
        Target::MinRatio(r) => format!("≥ {}", format_ratio(r)),
        Target::MaxRatio(r) => format!("≤ {}", format_ratio(r)),
    }
}

/// Ratios below 10 print as percentages (with enough digits to show a tiny share), larger ones as
/// multiples.
fn format_ratio(ratio: f64) -> String {
    if ratio.abs() >= 10.0 {
        return format!("{ratio:.1}×");
    }
    let pct = ratio * 100.0;
    if pct.abs() >= 1.0 || pct == 0.0 {
        format!("{pct:.1}%")
    } else if pct.abs() >= 0.01 {
        format!("{pct:.3}%")
    } else {
        format!("{pct:.2e}%")
    }
}

/// Three significant digits at least, without exponents for everyday magnitudes.
fn format_value(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 || magnitude == 0.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else if magnitude >= 0.001 {
        format!("{value:.4}")
    } else {
        format!("{value:.3e}")
    }
}

/// The table's header line.
pub fn header() -> String {
    format!(
        "{:<10} {:<60} {:>10} {:>10} {:>10} {:<8} {:>3}  comparison",
        "suite", "figure", "median", "min", "max", "unit", "n"
    )
}

/// Everything one run of the benchmarks measured, with where and how.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The machine it ran on.
    pub machine: Machine,
    /// Versions of the crates measured and of the compiler.
    pub versions: Versions,
    /// The command line.
    pub command: Vec<String>,
    /// When it started, seconds since the Unix epoch.
    pub started_unix_s: u64,
    /// How long the whole run took.
    pub duration_s: f64,
    /// The suites that ran, in order.
    pub suites: Vec<String>,
    /// The figures, in the order they were measured.
    pub figures: Vec<Figure>,
    /// Remarks on the run: suites skipped and why, machine load.
    pub notes: Vec<String>,
}

/// Versions of what was measured, read from `Cargo.lock` and the compiler when the binary was built.
#[derive(Debug, Serialize)]
pub struct Versions {
    /// `name version` of the swa-rs crates and the third-party crates that do the heavy lifting.
    pub crates: BTreeMap<String, String>,
    /// `rustc --version` of the compiler that built the benchmarks.
    pub rustc: String,
    /// The git commit of the working tree, and whether it had uncommitted changes, when git was found.
    pub git: Option<String>,
}

impl Versions {
    /// The versions recorded at build time, and the working tree's commit now.
    pub fn current() -> Self {
        let crates = env!("SWA_BENCH_CRATE_VERSIONS")
            .split(';')
            .filter_map(|entry| entry.split_once('='))
            .map(|(name, version)| (name.to_string(), version.to_string()))
            .collect();
        Versions {
            crates,
            rustc: env!("SWA_BENCH_RUSTC_VERSION").to_string(),
            git: git_description(),
        }
    }
}

fn git_description() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(["-C", dir])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = run(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{commit} (with uncommitted changes)")
    } else {
        commit
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(median: f64) -> Summary {
        Summary {
            median,
            min: median,
            max: median,
            runs: 1,
        }
    }

    #[test]
    fn a_comparison_divides_medians_and_judges_the_target() {
        let f = Figure::new("averaging", "swa", "GB/s", summary(9.0)).against(
            "copy",
            10.0,
            Some(Target::MinRatio(0.9)),
        );
        assert_eq!(f.comparison.as_ref().map(|c| c.ratio), Some(0.9));
        assert_eq!(f.target_met, Some(true));
        let g = Figure::new("averaging", "swa", "GB/s", summary(8.0)).against(
            "copy",
            10.0,
            Some(Target::MinRatio(0.9)),
        );
        assert_eq!(g.target_met, Some(false));
        assert!(g.row().contains("80.0% of copy (target ≥ 90.0% MISSED)"));
        let h = Figure::new("overhead", "avg", "%", summary(0.5)).with_ratio(
            "epoch",
            0.005,
            Some(Target::MaxRatio(0.01)),
        );
        assert_eq!(h.target_met, Some(true));
    }
}
