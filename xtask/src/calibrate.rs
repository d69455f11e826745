//! `cargo xtask calibrate --run DIR`: accuracy, NLL and expected calibration error of SGD, SWA, SWA with
//! temperature scaling, SWAG-Diagonal, SWAG and FGE on the test set, for the runs of one seed that
//! `cargo xtask reproduce` trained, with reliability diagrams.
//!
//! Every number comes from `swa_models::calibration` and `swa_models::swag`; this command finds the
//! weights, moments and ensemble in the seed's folder, loads the data, shows progress, and writes
//! `calibration.json`, `calibration.md`, `reliability.svg` and every method's per-example probabilities
//! (`probabilities.safetensors`) into `DIR/calibration`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use serde::Serialize;
use swa_core::backend::Backend;
use swa_models::calibration::{
    calibrate_runs, CalibrationData, CalibrationEvent, MethodCalibration, RunsCalibration,
    RunsCalibrationConfig, DEFAULT_BINS,
};
use swa_models::checkpoint::{StateDict, StoredTensor};
use swa_models::geometry::SeedRuns;
use swa_models::swag::PAPER_SAMPLES;
use swa_models::{Architecture, HostBatch};

use crate::charts::{curves_panel, drawing_error, Axes, Curve};
use crate::geometry::SeedFolderArgs;
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

/// Everything written to `calibration.json`.
#[derive(Serialize)]
struct Report {
    run: PathBuf,
    model: String,
    data_set: String,
    test_images: usize,
    bn_images: usize,
    /// Training images the runs held out, on which the temperature is fitted (0: cross-fitted on the
    /// test set's halves).
    holdout_images: usize,
    bins: usize,
    device: String,
    /// Each method's row (its probabilities go to `probabilities.safetensors`).
    methods: Vec<MethodCalibration>,
    /// Methods that could not be evaluated, with why.
    skipped: Vec<(String, String)>,
}

/// Runs the command.
pub fn run(args: CalibrateArgs) -> Result<()> {
    let (runs, architecture, kind, out) = args.seed_folder.open("calibration")?;
    let batches = args.seed_folder.load_batches(
        kind,
        &runs,
        architecture,
        (
            args.bn_subset.unwrap_or(usize::MAX),
            args.test_subset.unwrap_or(usize::MAX),
        ),
        args.batch_size,
    )?;
    let data = CalibrationData {
        bn: &batches.train,
        holdout: &batches.holdout,
        test: &batches.test,
    };
    let config = RunsCalibrationConfig {
        samples: args.samples,
        seed: args.seed,
        bins: args.bins,
    };
    let images = |batches: &[HostBatch]| batches.iter().map(HostBatch::len).sum::<usize>();
    let mut report = Report {
        run: args.seed_folder.run.clone(),
        model: architecture.to_string(),
        data_set: kind.cli_name().to_string(),
        test_images: images(data.test),
        bn_images: images(data.bn),
        holdout_images: images(data.holdout),
        bins: args.bins,
        device: String::new(),
        methods: Vec::new(),
        skipped: Vec::new(),
    };
    let classes = batches.classes;
    let scored = match choose_device(args.device, args.threads)? {
        Device::Cpu(cpu) => score(
            &cpu,
            &runs,
            architecture,
            classes,
            data,
            &config,
            &mut report,
        )?,
        Device::Gpu(gpu) => score(
            &gpu,
            &runs,
            architecture,
            classes,
            data,
            &config,
            &mut report,
        )?,
    };

    let mut probabilities = StateDict::new();
    for mut method in scored.methods {
        probabilities.insert(
            method.method.as_str(),
            StoredTensor::F64 {
                shape: vec![scored.labels.len(), classes],
                values: std::mem::take(&mut method.probabilities),
            },
        );
        report.methods.push(method);
    }
    report.skipped = scored.skipped;
    probabilities.insert(
        "labels",
        StoredTensor::I64 {
            shape: vec![scored.labels.len()],
            values: scored.labels.iter().map(|&l| i64::from(l)).collect(),
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

/// Scores every method on `backend`, printing each row and a progress bar per SWAG average.
fn score<B: Backend>(
    backend: &B,
    runs: &SeedRuns,
    architecture: Architecture,
    classes: usize,
    data: CalibrationData<'_>,
    config: &RunsCalibrationConfig,
    report: &mut Report,
) -> Result<RunsCalibration> {
    report.device = backend.name();
    let temperature_on = if data.holdout.is_empty() {
        "halves of the test set".to_string()
    } else {
        format!("{} held-out training images", report.holdout_images)
    };
    println!(
        "calibration of {architecture} on {} test images (BatchNorm of SWAG samples on {} training \
         images, temperature on {temperature_on}) on {}",
        report.test_images, report.bn_images, report.device
    );
    let mut bar: Option<ProgressBar> = None;
    let scored = calibrate_runs(
        backend,
        runs,
        architecture,
        classes,
        data,
        config,
        &mut |event| match event {
            CalibrationEvent::Sampling { method, samples } => {
                bar = Some(progress(samples as u64, method));
            }
            CalibrationEvent::Sampled { .. } => {
                if let Some(bar) = &bar {
                    bar.inc(1);
                }
            }
            CalibrationEvent::Scored(method) => {
                if let Some(bar) = bar.take() {
                    bar.finish_and_clear();
                }
                println!(
                    "  {:<18} accuracy {:6.2}%  NLL {:.4}  ECE {:.4}  ({:.0} s)",
                    method.method,
                    100.0 * method.calibration.accuracy,
                    method.calibration.nll,
                    method.calibration.ece,
                    method.seconds
                );
            }
            CalibrationEvent::Skipped { method, why } => {
                println!("  {method:<18} skipped: {why}");
            }
        },
    )?;
    Ok(scored)
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
    use swa_models::calibration::Calibration;

    #[test]
    fn the_table_names_every_method_and_every_skipped_one() -> Result<()> {
        let calibration = Calibration::of_probabilities(&[0.9, 0.1, 0.2, 0.8], 2, &[0, 0], 2)?;
        let report = Report {
            run: PathBuf::from("run"),
            model: "preresnet20".into(),
            data_set: "cifar10".into(),
            test_images: 2,
            bn_images: 0,
            holdout_images: 0,
            bins: 2,
            device: "cpu".into(),
            methods: vec![MethodCalibration {
                method: "SWA".into(),
                detail: "weights".into(),
                calibration,
                probabilities: Vec::new(),
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
