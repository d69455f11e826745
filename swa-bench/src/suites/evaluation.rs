//! Evaluation and BatchNorm-recomputation throughput of the paper's networks, against PyTorch.
//!
//! Loss-surface surveys, Fast Geometric Ensembling and SWAG evaluate many weight sets, each after a
//! BatchNorm recomputation pass, so these two passes, not training, set their pace. Both are measured as
//! users call them: [`swa_models::evaluate::evaluate`] (evaluation-mode forward pass, logits read back,
//! loss and accuracy) and [`swa_models::update_bn`] (reset, then one recomputation-mode forward pass per
//! batch), over the same random batches, each timed pass covering all of them. Networks without
//! BatchNorm (VGG-16) have no `update_bn` figure: the function returns at once for them.
//!
//! With a [`TorchRunner`], PyTorch does the same work on the reference script's network (see
//! `torch/eval_probe.py`: `model.eval()` under `torch.no_grad()` with the loss and predictions, and
//! `torch.optim.swa_utils.update_bn` over a list of batches), with the same threads. The measurement runs
//! in rounds, as in the training suite: each round times swa-rs's passes and then one PyTorch run of as
//! many passes, so that a machine whose speed drifts slows both sides alike. Besides the ratio of the
//! medians over all passes, the ratio of each round's medians is reported: its minimum is the worst
//! round.

use swa_models::bn::has_batch_norm;
use swa_models::evaluate::evaluate;
use swa_models::{update_bn, Architecture, HostBatch};

use crate::report::{Figure, Target};
use crate::stats::{self, Summary};
use crate::timing::{wall, TimedBackend};
use crate::torch::{EvaluationRates, TorchRunner};
use crate::workload::random_batch;
use crate::{BenchError, Recorder, CLASSES};

/// The networks of the evaluation figures: the smallest PreResNet, and VGG-16 without and with BatchNorm.
pub const EVALUATION_NETWORKS: [&str; 3] = ["preresnet20", "vgg16", "vgg16bn"];

/// The evaluation throughput the project aims for, as a multiple of PyTorch's.
pub const EVAL_TARGET: f64 = 1.5;

/// The `update_bn` throughput the project aims for, as a multiple of PyTorch's.
pub const UPDATE_BN_TARGET: f64 = 1.3;

/// How much to run per network.
#[derive(Clone, Copy, Debug)]
pub struct EvaluationPlan {
    /// Images per batch.
    pub batch: usize,
    /// Batches per timed pass.
    pub batches: usize,
    /// Timed passes of each function per round, on each side.
    pub passes: usize,
    /// Rounds; each times swa-rs's passes, then one PyTorch run of as many passes.
    pub rounds: usize,
}

/// The figures of one function on one side: every pass's img/s, and each round's median.
#[derive(Debug, Default)]
struct Side {
    passes: Vec<f64>,
    round_medians: Vec<f64>,
}

impl Side {
    fn add_round(&mut self, rates: &[f64]) {
        if let Some(round) = Summary::of(rates) {
            self.passes.extend_from_slice(rates);
            self.round_medians.push(round.median);
        }
    }
}

/// Measures [`evaluate`] and [`update_bn`] on `architecture` as `plan` says, and PyTorch's same work when
/// `torch` is given; `cpu` names the processor in the ratio figures' notes.
pub fn run_network<B: TimedBackend>(
    backend: &B,
    suite: &str,
    architecture: Architecture,
    plan: EvaluationPlan,
    torch: Option<&TorchRunner>,
    cpu: &str,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    let mut model = architecture.build(backend, CLASSES, 0)?;
    let batches: Vec<HostBatch> = (0..plan.batches.max(1))
        .map(|i| random_batch(plan.batch, CLASSES, 200 + i as u32))
        .collect();
    let images = (batches.len() * plan.batch) as f64;
    let recomputes = has_batch_norm(model.as_ref());
    // One untimed pass of each, so that neither pays for first-touch allocations.
    evaluate(backend, model.as_mut(), &batches)?;
    if recomputes {
        update_bn(backend, model.as_mut(), &batches, 0)?;
    }

    let name = architecture.to_string();
    let (mut eval, mut recompute) = (Side::default(), Side::default());
    let (mut torch_eval, mut torch_recompute) = (Side::default(), Side::default());
    let mut torch = torch;
    for round in 0..plan.rounds.max(1) {
        let mut times = Vec::with_capacity(plan.passes);
        for _ in 0..plan.passes.max(1) {
            let (_, time) = wall(backend, || Ok(evaluate(backend, model.as_mut(), &batches)?))?;
            times.push(time);
        }
        eval.add_round(&stats::rates(images, &times));
        if recomputes {
            times.clear();
            for pass in 0..plan.passes.max(1) {
                let seed = (round * plan.passes + pass) as u64;
                let (_, time) = wall(backend, || {
                    Ok(update_bn(backend, model.as_mut(), &batches, seed)?)
                })?;
                times.push(time);
            }
            recompute.add_round(&stats::rates(images, &times));
        }
        if let Some(runner) = torch {
            match runner.evaluation_images_per_second(
                &name,
                plan.batch,
                batches.len(),
                plan.passes.max(1),
            ) {
                Ok(EvaluationRates { eval, update_bn }) => {
                    torch_eval.add_round(&eval);
                    torch_recompute.add_round(&update_bn);
                }
                Err(e) => {
                    recorder.note(suite, format!("PyTorch on {name}: {e}"));
                    torch = None;
                }
            }
        }
    }
    drop(model);

    let label = format!("{name} b{}×{}", plan.batch, batches.len());
    let what = [
        ("evaluate", eval, torch_eval, EVAL_TARGET),
        ("update_bn", recompute, torch_recompute, UPDATE_BN_TARGET),
    ];
    for (function, ours, theirs, target) in what {
        if ours.passes.is_empty() {
            continue;
        }
        record(
            suite, &label, function, &ours, &theirs, target, cpu, recorder,
        )?;
    }
    Ok(())
}

/// Records one function's figures: swa-rs's img/s against PyTorch's median, PyTorch's img/s, and the
/// ratio of each round's medians.
#[allow(clippy::too_many_arguments)]
fn record(
    suite: &str,
    label: &str,
    function: &str,
    ours: &Side,
    theirs: &Side,
    target: f64,
    cpu: &str,
    recorder: &mut Recorder,
) -> Result<(), BenchError> {
    let what = format!("{function} {label}");
    let mine = Summary::of(&ours.passes).ok_or_else(|| BenchError::NoSamples(what.clone()))?;
    let mut figure = Figure::new(suite, what.clone(), "img/s", mine);
    let torch = Summary::of(&theirs.passes);
    if let Some(torch) = &torch {
        figure = figure.against("PyTorch", torch.median, Some(Target::MinRatio(target)));
    }
    recorder.push(figure);
    let Some(torch) = torch else {
        return Ok(());
    };
    recorder.push(
        Figure::new(suite, format!("PyTorch {what}"), "img/s", torch)
            .note("torch/eval_probe.py on torch_ref.py's network, one run per round"),
    );
    let ratios: Vec<f64> = ours
        .round_medians
        .iter()
        .zip(&theirs.round_medians)
        .map(|(mine, torch)| mine / torch)
        .collect();
    if let Some(per_round) = Summary::of(&ratios) {
        recorder.push(
            Figure::new(
                suite,
                format!("{what} / PyTorch, per round"),
                "×",
                per_round,
            )
            .with_ratio("PyTorch", per_round.median, Some(Target::MinRatio(target)))
            .note(format!(
                "ratio of each round's medians; min is the worst round; {cpu}"
            )),
        );
    }
    Ok(())
}
