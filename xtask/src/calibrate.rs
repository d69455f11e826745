//! `cargo xtask calibrate --run DIR`: accuracy, NLL and expected calibration error of SGD, SWA, SWA with
//! temperature scaling, SWAG-Diagonal, SWAG and FGE on the test set, for the runs of one seed that
//! `cargo xtask reproduce` trained, with reliability diagrams.
//!
//! Every number comes from `swa_models::calibration` and `swa_models::swag`; this command finds the
//! weights, moments and ensemble in the seed's folder, loads the data, shows progress, and writes
//! `calibration.json`, `calibration.md`, `reliability.svg` and every method's per-example probabilities
//! (`probabilities.safetensors`) into `DIR/calibration`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use serde::Serialize;
use swa_core::backend::Backend;
use swa_core::swag::Covariance;
use swa_models::calibration::{cross_fitted_temperature, Calibration, DEFAULT_BINS};
use swa_models::checkpoint::{load_module, StateDict, StoredTensor};
use swa_models::evaluate::predict_all_logits;
use swa_models::geometry::SeedRuns;
use swa_models::protocol::RunKind;
use swa_models::swag::{bayesian_model_average, BmaConfig, PAPER_SAMPLES};
use swa_models::train::{load_ensemble, load_swag_moments};
use swa_models::{Architecture, HostBatch};

use crate::charts::{curves_panel, drawing_error, Axes, Curve};
use crate::geometry::{eval_batches, SeedFolderArgs};
use crate::reproduce::{choose_device, Device, DeviceChoice};

/// Arguments of `cargo xtask calibrate`.
#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// The seed's runs, the data and where to write (default: `RUN/calibration`).
    #[command(flatten)]
    pub seed_folder: SeedFolderArgs,
    /// Networks drawn from each SWAG posterior (the paper's 30).
    #[arg(long, default_value_t = PAPER_SAMPLES)]
    pub samples: usize,
    /// Training images (the first N, without augmentation) on which each SWAG sample's BatchNorm
    /// statistics are recomputed (default: all).
    #[arg(long)]
    pub bn_subset: Option<usize>,
    /// Test images (the first N; default: all).
    #[arg(long)]
    pub test_subset: Option<usize>,
    /// Equal-width confidence bins of the calibration error and the reliability diagram.
    #[arg(long, default_value_t = DEFAULT_BINS)]
    pub bins: usize,
    /// Seed of the SWAG samples.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Batch size of the BatchNorm pass and of evaluation.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl CalibrateArgs {
    /// The defaults for the seed folder `run`, as `cargo xtask reproduce --method swag` scores it: on the
    /// training and test images the runs used (`train_limit`, `test_limit` of the recipe).
    pub fn for_seed(
        run: PathBuf,
        data: Option<PathBuf>,
        data_set: crate::data::DatasetArg,
        device: DeviceChoice,
        threads: Option<usize>,
        limits: (Option<usize>, Option<usize>),
    ) -> Self {
        CalibrateArgs {
            seed_folder: SeedFolderArgs {
                run,
                out: None,
                data,
                data_set: Some(data_set),
            },
            samples: PAPER_SAMPLES,
            bn_subset: limits.0,
            test_subset: limits.1,
            bins: DEFAULT_BINS,
            seed: 1,
            batch_size: 128,
            device,
            threads,
        }
    }
}

/// One method's row of the table.
#[derive(Serialize)]
struct MethodReport {
    method: String,
    /// What the predictions are, and how the method was set up.
    detail: String,
    calibration: Calibration,
    seconds: f64,
}

/// Everything written to `calibration.json`.
#[derive(Serialize)]
struct Report {
    run: PathBuf,
    model: String,
    data_set: String,
    test_images: usize,
    bn_images: usize,
    bins: usize,
    device: String,
    methods: Vec<MethodReport>,
    /// Methods that could not be evaluated, with why.
    skipped: Vec<(String, String)>,
}

/// Runs the command.
pub fn run(args: CalibrateArgs) -> Result<()> {
    let (runs, architecture, kind, out) = args.seed_folder.open("calibration")?;
    if args.batch_size == 0 || args.bins == 0 || args.samples == 0 {
        bail!("--batch-size, --bins and --samples must be at least 1");
    }
    let splits = crate::data::load_splits(kind, args.seed_folder.data.as_deref())?;
    let classes = splits.train.num_classes();
    let bn = eval_batches(
        splits.train,
        args.bn_subset.unwrap_or(usize::MAX),
        args.batch_size,
        architecture,
    )?;
    let test = eval_batches(
        splits.test,
        args.test_subset.unwrap_or(usize::MAX),
        args.batch_size,
        architecture,
    )?;
    let mut report = Report {
        run: args.seed_folder.run.clone(),
        model: architecture.to_string(),
        data_set: kind.cli_name().to_string(),
        test_images: test.iter().map(HostBatch::len).sum(),
        bn_images: bn.iter().map(HostBatch::len).sum(),
        bins: args.bins,
        device: String::new(),
        methods: Vec::new(),
        skipped: Vec::new(),
    };
    let mut probabilities = StateDict::new();
    match choose_device(args.device, args.threads)? {
        Device::Cpu(cpu) => calibrate_all(
            &args,
            &runs,
            architecture,
            classes,
            cpu,
            &bn,
            &test,
            &mut report,
            &mut probabilities,
        )?,
        Device::Gpu(gpu) => calibrate_all(
            &args,
            &runs,
            architecture,
            classes,
            gpu,
            &bn,
            &test,
            &mut report,
            &mut probabilities,
        )?,
    }
    let labels: Vec<u32> = test.iter().flat_map(|b| b.labels.iter().copied()).collect();
    probabilities.insert(
        "labels",
        StoredTensor::I64 {
            shape: vec![labels.len()],
            values: labels.iter().map(|&l| i64::from(l)).collect(),
        },
    );
    probabilities.save(&out.join("probabilities.safetensors"))?;
    let json = out.join("calibration.json");
    swa_models::checkpoint::write_atomically(&json, &serde_json::to_vec_pretty(&report)?)?;
    let markdown = calibration_markdown(&report);
    print!("{markdown}");
    swa_models::checkpoint::write_atomically(&out.join("calibration.md"), markdown.as_bytes())?;
    let svg = out.join("reliability.svg");
    reliability_diagram(&report, &svg)?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn calibrate_all<B: Backend>(
    args: &CalibrateArgs,
    runs: &SeedRuns,
    architecture: Architecture,
    classes: usize,
    backend: B,
    bn: &[HostBatch],
    test: &[HostBatch],
    report: &mut Report,
    probabilities: &mut StateDict,
) -> Result<()> {
    report.device = backend.name();
    println!(
        "calibration of {architecture} on {} test images (BatchNorm of SWAG samples on {} training images) on {}",
        report.test_images, report.bn_images, report.device
    );
    let mut model = architecture.build(&backend, classes, 0)?;
    let bins = args.bins;
    let mut add = |report: &mut Report,
                   method: &str,
                   detail: String,
                   probs: &[f64],
                   labels: &[u32],
                   started: Instant|
     -> Result<()> {
        let calibration = Calibration::of_probabilities(probs, classes, labels, bins)
            .with_context(|| format!("scoring {method}"))?;
        probabilities.insert(
            method,
            StoredTensor::F64 {
                shape: vec![labels.len(), classes],
                values: probs.to_vec(),
            },
        );
        println!(
            "  {method:<18} accuracy {:6.2}%  NLL {:.4}  ECE {:.4}  ({:.0} s)",
            100.0 * calibration.accuracy,
            calibration.nll,
            calibration.ece,
            started.elapsed().as_secs_f64()
        );
        report.methods.push(MethodReport {
            method: method.to_string(),
            detail,
            calibration,
            seconds: started.elapsed().as_secs_f64(),
        });
        Ok(())
    };

    // Single networks: SGD and SWA (BatchNorm recomputed when the run finished), SWA with temperature.
    for (method, file) in [("SGD", runs.sgd_solution()), ("SWA", runs.swa_solution())] {
        let file = match file {
            Ok(file) => file,
            Err(e) => {
                report.skipped.push((method.into(), e.to_string()));
                continue;
            }
        };
        let started = Instant::now();
        load_module(&backend, model.as_mut(), &file.path)
            .with_context(|| format!("{method} weights {}", file.path.display()))?;
        let (logits, labels, _) = predict_all_logits(&backend, model.as_mut(), test)?;
        let plain =
            swa_models::calibration::softmax_with_temperature(&logits, classes, &labels, 1.0)?;
        add(
            report,
            method,
            format!("{}", file.path.display()),
            &plain,
            &labels,
            started,
        )?;
        if method == "SWA" {
            let (scaled, temperatures) = cross_fitted_temperature(&logits, classes, &labels)?;
            add(
                report,
                "SWA + temperature",
                format!(
                    "temperatures {:.3} and {:.3}, each fitted on the other half of the test set \
                     (interleaved halves)",
                    temperatures[0], temperatures[1]
                ),
                &scaled,
                &labels,
                started,
            )?;
        }
    }

    // SWAG: the moments of the SWA run's last checkpoint.
    let moments = match latest_checkpoint(runs, RunKind::Swa) {
        Some(dir) => load_swag_moments(&backend, &dir)?.map(|m| (m, dir)),
        None => None,
    };
    match moments {
        None => report.skipped.push((
            "SWAG".into(),
            "the SWA run collected no SWAG moments (train it with the quick preset or --method swag)"
                .into(),
        )),
        Some((moments, dir)) => {
            for (method, covariance) in [
                ("SWAG-Diagonal", Covariance::Diagonal),
                ("SWAG", Covariance::LowRankPlusDiagonal),
            ] {
                let config = BmaConfig {
                    samples: args.samples,
                    ..BmaConfig::paper(covariance, args.seed)
                };
                if covariance == Covariance::LowRankPlusDiagonal && moments.rank() < 2 {
                    report.skipped.push((
                        method.into(),
                        format!("the moments hold {} deviation column; SWAG needs two", moments.rank()),
                    ));
                    continue;
                }
                let started = Instant::now();
                let bar = progress(config.samples as u64, method);
                let ensemble = bayesian_model_average(
                    &backend,
                    &moments,
                    model.as_mut(),
                    bn,
                    test,
                    &config,
                    &mut |_, _| bar.inc(1),
                )?;
                bar.finish_and_clear();
                add(
                    report,
                    method,
                    format!(
                        "{} samples at scale {} from {} snapshots, rank {} ({})",
                        config.samples,
                        config.scale,
                        moments.count(),
                        moments.rank(),
                        dir.display()
                    ),
                    ensemble.probabilities(),
                    ensemble.labels(),
                    started,
                )?;
            }
        }
    }

    // FGE: the ensemble the FGE run kept, on the same test images.
    match latest_checkpoint(runs, RunKind::Fge) {
        None => report
            .skipped
            .push(("FGE".into(), "no FGE run in the folder".into())),
        Some(dir) => match load_ensemble(&dir)? {
            None => report.skipped.push((
                "FGE".into(),
                format!("{}: no ensemble member yet", dir.display()),
            )),
            Some(ensemble) => {
                let labels: Vec<u32> = test.iter().flat_map(|b| b.labels.iter().copied()).collect();
                let n = labels.len();
                if ensemble.classes() != classes
                    || ensemble.labels().len() < n
                    || ensemble.labels()[..n] != labels[..]
                {
                    bail!(
                        "{}: the FGE ensemble was evaluated on other test images ({} labels of {} \
                         classes) than these {n}",
                        dir.display(),
                        ensemble.labels().len(),
                        ensemble.classes()
                    );
                }
                add(
                    report,
                    "FGE",
                    format!("{} snapshots ({})", ensemble.members(), dir.display()),
                    &ensemble.probabilities()[..n * classes],
                    &labels,
                    Instant::now(),
                )?;
            }
        },
    }
    for (method, why) in &report.skipped {
        println!("  {method:<18} skipped: {why}");
    }
    Ok(())
}

/// The folder of the latest checkpoint of the seed's run of `kind`, if it has one.
fn latest_checkpoint(runs: &SeedRuns, kind: RunKind) -> Option<PathBuf> {
    runs.run(kind, kind.name())
        .ok()
        .and_then(|run| run.checkpoints.last().map(|(_, dir)| dir.clone()))
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("  {msg:<18} [{bar:30}] {pos}/{len} samples, ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

/// The calibration table as Markdown.
fn calibration_markdown(report: &Report) -> String {
    let mut md = format!(
        "## Calibration: {} on {} ({} test images, {} bins)\n\n\
         | Method | Accuracy (%) | NLL | ECE | How |\n|---|---:|---:|---:|---|\n",
        report.model, report.data_set, report.test_images, report.bins
    );
    for m in &report.methods {
        md += &format!(
            "| {} | {:.2} | {:.4} | {:.4} | {} |\n",
            m.method,
            100.0 * m.calibration.accuracy,
            m.calibration.nll,
            m.calibration.ece,
            m.detail
        );
    }
    for (method, why) in &report.skipped {
        md += &format!("| {method} | – | – | – | skipped: {why} |\n");
    }
    md += "\nECE: expected calibration error over equal-width confidence bins. The reliability \
           diagram (`reliability.svg`) plots confidence minus accuracy per bin: above zero, \
           overconfident.\n";
    md
}

/// Confidence minus accuracy against confidence, one curve per method, over the bins that hold at
/// least one example.
fn reliability_diagram(report: &Report, path: &Path) -> Result<()> {
    const COLOURS: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    let mut curves: Vec<Curve> = report
        .methods
        .iter()
        .zip(COLOURS.iter().cycle())
        .map(|(m, &colour)| {
            let points = m
                .calibration
                .bins
                .iter()
                .filter(|b| b.count > 0)
                .map(|b| (b.confidence, b.overconfidence()))
                .collect();
            (m.method.clone(), colour, points)
        })
        .collect();
    curves.push((
        "perfectly calibrated".into(),
        RGBColor(128, 128, 128),
        vec![(0.0, 0.0), (1.0, 0.0)],
    ));
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    let draw = drawing_error(path);
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let title = format!(
        "Reliability: {} on {} ({} bins)",
        report.model, report.data_set, report.bins
    );
    curves_panel(
        &root,
        path,
        &Axes {
            title: &title,
            x_label: "confidence (mean of the bin's top probability)",
            y_label: "confidence − accuracy",
        },
        &curves,
        &[],
        true,
    )?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_every_method_and_every_skipped_one() -> Result<()> {
        let calibration = Calibration::of_probabilities(&[0.9, 0.1, 0.2, 0.8], 2, &[0, 0], 2)?;
        let report = Report {
            run: PathBuf::from("run"),
            model: "preresnet20".into(),
            data_set: "cifar10".into(),
            test_images: 2,
            bn_images: 0,
            bins: 2,
            device: "cpu".into(),
            methods: vec![MethodReport {
                method: "SWA".into(),
                detail: "weights".into(),
                calibration,
                seconds: 0.0,
            }],
            skipped: vec![("FGE".into(), "no FGE run in the folder".into())],
        };
        let md = calibration_markdown(&report);
        assert!(md.contains("| SWA | 50.00 |"), "{md}");
        assert!(
            md.contains("| FGE | – | – | – | skipped: no FGE run"),
            "{md}"
        );
        let dir = tempfile::tempdir()?;
        let svg = dir.path().join("reliability.svg");
        reliability_diagram(&report, &svg)?;
        let text = std::fs::read_to_string(&svg)?;
        assert!(
            text.contains("perfectly calibrated") && text.contains("SWA"),
            "{text}"
        );
        Ok(())
    }
}
