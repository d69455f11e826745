//! Images per second of the ImageNet input pipeline: JPEG decoding and torchvision's training transform
//! (`RandomResizedCrop(224)`, flip, normalisation) into batches, swa-data's `FolderBatches` against
//! torchvision's `ImageFolder` and `DataLoader` on the same files in the same run.
//!
//! The files are synthetic JPEGs of ImageNet's typical size (500×375, quality 90) written once into a
//! temporary folder. Each round times one epoch of ours (decoding on `threads` worker threads, batches
//! prefetched), then one of torchvision's (`num_workers = threads` worker processes, kept across epochs,
//! the first epoch untimed); the ratio of the two is taken per round. The figure is what training waits
//! for: decoded, augmented, normalised NCHW batches.

use std::sync::Arc;

use swa_data::synthetic::{write_image_folder, ImageFolderSpec};
use swa_data::{FolderBatchConfig, FolderBatches, ImageFolder};

use crate::report::Figure;
use crate::stats::{RoundRatios, Summary};
use crate::timing::wall;
use crate::torch::TorchRunner;
use crate::{rates, BenchError, Recorder};

/// Batch size of the pipeline (torchvision's reference ImageNet training uses 32 per GPU).
pub const FOLDER_BATCH: usize = 32;
/// ImageNet's typical image size.
const WIDTH: u32 = 500;
const HEIGHT: u32 = 375;
const CLASSES: usize = 4;

/// What to measure.
#[derive(Clone, Copy, Debug)]
pub struct FolderPlan {
    /// Images in the folder (one epoch).
    pub images: usize,
    /// Decoding threads (ours) and worker processes (torchvision's).
    pub threads: usize,
    /// Alternating rounds.
    pub rounds: usize,
}

/// Writes the folder, then measures `plan.rounds` epochs of each side.
pub fn run(
    suite: &str,
    plan: FolderPlan,
    torch: Option<&TorchRunner>,
    cpu: &str,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    let dir = tempfile::tempdir()
        .map_err(|e| BenchError::Setup(format!("a temporary folder for the JPEGs: {e}")))?;
    let spec = ImageFolderSpec::jpeg(CLASSES, plan.images.div_ceil(CLASSES), WIDTH, HEIGHT);
    write_image_folder(&spec, dir.path())?;
    let folder = Arc::new(ImageFolder::open(dir.path())?);
    let images = folder.len();
    let config = FolderBatchConfig {
        workers: Some(plan.threads.max(1)),
        ..FolderBatchConfig::train(FOLDER_BATCH, 1)
    };
    let pipeline = FolderBatches::new(folder, config)?;
    let epoch = |e: u64| -> Result<usize, BenchError> {
        let mut count = 0;
        for batch in pipeline.epoch(e) {
            count += batch?.len();
        }
        Ok(count)
    };
    // Warm-up: file cache and thread pools.
    epoch(0)?;
    let cpu_backend = swa_core::CpuBackend::with_threads(1);
    let (mut times, mut theirs, mut ratios) = (Vec::new(), Vec::new(), RoundRatios::default());
    let mut torch = torch;
    for round in 1..=plan.rounds.max(1) {
        let (count, time) = wall(&cpu_backend, || epoch(round as u64))?;
        if count != images {
            return Err(BenchError::NoSamples(format!(
                "an epoch of {count} images, expected {images}"
            )));
        }
        times.push(time);
        let ours_round = Summary::rates(images as f64, &[time]).map(|s| s.median);
        if let Some(runner) = torch {
            match runner.folder_images_per_second(dir.path(), FOLDER_BATCH, plan.threads) {
                Ok(value) => {
                    theirs.push(value);
                    ratios.add(ours_round, Some(value));
                }
                Err(e) => {
                    recorder.note(suite, format!("torchvision's ImageFolder: {e}"));
                    torch = None;
                }
            }
        }
    }
    let ours = rates(images as f64, &times, "ImageFolder epoch")?;
    let label = format!(
        "ImageFolder JPEG {WIDTH}x{HEIGHT} -> 224 train transform b{FOLDER_BATCH}, {} threads",
        plan.threads
    );
    let mut figure = Figure::new(suite, label.clone(), "img/s", ours).note(format!(
        "{:.0} img/s per thread; epochs of {images} images",
        ours.median / plan.threads.max(1) as f64
    ));
    if let Some(summary) = Summary::of(&theirs) {
        figure = figure.against("torchvision", summary.median, None);
        recorder.push(figure);
        recorder.push(
            Figure::new(suite, format!("torchvision {label}"), "img/s", summary).note(
                "ImageFolder + DataLoader(num_workers = threads, persistent workers), one epoch a round after an untimed one",
            ),
        );
    } else {
        recorder.push(figure);
    }
    if let Some(per_round) = ratios.summary() {
        recorder.push(
            Figure::new(suite, format!("{label} / torchvision, per round"), "×", per_round)
                .with_ratio("torchvision", per_round.median, None)
                .note(format!("each round's epoch rate over that round's torchvision epoch; min is the worst round; {cpu}")),
        );
    }
    Ok(())
}
