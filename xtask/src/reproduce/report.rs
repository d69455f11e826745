//! Tables and plots of the runs found in an output folder, side by side with the paper's numbers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::style::{BLUE, CYAN, GREEN, RED};
use serde::{Deserialize, Serialize};
use swa_data::DatasetKind;
use swa_models::geometry::RayWidth;
use swa_models::train::EpochRecord;
use swa_models::Architecture;

use super::presets::{published, Published, RunKind};
use crate::charts::{line_chart, Axes, Curve};
use swa_models::protocol::report_points;

/// What a run leaves for the report: its identity and history.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// Network name.
    pub model: String,
    /// Kind of run.
    pub run: RunKind,
    /// Seed.
    pub seed: u64,
    /// Epochs of one budget.
    pub budget: usize,
    /// Epochs the run trains in all.
    pub epochs_planned: usize,
    /// Trainable parameters of the network.
    pub parameters: usize,
    /// Leading epochs taken from another run of the same seed, which trained them identically; their
    /// records are that run's and their time is counted there.
    #[serde(default)]
    pub shared_epochs: usize,
    /// Per-epoch metrics.
    pub history: Vec<EpochRecord>,
}

/// Mean and standard deviation over seeds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    /// Mean test accuracy, percent.
    pub mean: f64,
    /// Sample standard deviation (0 for one seed).
    pub std: f64,
    /// Number of seeds.
    pub seeds: usize,
}

/// Mean and sample standard deviation of `values` (one per seed), as the paper's tables give them.
pub(crate) fn stat(values: &[f64]) -> Option<Stat> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Some(Stat {
        mean,
        std: var.sqrt(),
        seeds: values.len(),
    })
}

/// One row of the results table.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Network.
    pub model: String,
    /// Epochs of one budget.
    pub budget: usize,
    /// SGD at one budget.
    pub sgd: Option<Stat>,
    /// FGE at one budget.
    pub fge: Option<Stat>,
    /// SWA at 1, 1.25 and 1.5 budgets (epochs, accuracy).
    pub swa: Vec<(usize, Option<Stat>)>,
    /// The paper's numbers, when it reports this network.
    pub paper: Option<[Option<Published>; 5]>,
    /// Total wall time of the runs, in seconds.
    pub wall_seconds: f64,
}

/// The seed folders under `data_dir` (`<model>/<seed>`), with their network's folder name, sorted.
fn seed_dirs(data_dir: &Path) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    let Ok(models) = std::fs::read_dir(data_dir) else {
        return found;
    };
    for model in models.flatten() {
        let Ok(seeds) = std::fs::read_dir(model.path()) else {
            continue;
        };
        let name = model.file_name().to_string_lossy().to_string();
        found.extend(
            seeds
                .flatten()
                .map(|seed| (name.clone(), seed.path()))
                .filter(|(_, path)| path.is_dir()),
        );
    }
    found.sort();
    found
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

fn load_summaries(data_dir: &Path) -> Result<Vec<RunSummary>> {
    let mut found = Vec::new();
    for (_, seed) in seed_dirs(data_dir) {
        let Ok(runs) = std::fs::read_dir(&seed) else {
            continue;
        };
        for run in runs.flatten() {
            let path = run.path().join("history.json");
            if path.is_file() {
                found.push(read_json(&path)?);
            }
        }
    }
    Ok(found)
}

fn accuracy_at(
    history: &[EpochRecord],
    epoch: usize,
    pick: impl Fn(&EpochRecord) -> Option<f64>,
) -> Option<f64> {
    history.iter().find(|r| r.epoch == epoch).and_then(pick)
}

fn rows(summaries: &[RunSummary], kind: DatasetKind) -> Vec<Row> {
    let mut by_model: BTreeMap<&str, Vec<&RunSummary>> = BTreeMap::new();
    for s in summaries {
        by_model.entry(s.model.as_str()).or_default().push(s);
    }
    by_model
        .into_iter()
        .map(|(model, runs)| {
            let budget = runs.first().map_or(0, |r| r.budget);
            let of = |kind: RunKind| runs.iter().filter(move |r| r.run == kind);
            let sgd: Vec<f64> = of(RunKind::Sgd)
                .filter_map(|r| accuracy_at(&r.history, budget, |e| Some(e.test.accuracy)))
                .collect();
            let fge: Vec<f64> = of(RunKind::Fge)
                .filter_map(|r| {
                    accuracy_at(&r.history, budget, |e| e.ensemble_test.map(|m| m.accuracy))
                })
                .collect();
            let swa_end = runs
                .iter()
                .find(|r| r.run == RunKind::Swa)
                .map_or(budget * 3 / 2, |r| r.epochs_planned);
            let swa_epochs = report_points(budget, swa_end);
            let swa = swa_epochs
                .iter()
                .map(|&epoch| {
                    let values: Vec<f64> = of(RunKind::Swa)
                        .filter_map(|r| {
                            accuracy_at(&r.history, epoch, |e| e.swa_test.map(|m| m.accuracy))
                        })
                        .collect();
                    (epoch, stat(&values))
                })
                .collect();
            let paper = model
                .parse::<Architecture>()
                .ok()
                .and_then(|a| published(kind, a));
            let wall_seconds = runs
                .iter()
                .flat_map(|r| {
                    r.history
                        .iter()
                        .filter(|e| e.epoch > r.shared_epochs)
                        .map(|e| e.epoch_seconds)
                })
                .sum();
            Row {
                model: model.to_string(),
                budget,
                sgd: stat(&sgd),
                fge: stat(&fge),
                swa,
                paper,
                wall_seconds,
            }
        })
        .collect()
}

fn cell(ours: Option<Stat>, paper: Option<Published>) -> String {
    let ours = match ours {
        Some(s) if s.seeds > 1 => format!("{:.2} ± {:.2} ({} seeds)", s.mean, s.std, s.seeds),
        Some(s) => format!("{:.2}", s.mean),
        None => "–".into(),
    };
    match paper {
        Some(Published {
            mean,
            std: Some(std),
        }) => format!("{ours} [paper {mean:.2} ± {std:.2}]"),
        Some(Published { mean, std: None }) => format!("{ours} [paper {mean:.2}]"),
        None => ours,
    }
}

fn markdown(rows: &[Row], kind: DatasetKind) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# {}: test accuracy (%)\n", kind.display_name());
    let _ = writeln!(
        md,
        "Ours, with the published figures of Izmailov et al. (UAI 2018, Table 1) in brackets where the paper \
         reports the network. Budgets in epochs.\n"
    );
    let _ = writeln!(md, "| model | budget | SGD (1 budget) | FGE (1 budget) | SWA (1 budget) | SWA (1.25 budgets) | SWA (1.5 budgets) | wall time |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for row in rows {
        let paper = |i: usize| row.paper.and_then(|p| p[i]);
        let swa = |i: usize| row.swa.get(i).and_then(|(_, s)| *s);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} s |",
            row.model,
            row.budget,
            cell(row.sgd, paper(0)),
            cell(row.fge, paper(1)),
            cell(swa(0), paper(2)),
            cell(swa(1), paper(3)),
            cell(swa(2), paper(4)),
            row.wall_seconds
        );
    }
    md
}

/// What `cargo xtask geometry` leaves in `<model>/<seed>/geometry/geometry.json` that the report shows.
#[derive(Deserialize)]
struct GeometrySummary {
    flatness: Vec<RayWidth>,
}

/// What a seed's `calibration/calibration.json` holds that the results table shows.
#[derive(Deserialize)]
struct CalibrationSummary {
    test_images: usize,
    methods: Vec<CalibratedMethod>,
}

#[derive(Deserialize)]
struct CalibratedMethod {
    method: String,
    calibration: CalibrationScores,
}

#[derive(Deserialize)]
struct CalibrationScores {
    accuracy: f64,
    nll: f64,
    ece: f64,
}

/// The calibration of every seed folder under `data_dir` that `cargo xtask calibrate` has scored:
/// (model, seed folder, summary).
fn load_calibration(data_dir: &Path) -> Result<Vec<(String, String, CalibrationSummary)>> {
    let mut found = Vec::new();
    for (model, seed) in seed_dirs(data_dir) {
        let path = seed.join("calibration").join("calibration.json");
        if !path.is_file() {
            continue;
        }
        let summary: CalibrationSummary = read_json(&path)?;
        let seed = seed.file_name().map(|n| n.to_string_lossy().to_string());
        found.push((model, seed.unwrap_or_default(), summary));
    }
    Ok(found)
}

/// The calibration table: accuracy, NLL and ECE of every method scored, per seed.
fn calibration_markdown(found: &[(String, String, CalibrationSummary)]) -> String {
    let mut md = String::new();
    if found.is_empty() {
        return md;
    }
    let _ = writeln!(
        md,
        "\n## Calibration (`cargo xtask calibrate`)\n\nOn the test set: negative log-likelihood (nats) and \
         expected calibration error (equal-width confidence bins); lower is better. Reliability diagrams \
         are in each seed's `calibration/reliability.svg`.\n"
    );
    let _ = writeln!(
        md,
        "| model | seed | method | test images | accuracy (%) | NLL | ECE |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|");
    for (model, seed, summary) in found {
        for m in &summary.methods {
            let c = &m.calibration;
            let _ = writeln!(
                md,
                "| {model} | {seed} | {} | {} | {:.2} | {:.4} | {:.4} |",
                m.method,
                summary.test_images,
                100.0 * c.accuracy,
                c.nll,
                c.ece
            );
        }
    }
    md
}

/// The ray widths of every seed folder under `data_dir` that has them: (model, seed folder, widths).
fn load_flatness(data_dir: &Path) -> Result<Vec<(String, String, Vec<RayWidth>)>> {
    let mut found = Vec::new();
    for (model, seed) in seed_dirs(data_dir) {
        let path = seed.join("geometry").join("geometry.json");
        if !path.is_file() {
            continue;
        }
        let summary: GeometrySummary = read_json(&path)?;
        if !summary.flatness.is_empty() {
            let seed = seed.file_name().map(|n| n.to_string_lossy().to_string());
            found.push((model, seed.unwrap_or_default(), summary.flatness));
        }
    }
    Ok(found)
}

/// The flatness table: for each seed that has ray widths, SGD's and SWA's side by side.
fn flatness_markdown(found: &[(String, String, Vec<RayWidth>)]) -> String {
    let mut md = String::new();
    if found.is_empty() {
        return md;
    }
    let _ = writeln!(
        md,
        "\n## Flatness along random rays (`cargo xtask geometry`)\n\nDistance from each solution at which \
         the metric first rises by the threshold above its value at the solution, mean ± std over rays (the \
         same directions for both solutions). Wider is flatter.\n"
    );
    let _ = writeln!(md, "| model | seed | metric | rise | SGD | SWA |");
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|");
    for (model, seed, widths) in found {
        // Each metric once, in the order of its first width (the widths list SGD's metrics, then SWA's).
        let mut metrics: Vec<&str> = Vec::new();
        for width in widths {
            if !metrics.contains(&width.metric.as_str()) {
                metrics.push(&width.metric);
            }
        }
        for metric in metrics {
            let of = |solution: &str| {
                widths
                    .iter()
                    .find(|w| w.metric == metric && w.solution == solution)
            };
            let threshold = of("SWA").or(of("SGD")).map_or(f64::NAN, |w| w.threshold);
            let describe = |w: Option<&RayWidth>| w.map_or("—".to_string(), RayWidth::describe);
            let _ = writeln!(
                md,
                "| {model} | {seed} | {metric} | {threshold} | {} | {} |",
                describe(of("SGD")),
                describe(of("SWA"))
            );
        }
    }
    md
}

/// Writes `results.md`, `results.json` and one plot per network and kind into `data_dir`; `results.md`
/// ends with the flatness table of the seeds `cargo xtask geometry` has surveyed.
pub fn write_reports(data_dir: &Path, kind: DatasetKind) -> Result<Vec<PathBuf>> {
    let summaries = load_summaries(data_dir)?;
    let rows = rows(&summaries, kind);
    let mut written = Vec::new();
    let md_path = data_dir.join("results.md");
    let md = markdown(&rows, kind)
        + &flatness_markdown(&load_flatness(data_dir)?)
        + &calibration_markdown(&load_calibration(data_dir)?);
    print!("{md}");
    swa_models::checkpoint::write_atomically(&md_path, md.as_bytes())?;
    written.push(md_path);
    let json_path = data_dir.join("results.json");
    swa_models::checkpoint::write_atomically(&json_path, &serde_json::to_vec_pretty(&rows)?)?;
    written.push(json_path);
    let models: Vec<&str> = rows.iter().map(|r| r.model.as_str()).collect();
    for model in models {
        let runs: Vec<&RunSummary> = summaries
            .iter()
            .filter(|s| s.model == model && s.seed == 1)
            .collect();
        if runs.is_empty() {
            continue;
        }
        let error_path = data_dir.join(format!("{model}-test-error.svg"));
        plot_test_error(&error_path, model, &runs)?;
        written.push(error_path);
        let lr_path = data_dir.join(format!("{model}-learning-rate.svg"));
        plot_learning_rate(&lr_path, model, &runs)?;
        written.push(lr_path);
        for run in &runs {
            if let Some(curves) = curves_by_iteration(run) {
                let path =
                    data_dir.join(format!("{model}-{}-test-error-by-iteration.svg", run.run));
                let title = format!(
                    "{model}: test error of the {} run's weights by iteration",
                    run.run
                );
                let axes = Axes {
                    title: &title,
                    x_label: "iteration",
                    y_label: "test error (%)",
                };
                line_chart(&path, &axes, &curves)?;
                written.push(path);
            }
        }
    }
    Ok(written)
}

/// A run's test error against iteration, from the evaluations within its epochs and at their ends, and
/// the points where it took snapshots (the low points of a cyclical schedule); `None` for a run that was
/// not evaluated within epochs.
fn curves_by_iteration(run: &RunSummary) -> Option<Vec<Curve>> {
    if run
        .history
        .iter()
        .all(|e| e.iteration_tests.is_empty() || e.steps == 0)
    {
        return None;
    }
    let mut error = Vec::new();
    let mut snapshots = Vec::new();
    let mut taken = 0;
    for record in &run.history {
        let end = (record.epoch * record.steps) as f64;
        error.extend(
            record
                .iteration_tests
                .iter()
                .map(|t| (t.iteration as f64, 100.0 - t.test.accuracy)),
        );
        error.push((end, 100.0 - record.test.accuracy));
        if record.snapshots > taken {
            snapshots.push((end, 100.0 - record.test.accuracy));
            taken = record.snapshots;
        }
    }
    let mut curves = vec![("test error".to_string(), BLUE, error)];
    if !snapshots.is_empty() {
        curves.push(("snapshots".to_string(), RED, snapshots));
    }
    Some(curves)
}

fn curves_of_error(runs: &[&RunSummary]) -> Vec<Curve> {
    let mut curves = Vec::new();
    for run in runs {
        let points = |pick: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
            run.history
                .iter()
                .filter_map(|e| pick(e).map(|acc| (e.epoch as f64, 100.0 - acc)))
                .collect()
        };
        match run.run {
            RunKind::Sgd => curves.push(("SGD".into(), BLUE, points(&|e| Some(e.test.accuracy)))),
            RunKind::Swa => {
                curves.push((
                    "SGD iterates of the SWA run".into(),
                    CYAN,
                    points(&|e| Some(e.test.accuracy)),
                ));
                curves.push((
                    "SWA average".into(),
                    RED,
                    points(&|e| e.swa_test.map(|m| m.accuracy)),
                ));
            }
            RunKind::Fge => curves.push((
                "FGE ensemble".into(),
                GREEN,
                points(&|e| e.ensemble_test.map(|m| m.accuracy)),
            )),
        }
    }
    curves.retain(|c| !c.2.is_empty());
    curves
}

fn plot_test_error(path: &Path, model: &str, runs: &[&RunSummary]) -> Result<()> {
    let curves = curves_of_error(runs);
    let axes = Axes {
        title: &format!("{model}: test error (seed 1)"),
        x_label: "epoch",
        y_label: "test error (%)",
    };
    line_chart(path, &axes, &curves)
}

fn plot_learning_rate(path: &Path, model: &str, runs: &[&RunSummary]) -> Result<()> {
    let colour = |r: RunKind| match r {
        RunKind::Sgd => BLUE,
        RunKind::Swa => RED,
        RunKind::Fge => GREEN,
    };
    let curves: Vec<Curve> = runs
        .iter()
        .map(|run| {
            let points = run
                .history
                .iter()
                .map(|e| (e.epoch as f64, e.lr_last as f64))
                .collect();
            (
                format!("{} (end of epoch)", run.run),
                colour(run.run),
                points,
            )
        })
        .collect();
    let axes = Axes {
        title: &format!("{model}: learning rate"),
        x_label: "epoch",
        y_label: "learning rate",
    };
    line_chart(path, &axes, &curves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use swa_models::evaluate::Metrics;

    fn record(epoch: usize, acc: f64, swa: Option<f64>) -> EpochRecord {
        let m = |accuracy| Metrics {
            loss: 1.0,
            accuracy,
            top5_accuracy: None,
            count: 100,
        };
        EpochRecord {
            epoch,
            lr_first: 0.1,
            lr_last: 0.1,
            train: m(50.0),
            test: m(acc),
            swa_test: swa.map(m),
            snapshots: 0,
            ensemble_test: None,
            train_seconds: 1.0,
            epoch_seconds: 2.0,
            steps: 10,
            iteration_tests: Vec::new(),
        }
    }

    #[test]
    fn the_flatness_table_has_one_row_per_metric_with_sgd_and_swa_side_by_side() {
        let width = |solution: &str, metric: &str, mean: f64| RayWidth {
            solution: solution.into(),
            metric: metric.into(),
            threshold: 0.1,
            at_solution: 0.5,
            per_ray: vec![Some(mean)],
            mean: Some(mean),
            std: Some(0.0),
            range: 40.0,
        };
        let widths = vec![
            width("SGD", "train_loss", 12.0),
            width("SGD", "test_error", 11.0),
            width("SWA", "train_loss", 10.0),
            width("SWA", "test_error", 9.0),
        ];
        let md = flatness_markdown(&[("preresnet20".into(), "seed-1".into(), widths)]);
        let rows: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with("| preresnet20"))
            .collect();
        assert_eq!(rows.len(), 2, "{md}");
        assert!(rows[0].contains("train_loss") && rows[0].contains("12") && rows[0].contains("10"));
        assert!(rows[1].contains("test_error") && rows[1].contains("11") && rows[1].contains("9"));
    }

    #[test]
    fn rows_take_sgd_at_the_budget_and_swa_at_its_report_points_with_mean_and_std() {
        let summary = |run, seed, history| RunSummary {
            model: "preresnet20".into(),
            run,
            seed,
            budget: 4,
            epochs_planned: if run == RunKind::Swa { 6 } else { 4 },
            parameters: 1,
            // The SWA runs' records start at epoch 4, so these epochs do not count in any case.
            shared_epochs: if run == RunKind::Swa { 2 } else { 0 },
            history,
        };
        let sgd = |seed, acc| {
            summary(
                RunKind::Sgd,
                seed,
                (1..=4)
                    .map(|e| record(e, if e == 4 { acc } else { 10.0 }, None))
                    .collect(),
            )
        };
        let swa = |seed, at4, at5, at6| {
            summary(
                RunKind::Swa,
                seed,
                vec![
                    record(4, 0.0, Some(at4)),
                    record(5, 0.0, Some(at5)),
                    record(6, 0.0, Some(at6)),
                ],
            )
        };
        let rows = rows(
            &[
                sgd(1, 80.0),
                sgd(2, 82.0),
                swa(1, 81.0, 83.0, 84.0),
                swa(2, 83.0, 85.0, 86.0),
            ],
            DatasetKind::Cifar10,
        );
        assert_eq!(rows.len(), 1);
        let sgd = rows[0].sgd.expect("two SGD seeds");
        assert_eq!((sgd.mean, sgd.seeds), (81.0, 2));
        assert!((sgd.std - 2f64.sqrt()).abs() < 1e-12);
        let epochs: Vec<usize> = rows[0].swa.iter().map(|(e, _)| *e).collect();
        assert_eq!(epochs, vec![4, 5, 6]);
        let means: Vec<f64> = rows[0]
            .swa
            .iter()
            .map(|(_, s)| s.map_or(f64::NAN, |s| s.mean))
            .collect();
        assert_eq!(means, vec![82.0, 84.0, 85.0]);
        assert_eq!(rows[0].wall_seconds, 2.0 * (4.0 + 4.0 + 3.0 + 3.0));
    }

    #[test]
    fn wall_time_counts_epochs_shared_by_two_runs_once() {
        let run = |kind, shared_epochs| RunSummary {
            model: "preresnet20".into(),
            run: kind,
            seed: 1,
            budget: 4,
            epochs_planned: 6,
            parameters: 1,
            shared_epochs,
            history: (1..=6).map(|e| record(e, 50.0, None)).collect(),
        };
        let rows = rows(
            &[run(RunKind::Sgd, 0), run(RunKind::Swa, 2)],
            DatasetKind::Cifar10,
        );
        assert_eq!(rows[0].wall_seconds, 2.0 * (6.0 + 4.0));
    }

    #[test]
    fn the_iteration_figure_joins_tests_within_and_at_the_end_of_epochs_and_marks_snapshots() {
        use swa_models::IterationTest;
        let mut first = record(1, 60.0, None);
        let mut second = record(2, 70.0, None);
        second.snapshots = 1;
        first.iteration_tests = vec![IterationTest {
            iteration: 5,
            lr: 0.1,
            test: Metrics {
                loss: 1.0,
                accuracy: 55.0,
                top5_accuracy: None,
                count: 100,
            },
        }];
        let run = RunSummary {
            model: "preresnet8".into(),
            run: RunKind::Fge,
            seed: 1,
            budget: 2,
            epochs_planned: 2,
            parameters: 1,
            shared_epochs: 0,
            history: vec![first, second],
        };
        let curves = curves_by_iteration(&run).unwrap();
        assert_eq!(curves[0].2, vec![(5.0, 45.0), (10.0, 40.0), (20.0, 30.0)]);
        assert_eq!(curves[1].2, vec![(20.0, 30.0)]);
        let untested = RunSummary {
            history: vec![record(1, 60.0, None)],
            ..run
        };
        assert!(curves_by_iteration(&untested).is_none());
    }
}
