//! Where the trainer's step spends its time, layer by layer, on the CPU.
//!
//! Each network trains on random data through the trainer's own step (as in the training suite), on an
//! [`OpProfiler`] around the CPU backend, for one untimed warm-up step and then `steps` profiled steps.
//! Every operation and shape gets one row: the median over the steps of its time per step and its share
//! of the step, and for convolutions (forward; input and weight gradients together) the achieved GFLOP/s
//! against the GEMM peak measured in the same run. A last row is the time no layer operation accounts for
//! (the optimiser's update, the batch's upload, the loss read back, the bookkeeping between calls).

use std::collections::BTreeMap;
use std::time::Instant;

use swa_core::CpuBackend;
use swa_models::Architecture;

use crate::profile::{OpKey, OpProfiler, OpTotals};
use crate::report::Figure;
use crate::stats::Summary;
use crate::workload::{image_side, random_batch_of_side, TrainingStep};
use crate::{BenchError, Recorder, CLASSES};

/// Rows whose median share of the step is below this fraction are summed into one row, so that a
/// network with many shapes (PreResNet-164) prints the layers that matter.
pub const MIN_SHARE: f64 = 0.005;

/// One operation and shape over the profiled steps.
#[derive(Debug, Default)]
struct Row {
    seconds: Vec<f64>,
    flops_per_step: u64,
    calls_per_step: u64,
}

/// Profiles `steps` training steps of `architecture` at `batch` on `backend` and records one figure per
/// operation and shape (see the module's documentation); `peak` is the GEMM peak the convolutions'
/// GFLOP/s are compared with.
pub fn run_network(
    backend: &CpuBackend,
    suite: &str,
    architecture: Architecture,
    batch: usize,
    steps: usize,
    peak: Option<(&str, f64)>,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    let profiler = OpProfiler::new(backend.clone());
    let mut trainer = TrainingStep::new(architecture.build(&profiler, CLASSES, 0)?);
    let data = random_batch_of_side(batch, image_side(architecture), CLASSES, 11);
    trainer.run(&profiler, &data)?;
    profiler.take();

    let steps = steps.max(1);
    let mut rows: BTreeMap<OpKey, Row> = BTreeMap::new();
    let mut step_seconds = Vec::with_capacity(steps);
    let mut unaccounted = Vec::with_capacity(steps);
    for _ in 0..steps {
        let start = Instant::now();
        trainer.run(&profiler, &data)?;
        let total = start.elapsed().as_secs_f64();
        let records = profiler.take();
        let timed: f64 = records.values().map(|t| t.seconds).sum();
        step_seconds.push(total);
        unaccounted.push((total - timed).max(0.0));
        for (
            key,
            OpTotals {
                calls,
                seconds,
                flops,
            },
        ) in records
        {
            let row = rows.entry(key).or_default();
            row.seconds.push(seconds);
            row.flops_per_step = flops;
            row.calls_per_step = calls;
        }
    }
    let label = format!("{architecture} b{batch}");
    let step = Summary::of(&step_seconds)
        .ok_or_else(|| BenchError::NoSamples(format!("{label} profiled step")))?;
    recorder.push(
        Figure::new(suite, format!("{label} step"), "ms", step.scaled(1e3)).note(format!(
            "{} profiled steps, every layer operation timed on its own",
            steps
        )),
    );

    let mut ranked: Vec<(OpKey, Row, Summary)> = rows
        .into_iter()
        .filter_map(|(key, row)| Summary::of(&row.seconds).map(|s| (key, row, s)))
        .collect();
    ranked.sort_by(|a, b| b.2.median.total_cmp(&a.2.median));
    let mut small = Vec::new();
    for (key, row, seconds) in ranked {
        let share = seconds.median / step.median;
        if share < MIN_SHARE {
            small.push(seconds.median);
            continue;
        }
        let name = format!("{label} {} {}", key.op, key.shape);
        let note = format!(
            "{:.1} ms/step ({:.1}% of the step), {} call{} per step",
            seconds.median * 1e3,
            share * 100.0,
            row.calls_per_step,
            if row.calls_per_step == 1 { "" } else { "s" }
        );
        let figure = if row.flops_per_step > 0 {
            let gflops: Vec<f64> = row
                .seconds
                .iter()
                .filter(|&&s| s > 0.0)
                .map(|s| row.flops_per_step as f64 / s / 1e9)
                .collect();
            let Some(summary) = Summary::of(&gflops) else {
                continue;
            };
            let mut figure = Figure::new(suite, name, "GFLOP/s", summary);
            if let Some((what, value)) = peak {
                figure = figure.against(what, value, None);
            }
            figure
        } else {
            Figure::new(suite, name, "ms", seconds.scaled(1e3))
        };
        recorder.push(figure.note(note));
    }
    if !small.is_empty() {
        let total: f64 = small.iter().sum();
        if let Some(summary) = Summary::of(&[total * 1e3]) {
            recorder.push(
                Figure::new(
                    suite,
                    format!("{label} {} other operations", small.len()),
                    "ms",
                    summary,
                )
                .note(format!(
                    "each under {:.1}% of the step; together {:.1}%",
                    MIN_SHARE * 100.0,
                    total / step.median * 100.0
                )),
            );
        }
    }
    if let Some(rest) = Summary::of(&unaccounted) {
        recorder.push(
            Figure::new(
                suite,
                format!("{label} outside layer operations"),
                "ms",
                rest.scaled(1e3),
            )
            .note(format!(
                "{:.1}% of the step: the optimiser's update, upload, loss read-back, bookkeeping",
                rest.median / step.median * 100.0
            )),
        );
    }
    Ok(())
}
