//! Loss-surface survey throughput: points per hour of `swa_models::geometry::run_survey`, the path of
//! `cargo xtask geometry`.
//!
//! Every point sets the weights, recomputes BatchNorm on the training images and evaluates the training
//! and test images, so a point costs `2·train + test` evaluation-mode forward passes; its pace is the
//! evaluation suite's figures over that many images. The survey here is the command's on a CPU by default
//! (PreResNet-20, 5 000 training and 10 000 test images of random data, batch 128), on points of the line
//! between two initialisations, evaluated as the command does by default: one probe using every thread.
//! The same points evaluated side by side, one single-threaded probe (a network of its own) per core,
//! are the reference: the ratio says whether splitting each point's work over the threads beats
//! evaluating points in parallel, which decides the command's default.

use std::time::Instant;

use swa_core::CpuBackend;
use swa_models::geometry::{
    line, linspace, run_survey, ParameterLayout, PointCache, SurfaceData, SurfaceProbe,
};
use swa_models::{Architecture, HostBatch};

use crate::report::Figure;
use crate::stats::Summary;
use crate::workload::random_batch;
use crate::{BenchError, Recorder, CLASSES};

/// What one survey measurement evaluates.
#[derive(Clone, Copy, Debug)]
pub struct SurveyPlan {
    /// The network.
    pub network: Architecture,
    /// Training images (BatchNorm recomputation and the train loss).
    pub train_images: usize,
    /// Test images.
    pub test_images: usize,
    /// Batch size.
    pub batch: usize,
    /// Points per timed survey.
    pub points: usize,
    /// Timed surveys of each arrangement, alternating.
    pub rounds: usize,
}

fn batches(images: usize, batch: usize, seed: u32) -> Vec<HostBatch> {
    (0..images.div_ceil(batch.max(1)))
        .map(|i| {
            let n = batch.min(images - i * batch);
            random_batch(n, CLASSES, seed + i as u32)
        })
        .collect()
}

/// Seconds per point of a survey of `plan.points` points, with `probes` probes of `threads` threads each.
fn seconds_per_point(
    plan: &SurveyPlan,
    data: SurfaceData<'_>,
    probes: usize,
    threads: usize,
    round: usize,
) -> Result<f64, BenchError> {
    let backend = CpuBackend::with_threads(threads);
    let build = |seed| plan.network.build(&backend, CLASSES, seed);
    let layout = ParameterLayout::of(build(0)?.as_ref());
    let a = layout.vector_from(&backend, build(1)?.as_ref())?;
    let b = layout.vector_from(&backend, build(2)?.as_ref())?;
    // Points of another round lie elsewhere on the line, so no round reads another's cache.
    let offset = round as f64;
    let survey = line(&a, &b, &linspace(offset, offset + 1.0, plan.points.max(1)))?;
    let dir = tempfile::tempdir()
        .map_err(|e| BenchError::Setup(format!("a temporary folder for the point cache: {e}")))?;
    let mut cache = PointCache::open(&dir.path().join("points.jsonl"), &survey, 0)?;
    let workers = (0..probes)
        .map(|_| -> Result<_, BenchError> {
            let backend = CpuBackend::with_threads(threads);
            let net = plan.network.build(&backend, CLASSES, 0)?;
            Ok(SurfaceProbe::new(backend, net, 5e-4))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    run_survey(&survey, data, workers, &mut cache, |_, _| {})?;
    Ok(started.elapsed().as_secs_f64() / plan.points.max(1) as f64)
}

/// Points per hour with one probe of all `threads`, against one single-threaded probe per thread.
pub fn run(
    suite: &str,
    plan: SurveyPlan,
    threads: usize,
    cpu: &str,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    let train = batches(plan.train_images, plan.batch, 300);
    let test = batches(plan.test_images, plan.batch, 900);
    let data = SurfaceData {
        train: &train,
        test: &test,
    };
    let threads = threads.max(1);
    let (mut one_probe, mut side_by_side) = (Vec::new(), Vec::new());
    for round in 0..plan.rounds.max(1) {
        one_probe.push(3600.0 / seconds_per_point(&plan, data, 1, threads, 2 * round)?);
        side_by_side.push(3600.0 / seconds_per_point(&plan, data, threads, 1, 2 * round + 1)?);
    }
    let name = format!(
        "{} survey, {} train + {} test images, b{}",
        plan.network, plan.train_images, plan.test_images, plan.batch
    );
    let what = |s: &str| format!("{name}: {s}");
    let ours = Summary::of(&one_probe).ok_or_else(|| BenchError::NoSamples(what("points")))?;
    let reference =
        Summary::of(&side_by_side).ok_or_else(|| BenchError::NoSamples(what("points")))?;
    recorder.push(
        Figure::new(
            suite,
            what(&format!("1 probe × {threads} threads")),
            "points/h",
            ours,
        )
        .against(
            format!("{threads} probes × 1 thread"),
            reference.median,
            None,
        )
        .note(format!(
            "run_survey as cargo xtask geometry runs it on a CPU; {} forward passes a point; {cpu}",
            2 * plan.train_images + plan.test_images
        )),
    );
    recorder.push(Figure::new(
        suite,
        what(&format!("{threads} probes × 1 thread")),
        "points/h",
        reference,
    ));
    Ok(())
}
