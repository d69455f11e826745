//! Augmented training batches per second from swa-data, on a synthetic CIFAR-10 training split held in
//! memory (no files): shuffling, random crops with padding, flips and normalisation, at batch 128.
//!
//! Measured twice: batches built on demand by the caller (the pipeline's raw speed, parallel over the
//! images of a batch), and with a prefetching worker thread, as training uses it.

use std::sync::Arc;

use swa_data::synthetic::{generate, SyntheticSpec};
use swa_data::{BatchConfig, Batches, DatasetKind, Layout, Normalization, Packaging};

use crate::report::Figure;
use crate::timing::wall;
use crate::{rates, BenchError, Recorder, BATCH};

/// Measures `runs` epochs of `batches` batches each, without and with prefetching.
pub fn run(
    suite: &str,
    batches: usize,
    runs: usize,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    let spec = SyntheticSpec {
        train_images: batches * BATCH,
        test_images: 1,
        ..SyntheticSpec::new(
            DatasetKind::Cifar10,
            Layout::Binary,
            Packaging::Folder,
            1,
            3,
        )
    };
    let dataset = Arc::new(generate(&spec)?.train);
    let cpu = swa_core::CpuBackend::with_threads(1);
    for prefetch in [0usize, 4] {
        let config = BatchConfig {
            prefetch,
            ..BatchConfig::train(BATCH, Normalization::CifarStats, 1)
        };
        let pipeline = Batches::new(Arc::clone(&dataset), config)?;
        let epoch = |e: u64| -> Result<usize, BenchError> {
            Ok(pipeline.epoch(e).map(|batch| batch.len()).sum::<usize>())
        };
        epoch(0)?;
        let mut times = Vec::with_capacity(runs);
        for run in 1..=runs {
            let (images, time) = wall(&cpu, || epoch(run as u64))?;
            if images != batches * BATCH {
                return Err(BenchError::NoSamples(format!(
                    "an epoch of {images} images, expected {}",
                    batches * BATCH
                )));
            }
            times.push(time);
        }
        let summary = rates(batches as f64, &times, "augmented batches")?;
        let how = if prefetch == 0 {
            "built on demand".to_string()
        } else {
            format!("prefetch {prefetch}")
        };
        recorder.push(
            Figure::new(
                suite,
                format!("augmented CIFAR batches b{BATCH}, {how}"),
                "batch/s",
                summary,
            )
            .note(format!(
                "{:.0} img/s; epochs of {batches} batches",
                summary.median * BATCH as f64
            )),
        );
    }
    Ok(())
}
