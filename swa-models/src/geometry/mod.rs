//! Loss-surface geometry: the flatness figures of Izmailov et al. (2018), "Averaging Weights Leads to
//! Wider Optima and Better Generalization", Sections 3.2–3.4.
//!
//! A network is evaluated at arbitrary points of weight space ([`SurfaceProbe`]): the parameters are set
//! to the point, BatchNorm's statistics recomputed for it on training images (exactly
//! [`crate::bn::update_bn`]), and the paper's quantities measured: the train loss as the paper plots it
//! (cross-entropy on the training images without augmentation plus the run's `wd/2·‖w‖²`), the train
//! error, the test loss and the test error ([`PointMetrics`]).
//!
//! The figures are surveys of such points, each a linear combination of a few anchor vectors
//! ([`Survey`]):
//! - [`rays`]: `w + t·d` from the SGD and SWA solutions along directions drawn uniformly on the unit
//!   sphere of the whole parameter vector;
//! - [`line()`]: `t·w_SGD + (1 − t)·w_SWA`, extended beyond both;
//! - [`plane`]: a grid on the plane through three points with the paper's orthonormal basis
//!   ([`Plane`]), other points projected onto it.
//!
//! [`run_survey`] evaluates a survey's points in parallel, one probe per worker, and caches every finished
//! point ([`PointCache`]), so that a killed survey resumes where it stopped; points are pure functions of
//! their coordinates, so the resumed survey equals an uninterrupted one. [`run_survey_across_ranks`]
//! shares the points out between the ranks of an MPI run, with the same results. [`RayWidth`] turns rays into a
//! number: how far a solution's loss stays within a threshold of its value at the solution. [`SeedRuns`]
//! finds the weights of the figures in a seed's run folder.
//!
//! ```
//! use swa_core::CpuBackend;
//! use swa_models::geometry::{line, PointCache, SurfaceData, SurfaceProbe, run_survey};
//! use swa_models::{Architecture, HostBatch};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = CpuBackend::with_threads(1);
//! let architecture: Architecture = "preresnet8".parse()?;
//! let probe = SurfaceProbe::new(backend.clone(), architecture.build(&backend, 10, 0)?, 5e-4);
//! // Two weight sets: two initialisations stand in for the SGD and SWA solutions.
//! let layout = probe.layout().clone();
//! let sgd = layout.vector_from(&backend, architecture.build(&backend, 10, 1)?.as_ref())?;
//! let swa = layout.vector_from(&backend, architecture.build(&backend, 10, 2)?.as_ref())?;
//! let survey = line(&sgd, &swa, &[-0.5, 0.0, 0.5, 1.0, 1.5])?;
//!
//! let batch = |seed: u32| HostBatch {
//!     images: (0..4 * 3 * 32 * 32u32)
//!         .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) % 1000)
//!         .map(|v| v as f32 / 500.0 - 1.0)
//!         .collect(),
//!     shape: [4, 3, 32, 32],
//!     labels: vec![0, 1, 2, 3],
//! };
//! let (train, test) = (vec![batch(1), batch(2)], vec![batch(3)]);
//! let data = SurfaceData { train: &train, test: &test };
//! let dir = std::env::temp_dir().join(format!("swa-geometry-doc-{}", std::process::id()));
//! let mut cache = PointCache::open(&dir.join("line.jsonl"), &survey, survey.fingerprint(&[]))?;
//! let metrics = run_survey(&survey, data, vec![probe], &mut cache, |_, _| {})?;
//! assert_eq!(metrics.len(), 5);
//! assert!(metrics.iter().all(|m| m.train_loss.is_finite() && m.test_error <= 100.0));
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

mod constructions;
mod flatness;
mod plane;
mod probe;
mod runs;
mod survey;
mod vector;

use std::path::PathBuf;

pub use constructions::{line, linspace, plane, ray_seed, rays, PlaneMark, PlaneSurvey};
pub use flatness::{first_rise, RayWidth};
pub use plane::{covering_grid, Plane, Projection};
pub use probe::{Metric, PointMetrics, SurfaceData, SurfaceProbe};
pub use runs::{RunFolder, SeedRuns, WeightsFile};
pub use survey::{run_survey, run_survey_across_ranks, PointCache, Survey, SurveyPoint};
pub use vector::{ParameterLayout, WeightVector};

use crate::error::TrainError;

/// What can go wrong in a loss-surface survey.
#[derive(Debug, thiserror::Error)]
pub enum GeometryError {
    /// A weight file lacks one of the network's parameters: it belongs to another network.
    #[error("{origin}: no parameter `{name}`; the weights belong to another network than the one surveyed")]
    MissingParameter {
        /// The file.
        origin: String,
        /// The parameter.
        name: String,
    },
    /// A weight file with a tensor the network does not have.
    #[error("{origin}: tensor `{name}` is not one of the network's; the weights belong to another network than the one surveyed")]
    UnexpectedTensor {
        /// The file.
        origin: String,
        /// The tensor.
        name: String,
    },
    /// A parameter of another shape or type than the network's.
    #[error("{origin}: parameter `{name}` is {found}, the network's is f32 {expected:?}; the weights belong to another network")]
    WrongParameter {
        /// The file.
        origin: String,
        /// The parameter.
        name: String,
        /// The network's shape.
        expected: Vec<usize>,
        /// What the file holds.
        found: String,
    },
    /// A weight that is NaN or infinite: no loss surface around it.
    #[error("{origin}: parameter `{name}` holds {value}; a survey needs finite weights")]
    NotFinite {
        /// The file.
        origin: String,
        /// The parameter.
        name: String,
        /// The value found.
        value: f32,
    },
    /// Points that do not span what the construction needs.
    #[error("{0}")]
    Degenerate(&'static str),
    /// A survey setting out of its range.
    #[error("{0}")]
    InvalidSetting(String),
    /// A run folder lacks what a figure needs.
    #[error("{dir}: no {what}")]
    MissingRun {
        /// The folder looked in.
        dir: PathBuf,
        /// What is missing, and how to get it.
        what: String,
    },
    /// A point cache written for another survey (other weights, points, data or weight decay).
    #[error("{path} caches another survey than this one (expected {expected}); remove it or write to another folder")]
    CacheMismatch {
        /// The cache file.
        path: PathBuf,
        /// The survey expected.
        expected: String,
    },
    /// A line of a point cache that is not a cached point.
    #[error("{path}, line {line}: not a cached point: {source}")]
    CacheLine {
        /// The cache file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        source: serde_json::Error,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// JSON could not be written.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// Evaluating a point, or reading a checkpoint, failed.
    #[error(transparent)]
    Train(#[from] TrainError),
}
