//! What SWA adds to training: one averaging update per epoch, and one BatchNorm recomputation pass.
//!
//! SWA averages once per epoch (391 steps at batch 128), so its cost is the update's time over an
//! epoch's; the target is at most 1%. Spans of training steps are timed with and without an update at
//! their end, alternately, to show the cost in place; but an update takes milliseconds and a span
//! seconds, so the span difference is mostly noise, and the isolated update time is what the
//! extrapolated percentage uses.
//!
//! `update_bn` runs a training-mode forward pass without caching activations; the target is that it be
//! no slower than an evaluation-mode forward pass over the same images.

use std::time::Duration;

use swa_core::averaging::{BufferPolicy, WeightAverage, WeightAveraging};
use swa_core::HasShape;
use swa_models::{update_bn, Architecture, HostBatch};

use crate::report::{Figure, Target};
use crate::stats::Summary;
use crate::timing::{repeat, wall, TimedBackend};
use crate::workload::{random_batch, TrainingStep};
use crate::{millis, rates, BenchError, Recorder, Settings, BATCH, CLASSES, STEPS_PER_EPOCH};

/// The most an epoch's averaging may cost, as a share of the epoch.
pub const AVERAGING_TARGET: f64 = 0.01;

/// How much to run.
#[derive(Clone, Copy, Debug)]
pub struct OverheadPlan {
    /// Training steps per timed span.
    pub span_steps: usize,
    /// Pairs of spans (one without, one with an update).
    pub span_pairs: usize,
    /// Timed isolated averaging updates.
    pub update_runs: usize,
    /// Batches of the BatchNorm recomputation and forward-only passes.
    pub bn_batches: usize,
    /// Timed passes of each.
    pub bn_runs: usize,
}

impl OverheadPlan {
    /// The plan for the settings: 2 pairs of 20-step spans, BN passes of 6 batches, 5 times each.
    pub fn for_settings(settings: &Settings) -> Self {
        if settings.quick {
            OverheadPlan {
                span_steps: 3,
                span_pairs: 1,
                update_runs: 5,
                bn_batches: 2,
                bn_runs: 1,
            }
        } else {
            OverheadPlan {
                span_steps: 20,
                span_pairs: 2,
                update_runs: 21,
                bn_batches: 6,
                bn_runs: 5,
            }
        }
    }
}

/// Measures the averaging overhead and the BN recomputation of PreResNet-20 at batch 128.
pub fn run<B: TimedBackend>(
    backend: &B,
    suite: &str,
    plan: OverheadPlan,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    let architecture = Architecture::PreResNet { depth: 20 };
    let mut trainer = TrainingStep::new(architecture.build(backend, CLASSES, 0)?);
    let batch = random_batch(BATCH, CLASSES, 7);
    trainer.run(backend, &batch)?;
    trainer.run(backend, &batch)?;

    let mut average = WeightAverage::swa(
        backend,
        trainer.model.as_ref(),
        BufferPolicy::RecomputeLater,
    )?;
    let mut params = 0usize;
    trainer.model.visit_tensors(&mut |_, role, t| {
        if role == swa_core::TensorRole::Parameter {
            params += t.numel();
        }
    });

    let mut without = Vec::new();
    let mut with = Vec::new();
    for pair in 0..plan.span_pairs {
        // Alternate which comes first so that drift in the machine's speed does not favour either.
        for averaged in [pair % 2 == 1, pair % 2 == 0] {
            let ((), time) = wall(backend, || {
                for _ in 0..plan.span_steps {
                    trainer.run(backend, &batch)?;
                }
                if averaged {
                    average.update(backend, trainer.model.as_ref())?;
                }
                Ok(())
            })?;
            if averaged {
                with.push(time);
            } else {
                without.push(time);
            }
        }
    }
    let steps = plan.span_steps as u32;
    let step_times: Vec<Duration> = without.iter().map(|t| *t / steps).collect();
    let step = millis(&step_times, "training step")?;
    recorder.push(
        Figure::new(
            suite,
            format!("PreResNet-20 b{BATCH} training step (span of {steps})"),
            "ms",
            step,
        )
        .note(format!("{:.1} img/s", BATCH as f64 / step.median * 1e3)),
    );
    recorder.push(Figure::new(
        suite,
        format!("span of {steps} steps, no averaging"),
        "ms",
        millis(&without, "span without averaging")?,
    ));
    recorder.push(Figure::new(
        suite,
        format!("span of {steps} steps + 1 WeightAverage::update"),
        "ms",
        millis(&with, "span with averaging")?,
    ));
    let differences: Vec<f64> = with
        .iter()
        .zip(&without)
        .map(|(w, o)| (w.as_secs_f64() - o.as_secs_f64()) * 1e3)
        .collect();
    if let Some(difference) = Summary::of(&differences) {
        recorder.push(
            Figure::new(suite, "span difference (with − without)", "ms", difference)
                .note("dominated by run-to-run noise of the spans; see the isolated update"),
        );
    }

    let updates = repeat(backend, 1, plan.update_runs, |b| {
        average
            .update(b, trainer.model.as_ref())
            .map_err(BenchError::from)
    })?;
    let update = millis(&updates, "isolated SWA update")?;
    recorder.push(
        Figure::new(
            suite,
            format!("WeightAverage::update of PreResNet-20 ({params} params)"),
            "ms",
            update,
        )
        .note("timed alone"),
    );
    let epoch_ms = step.median * STEPS_PER_EPOCH as f64;
    recorder.push(
        Figure::new(
            suite,
            format!("averaging cost per epoch (1 update / {STEPS_PER_EPOCH} steps)"),
            "%",
            update.scaled(100.0 / epoch_ms),
        )
        .with_ratio(
            "an epoch",
            update.median / epoch_ms,
            Some(Target::MaxRatio(AVERAGING_TARGET)),
        )
        .note(format!(
            "epoch = {STEPS_PER_EPOCH} × median step = {:.1} s",
            epoch_ms / 1e3
        )),
    );

    bn_recompute(backend, suite, plan, &mut trainer, step.median, recorder)
}

/// `update_bn` against a forward-only pass over the same batches.
fn bn_recompute<B: TimedBackend>(
    backend: &B,
    suite: &str,
    plan: OverheadPlan,
    trainer: &mut TrainingStep<B>,
    step_ms: f64,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    let batches: Vec<HostBatch> = (0..plan.bn_batches)
        .map(|i| random_batch(BATCH, CLASSES, 100 + i as u32))
        .collect();
    let images = (plan.bn_batches * BATCH) as f64;
    // One untimed pass of each, so neither pays for first-touch allocations.
    for batch in &batches {
        trainer.forward_eval(backend, batch)?;
    }
    update_bn(backend, trainer.model.as_mut(), batches.clone(), 0)?;

    let mut forward = Vec::new();
    let mut recompute = Vec::new();
    for run in 0..plan.bn_runs {
        for recomputing in [run % 2 == 1, run % 2 == 0] {
            // update_bn takes its batches by value: the copy is made before the clock starts.
            let owned = batches.clone();
            let ((), time) = wall(backend, || {
                if recomputing {
                    update_bn(backend, trainer.model.as_mut(), owned, run as u64)?;
                } else {
                    for batch in &owned {
                        trainer.forward_eval(backend, batch)?;
                    }
                }
                Ok(())
            })?;
            if recomputing {
                recompute.push(time);
            } else {
                forward.push(time);
            }
        }
    }
    let forward = rates(images, &forward, "forward-only pass")?;
    let recompute = rates(images, &recompute, "update_bn pass")?;
    recorder.push(Figure::new(
        suite,
        format!(
            "forward-only pass (eval), {} × {BATCH} images",
            plan.bn_batches
        ),
        "img/s",
        forward,
    ));
    recorder.push(
        Figure::new(
            suite,
            format!("update_bn pass, {} × {BATCH} images", plan.bn_batches),
            "img/s",
            recompute,
        )
        .against("forward-only", forward.median, Some(Target::MinRatio(1.0))),
    );
    // The pass over the 50 000 training images against an epoch of training steps.
    let pass_ms = 1e3 * STEPS_PER_EPOCH as f64 * BATCH as f64 / recompute.median;
    let epoch_ms = step_ms * STEPS_PER_EPOCH as f64;
    let share = Summary {
        median: pass_ms / epoch_ms,
        min: 1e3 * BATCH as f64 / recompute.max / step_ms,
        max: 1e3 * BATCH as f64 / recompute.min / step_ms,
        runs: recompute.runs,
    };
    recorder.push(
        Figure::new(
            suite,
            "BN recompute pass as a share of an epoch",
            "%",
            share.scaled(100.0),
        )
        .note("one update_bn pass over an epoch's images vs the epoch's training steps"),
    );
    Ok(())
}
