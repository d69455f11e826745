//! An end-to-end slice of a training epoch on the real CIFAR-10, against the same loop in PyTorch.
//!
//! The training suite feeds one random batch again and again, which leaves out everything an epoch does
//! besides the step. Here a fixed number of batches of the real training path is timed: CIFAR-10's
//! training split read by swa-data from its official files ([`swa_data::load_kind`]), cut into shuffled,
//! randomly cropped (4-pixel zero padding), flipped and normalised batches by [`Batches`] with the
//! trainer's configuration ([`BatchConfig::train`]: prefetched on a worker thread), each batch converted
//! to the trainer's [`HostBatch`] and stepped through [`TrainingStep`] (swa-models' own `sgd_step`), as
//! `swa_models::Trainer::run_epoch` iterates an epoch of `cargo xtask reproduce`'s data source. Reading
//! the files and one warm-up step are not timed; everything from the first batch's shuffle to the last
//! step's update is.
//!
//! With a [`TorchRunner`], `torch_ref.py epoch` runs the same loop in PyTorch: it reads the binary files
//! itself with numpy, shuffles, crops with the same padding, flips, normalises (vectorised over the batch)
//! and steps at the same batch size with the same threads. The measurement runs in rounds, alternating
//! the two sides as the training suite does; the ratio of each round's figures is reported, its minimum
//! being the worst round.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use swa_data::{BatchConfig, Batches, DatasetKind, Normalization};
use swa_models::{Architecture, HostBatch};

use crate::report::Figure;
use crate::stats::{RoundRatios, Summary};
use crate::timing::{wall, TimedBackend};
use crate::torch::TorchRunner;
use crate::workload::TrainingStep;
use crate::{BenchError, Recorder};

/// The environment variable naming the CIFAR-10 folder when `--data` is not given.
pub const DATA_ENV: &str = "SWA_CIFAR10_DIR";

/// The networks of the epoch slice by default.
pub const EPOCH_NETWORKS: [&str; 1] = ["preresnet20"];

/// The seed of the shuffle and augmentation of the slices (the epoch number varies per round).
const SEED: u64 = 1;

/// Where the CIFAR-10 files come from, and what said so (for the report's notes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataLocation {
    /// The folder (or archive) swa-data detects CIFAR-10 in.
    pub path: PathBuf,
    /// `--data` or the environment variable.
    pub source: &'static str,
}

/// The CIFAR-10 location from the `--data` flag, or else from the value of [`DATA_ENV`] (an empty
/// value counts as unset); `None` when neither names one.
pub fn data_location(flag: Option<&Path>, env: Option<OsString>) -> Option<DataLocation> {
    if let Some(path) = flag {
        return Some(DataLocation {
            path: path.to_path_buf(),
            source: "--data",
        });
    }
    env.filter(|value| !value.is_empty())
        .map(|value| DataLocation {
            path: PathBuf::from(value),
            source: DATA_ENV,
        })
}

/// The normalisation of `network`'s recipe, as `cargo xtask reproduce` chooses it: the original SWA
/// code's ImageNet statistics for VGG, CIFAR's for the others. (Either costs the same; the choice keeps
/// the PyTorch side's inputs those of the same recipe.)
pub fn normalization_of(network: Architecture) -> Normalization {
    match network {
        Architecture::Vgg16 | Architecture::Vgg16Bn => Normalization::ImageNetStats,
        _ => Normalization::CifarStats,
    }
}

/// How much of an epoch to time, and how often.
#[derive(Clone, Copy, Debug)]
pub struct SlicePlan {
    /// Batches per timed slice.
    pub batches: usize,
    /// Images per batch.
    pub batch: usize,
    /// Rounds; each times one slice of swa-rs's, then one of PyTorch's.
    pub rounds: usize,
}

/// A swa-data batch as the trainer's [`HostBatch`], moved rather than copied (as `cargo xtask reproduce`
/// hands its batches to the trainer).
fn host(batch: swa_data::Batch) -> HostBatch {
    let shape = batch.shape();
    HostBatch {
        images: batch.images,
        shape,
        labels: batch.labels,
    }
}

/// Times `plan.rounds` slices of `plan.batches` batches of training `architecture` on the CIFAR-10 of
/// `data`, and PyTorch's same loop once per round when `torch` is given; `cpu` names the processor in
/// the notes.
#[allow(clippy::too_many_arguments)]
pub fn run_network<B: TimedBackend>(
    backend: &B,
    suite: &str,
    architecture: Architecture,
    data: &DataLocation,
    plan: SlicePlan,
    torch: Option<&TorchRunner>,
    cpu: &str,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    let splits = swa_data::load_kind(DatasetKind::Cifar10, &data.path)?;
    let classes = splits.train.num_classes();
    let pipeline = Batches::new(
        Arc::new(splits.train),
        BatchConfig::train(plan.batch, normalization_of(architecture), SEED),
    )?;
    let per_epoch = pipeline.batches_per_epoch();
    if plan.batches == 0 || plan.batches > per_epoch {
        return Err(BenchError::Setup(format!(
            "an epoch slice of {} batches: an epoch of CIFAR-10 at batch {} has {per_epoch}",
            plan.batches, plan.batch
        )));
    }
    let mut trainer = TrainingStep::new(architecture.build(backend, classes, 0)?);
    // The warm-up step takes a batch from an epoch that no round times.
    let warm_up = pipeline
        .epoch(0)
        .next()
        .ok_or_else(|| BenchError::NoSamples("a warm-up batch of CIFAR-10".into()))?;
    trainer.run(backend, &host(warm_up))?;

    let name = architecture.to_string();
    let label = format!("{name} b{}×{} CIFAR-10", plan.batch, plan.batches);
    let images = (plan.batch * plan.batches) as f64;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut ratios = RoundRatios::default();
    let mut torch = torch;
    for round in 0..plan.rounds.max(1) {
        let epoch = round as u64 + 1;
        let (stepped, time) = wall(backend, || {
            let mut stepped = 0;
            for batch in pipeline.epoch(epoch).take(plan.batches) {
                trainer.run(backend, &host(batch))?;
                stepped += 1;
            }
            Ok(stepped)
        })?;
        if stepped != plan.batches {
            return Err(BenchError::NoSamples(format!(
                "{label}: the pipeline gave {stepped} batches"
            )));
        }
        let rate = images / time.as_secs_f64();
        ours.push(rate);
        if let Some(runner) = torch {
            match runner.epoch_images_per_second(&name, &data.path, plan.batches, plan.batch, epoch)
            {
                Ok(value) => {
                    theirs.push(value);
                    ratios.add(Some(rate), Some(value));
                }
                Err(e) => {
                    recorder.note(suite, format!("PyTorch on {label}: {e}"));
                    torch = None;
                }
            }
        }
    }
    drop(trainer);

    let mine = Summary::of(&ours).ok_or_else(|| BenchError::NoSamples(label.clone()))?;
    let how = format!(
        "swa-data batches (shuffle, crop, flip, normalise; prefetch {}) into the trainer's step; \
         data from {} ({})",
        pipeline.config().prefetch,
        data.path.display(),
        data.source
    );
    let mut figure = Figure::new(suite, format!("{label} epoch slice"), "img/s", mine).note(how);
    let torch_images = Summary::of(&theirs);
    if let Some(torch) = &torch_images {
        figure = figure.against("PyTorch", torch.median, None);
    }
    recorder.push(figure);
    if let Some(torch) = torch_images {
        recorder.push(
            Figure::new(
                suite,
                format!("PyTorch {label} epoch slice"),
                "img/s",
                torch,
            )
            .note("torch_ref.py epoch: numpy reads, crops, flips and normalises each batch in the loop"),
        );
    }
    if let Some(per_round) = ratios.summary() {
        recorder.push(
            Figure::new(
                suite,
                format!("{label} epoch slice / PyTorch, per round"),
                "×",
                per_round,
            )
            .with_ratio("PyTorch", per_round.median, None)
            .note(format!(
                "each round's slice over that round's PyTorch slice; min is the worst round; {cpu}"
            )),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_over_the_environment_and_an_empty_variable_is_unset() {
        let flag = Path::new("/data/flag");
        assert_eq!(
            data_location(Some(flag), Some("/data/env".into())),
            Some(DataLocation {
                path: flag.to_path_buf(),
                source: "--data"
            })
        );
        assert_eq!(
            data_location(None, Some("/data/env".into())),
            Some(DataLocation {
                path: PathBuf::from("/data/env"),
                source: DATA_ENV
            })
        );
        assert_eq!(data_location(None, Some(OsString::new())), None);
        assert_eq!(data_location(None, None), None);
    }

    #[test]
    fn vgg_is_normalised_with_imagenet_statistics_and_the_rest_with_cifar_statistics() {
        assert_eq!(
            normalization_of(Architecture::Vgg16),
            Normalization::ImageNetStats
        );
        assert_eq!(
            normalization_of(Architecture::Vgg16Bn),
            Normalization::ImageNetStats
        );
        assert_eq!(
            normalization_of(Architecture::PreResNet { depth: 20 }),
            Normalization::CifarStats
        );
    }

    fn synthetic_cifar10(train_images: usize) -> Result<tempfile::TempDir, BenchError> {
        use swa_data::{synthetic, Layout, Packaging};
        let dir = tempfile::tempdir().map_err(|e| BenchError::Setup(e.to_string()))?;
        synthetic::write(
            DatasetKind::Cifar10,
            Layout::Binary,
            Packaging::Folder,
            dir.path(),
            train_images,
            3,
        )?;
        Ok(dir)
    }

    #[test]
    fn a_slice_trains_on_files_through_the_pipeline_and_records_one_rate_per_round(
    ) -> Result<(), BenchError> {
        let dir = synthetic_cifar10(24)?;
        let data = DataLocation {
            path: dir.path().to_path_buf(),
            source: "--data",
        };
        let backend = swa_core::CpuBackend::with_threads(1);
        let mut recorder = Recorder::default();
        let plan = SlicePlan {
            batches: 2,
            batch: 8,
            rounds: 2,
        };
        run_network(
            &backend,
            "epoch",
            Architecture::PreResNet { depth: 20 },
            &data,
            plan,
            None,
            "test CPU",
            &mut recorder,
        )?;
        assert_eq!(recorder.figures.len(), 1, "{:?}", recorder.figures);
        let figure = &recorder.figures[0];
        assert_eq!(figure.name, "preresnet20 b8×2 CIFAR-10 epoch slice");
        assert_eq!(figure.summary.runs, 2);
        assert!(figure.summary.min > 0.0);
        assert!(figure.comparison.is_none());
        Ok(())
    }

    #[test]
    fn a_slice_longer_than_an_epoch_is_refused_before_training() -> Result<(), BenchError> {
        let dir = synthetic_cifar10(24)?;
        let data = DataLocation {
            path: dir.path().to_path_buf(),
            source: DATA_ENV,
        };
        let backend = swa_core::CpuBackend::with_threads(1);
        let plan = SlicePlan {
            batches: 4,
            batch: 8,
            rounds: 1,
        };
        let result = run_network(
            &backend,
            "epoch",
            Architecture::PreResNet { depth: 20 },
            &data,
            plan,
            None,
            "test CPU",
            &mut Recorder::default(),
        );
        assert!(
            matches!(&result, Err(BenchError::Setup(m)) if m.contains("has 3")),
            "{result:?}"
        );
        Ok(())
    }
}
