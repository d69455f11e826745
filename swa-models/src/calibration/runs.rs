//! The calibration table of one seed's runs: SGD, SWA, SWA with temperature scaling, SWAG-Diagonal,
//! SWAG and FGE scored on the same test images, as in the SWAG paper's comparisons.
//!
//! [`calibrate_runs`] finds every method's predictions in the folder that
//! [`crate::protocol::plan_seed`] lays out ([`SeedRuns`]):
//!
//! - **SGD** and **SWA**: the SGD run's final weights and the SWA run's average (BatchNorm recomputed
//!   when the run finished);
//! - **SWA + temperature**: the SWA network's logits divided by one temperature ([`fit_temperature`]),
//!   fitted on the training images the runs held out ([`RunConfig::holdout`](crate::train::RunConfig)),
//!   or, for runs that trained on every image, cross-fitted on two interleaved halves of the test set
//!   ([`cross_fitted_temperature`]), which the method's description says;
//! - **SWAG-Diagonal** and **SWAG**: Bayesian model averages ([`bayesian_model_average`]) over the SWAG
//!   moments of the SWA run's latest checkpoint, at the SWAG authors' scales ([`BmaConfig::paper`]),
//!   each sample's BatchNorm statistics recomputed on the given training images;
//! - **FGE**: the ensemble the FGE run kept, whose members were evaluated on the same test images.
//!
//! A method whose run or moments are missing is listed as skipped, with why; anything else that fails
//! (a corrupt file, predictions on other test images) is an error naming the file.

use std::path::PathBuf;
use std::time::Instant;

use swa_core::backend::Backend;
use swa_core::swag::Covariance;

use super::{
    cross_fitted_temperature, fit_temperature, softmax_with_temperature, Calibration,
    CalibrationError,
};
use crate::batch::HostBatch;
use crate::checkpoint::{load_module, CheckpointError};
use crate::error::TrainError;
use crate::evaluate::predict_all_logits;
use crate::geometry::{GeometryError, SeedRuns};
use crate::nets::Architecture;
use crate::protocol::RunKind;
use crate::swag::{bayesian_model_average, BmaConfig};
use crate::train::{load_ensemble, load_swag_moments};

/// The images a calibration table is computed on.
#[derive(Clone, Copy, Debug)]
pub struct CalibrationData<'a> {
    /// Training images on which each SWAG sample's BatchNorm statistics are recomputed.
    pub bn: &'a [HostBatch],
    /// The training images the runs held out, on which the temperature is fitted; empty when the runs
    /// held none out (the temperature is then cross-fitted on halves of the test set).
    pub holdout: &'a [HostBatch],
    /// The test images every method is scored on.
    pub test: &'a [HostBatch],
}

/// How the methods are drawn and scored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunsCalibrationConfig {
    /// Networks drawn from each SWAG posterior (the paper's 30).
    pub samples: usize,
    /// Seed of the SWAG samples.
    pub seed: u64,
    /// Equal-width confidence bins.
    pub bins: usize,
}

/// One method's row of the table, with its per-example probabilities (which a serialised row leaves
/// out: they are a tensor, for a tensor file).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MethodCalibration {
    /// `SGD`, `SWA`, `SWA + temperature`, `SWAG-Diagonal`, `SWAG` or `FGE`.
    pub method: String,
    /// Where the predictions come from and how the method was set up.
    pub detail: String,
    /// The scores.
    pub calibration: Calibration,
    /// Predicted probabilities, `[test images, classes]` row-major.
    #[serde(skip)]
    pub probabilities: Vec<f64>,
    /// Wall time of the method.
    pub seconds: f64,
}

/// Every method's scores on the same test images.
#[derive(Clone, Debug, PartialEq)]
pub struct RunsCalibration {
    /// The methods scored, in the table's order.
    pub methods: Vec<MethodCalibration>,
    /// `(method, why)` for each method that could not be scored.
    pub skipped: Vec<(String, String)>,
    /// The test images' labels, in order.
    pub labels: Vec<u32>,
    /// The class count.
    pub classes: usize,
}

/// What [`calibrate_runs`] is doing, for progress displays.
#[derive(Debug)]
pub enum CalibrationEvent<'a> {
    /// A Bayesian model average of `samples` networks begins.
    Sampling {
        /// The method.
        method: &'a str,
        /// Its sample count.
        samples: usize,
    },
    /// Sample `index` of the current average is scored.
    Sampled {
        /// The sample's index.
        index: usize,
    },
    /// A method was scored.
    Scored(&'a MethodCalibration),
    /// A method could not be scored.
    Skipped {
        /// The method.
        method: &'a str,
        /// Why.
        why: &'a str,
    },
}

/// Errors of [`calibrate_runs`]; each names the file or folder concerned.
#[derive(Debug, thiserror::Error)]
pub enum RunsCalibrationError {
    /// The seed's folder is not laid out as the protocol writes it.
    #[error(transparent)]
    Runs(#[from] GeometryError),
    /// Weights that do not load into the network.
    #[error("{method} weights {path}: {source}")]
    Weights {
        /// The method.
        method: &'static str,
        /// The file.
        path: PathBuf,
        /// Why (boxed: a checkpoint error is large, and the other variants small).
        #[source]
        source: Box<CheckpointError>,
    },
    /// Evaluating, sampling or reading a checkpoint failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// Predictions that cannot be scored.
    #[error("scoring {method}: {source}")]
    Score {
        /// The method.
        method: String,
        /// Why.
        #[source]
        source: CalibrationError,
    },
    /// An FGE ensemble evaluated on other test images than these.
    #[error(
        "{dir}: the FGE ensemble was evaluated on other test images ({found} labels of {classes} \
         classes) than these {expected}"
    )]
    OtherTestImages {
        /// The FGE checkpoint.
        dir: PathBuf,
        /// Labels the ensemble holds.
        found: usize,
        /// Its class count.
        classes: usize,
        /// Test images given.
        expected: usize,
    },
    /// Settings out of range.
    #[error("invalid calibration settings: {0}")]
    InvalidConfig(String),
}

/// Scores every method of the seed's `runs` on `data.test` (see the [module documentation](self)),
/// calling `on_event` as it goes.
pub fn calibrate_runs<B: Backend>(
    backend: &B,
    runs: &SeedRuns,
    architecture: Architecture,
    classes: usize,
    data: CalibrationData<'_>,
    config: &RunsCalibrationConfig,
    on_event: &mut dyn FnMut(CalibrationEvent<'_>),
) -> Result<RunsCalibration, RunsCalibrationError> {
    if config.samples == 0 || config.bins == 0 {
        return Err(RunsCalibrationError::InvalidConfig(format!(
            "{} samples and {} bins: both must be at least 1",
            config.samples, config.bins
        )));
    }
    let mut table = Table {
        result: RunsCalibration {
            methods: Vec::new(),
            skipped: Vec::new(),
            labels: Vec::new(),
            classes,
        },
        bins: config.bins,
        on_event,
    };
    let mut model = architecture
        .build(backend, classes, 0)
        .map_err(TrainError::from)?;

    // Single networks: SGD and SWA, and SWA with a temperature.
    for (method, file) in [("SGD", runs.sgd_solution()), ("SWA", runs.swa_solution())] {
        let file = match file {
            Ok(file) => file,
            Err(e) => {
                table.skip(method, e.to_string());
                continue;
            }
        };
        let started = Instant::now();
        load_module(backend, model.as_mut(), &file.path).map_err(|source| {
            RunsCalibrationError::Weights {
                method,
                path: file.path.clone(),
                source: Box::new(source),
            }
        })?;
        let (logits, labels, _) = predict_all_logits(backend, model.as_mut(), data.test)?;
        table.result.labels.clone_from(&labels);
        let plain = softmax_with_temperature(&logits, classes, &labels, 1.0)
            .map_err(score_error(method))?;
        table.add(method, file.path.display().to_string(), plain, started)?;
        if method == "SWA" {
            let (scaled, detail) = if data.holdout.is_empty() {
                let (scaled, temperatures) = cross_fitted_temperature(&logits, classes, &labels)
                    .map_err(score_error(method))?;
                let detail = format!(
                    "temperatures {:.3} and {:.3}, each fitted on the other half of the test set \
                     (interleaved halves; the runs held out no training images)",
                    temperatures[0], temperatures[1]
                );
                (scaled, detail)
            } else {
                let (held_logits, held_labels, _) =
                    predict_all_logits(backend, model.as_mut(), data.holdout)?;
                let temperature = fit_temperature(&held_logits, classes, &held_labels)
                    .map_err(score_error("the temperature"))?;
                let scaled = softmax_with_temperature(&logits, classes, &labels, temperature)
                    .map_err(score_error(method))?;
                let detail = format!(
                    "temperature {temperature:.3}, fitted on the {} held-out training images",
                    held_labels.len()
                );
                (scaled, detail)
            };
            table.add("SWA + temperature", detail, scaled, started)?;
        }
    }

    // SWAG: the moments of the SWA run's latest checkpoint.
    let moments = match latest_checkpoint(runs, RunKind::Swa) {
        Some(dir) => load_swag_moments(backend, &dir)?.map(|m| (m, dir)),
        None => None,
    };
    match moments {
        None => table.skip(
            "SWAG",
            "the SWA run collected no SWAG moments (train it with the quick preset or --method swag)"
                .into(),
        ),
        Some((moments, dir)) => {
            for (method, covariance) in [
                ("SWAG-Diagonal", Covariance::Diagonal),
                ("SWAG", Covariance::LowRankPlusDiagonal),
            ] {
                if covariance == Covariance::LowRankPlusDiagonal && moments.rank() < 2 {
                    table.skip(
                        method,
                        format!(
                            "the moments hold {} deviation column; SWAG needs two",
                            moments.rank()
                        ),
                    );
                    continue;
                }
                let bma = BmaConfig {
                    samples: config.samples,
                    ..BmaConfig::paper(covariance, config.seed)
                };
                let started = Instant::now();
                (table.on_event)(CalibrationEvent::Sampling {
                    method,
                    samples: bma.samples,
                });
                let on_event = &mut *table.on_event;
                let ensemble = bayesian_model_average(
                    backend,
                    &moments,
                    model.as_mut(),
                    data.bn,
                    data.test,
                    &bma,
                    &mut |index, _| on_event(CalibrationEvent::Sampled { index }),
                )?;
                if table.result.labels.is_empty() {
                    table.result.labels = ensemble.labels().to_vec();
                }
                let detail = format!(
                    "{} samples at scale {} from {} snapshots, rank {} ({})",
                    bma.samples,
                    bma.scale,
                    moments.count(),
                    moments.rank(),
                    dir.display()
                );
                table.add(method, detail, ensemble.probabilities().to_vec(), started)?;
            }
        }
    }

    // FGE: the ensemble the FGE run kept, on the same test images.
    match latest_checkpoint(runs, RunKind::Fge) {
        None => table.skip("FGE", "no FGE run in the folder".into()),
        Some(dir) => match load_ensemble(&dir)? {
            None => table.skip("FGE", format!("{}: no ensemble member yet", dir.display())),
            Some(ensemble) => {
                if table.result.labels.is_empty() {
                    table.result.labels = data
                        .test
                        .iter()
                        .flat_map(|b| b.labels.iter().copied())
                        .collect();
                }
                let n = table.result.labels.len();
                if ensemble.classes() != classes
                    || ensemble.labels().get(..n) != Some(&table.result.labels[..])
                {
                    return Err(RunsCalibrationError::OtherTestImages {
                        dir,
                        found: ensemble.labels().len(),
                        classes: ensemble.classes(),
                        expected: n,
                    });
                }
                let detail = format!("{} snapshots ({})", ensemble.members(), dir.display());
                let probabilities = ensemble.probabilities()[..n * classes].to_vec();
                table.add("FGE", detail, probabilities, Instant::now())?;
            }
        },
    }
    Ok(table.result)
}

/// The table being filled, with its progress callback.
struct Table<'e, 'f> {
    result: RunsCalibration,
    bins: usize,
    on_event: &'e mut (dyn FnMut(CalibrationEvent<'_>) + 'f),
}

impl Table<'_, '_> {
    fn add(
        &mut self,
        method: &str,
        detail: String,
        probabilities: Vec<f64>,
        started: Instant,
    ) -> Result<(), RunsCalibrationError> {
        let calibration = Calibration::of_probabilities(
            &probabilities,
            self.result.classes,
            &self.result.labels,
            self.bins,
        )
        .map_err(score_error(method))?;
        self.result.methods.push(MethodCalibration {
            method: method.to_string(),
            detail,
            calibration,
            probabilities,
            seconds: started.elapsed().as_secs_f64(),
        });
        if let Some(scored) = self.result.methods.last() {
            (self.on_event)(CalibrationEvent::Scored(scored));
        }
        Ok(())
    }

    fn skip(&mut self, method: &str, why: String) {
        (self.on_event)(CalibrationEvent::Skipped { method, why: &why });
        self.result.skipped.push((method.to_string(), why));
    }
}

fn score_error(method: &str) -> impl Fn(CalibrationError) -> RunsCalibrationError + '_ {
    move |source| RunsCalibrationError::Score {
        method: method.to_string(),
        source,
    }
}

/// The folder of the latest checkpoint of the seed's run of `kind`, if it has one.
fn latest_checkpoint(runs: &SeedRuns, kind: RunKind) -> Option<PathBuf> {
    runs.run(kind, kind.name())
        .ok()
        .and_then(|run| run.checkpoints.last().map(|(_, dir)| dir.clone()))
}
