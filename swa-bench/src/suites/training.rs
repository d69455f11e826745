//! Training throughput of the paper's networks, against the GEMM peak and PyTorch.
//!
//! Each network trains at batch 128 on random data with SGD (momentum 0.9, weight decay 5·10⁻⁴): one
//! untimed warm-up step, then steps timed one by one, each including the upload of the batch and the
//! read-back of the loss, as swa-models' trainer takes them. GFLOP/s counts three times the forward
//! pass's convolution and linear FLOPs per image (forward, input gradient, weight gradient).
//!
//! With a [`TorchRunner`], PyTorch trains the same network (from the project's reference script) at the
//! same batch with the same threads, and the ratio of the two medians is reported. The measurement runs
//! in [`Rounds`]: each round times swa-rs's steps and then one PyTorch run, so that a machine whose speed
//! drifts (a shared VM) slows both sides alike instead of whichever happened to run later.

use swa_models::Architecture;

use crate::flops::forward_flops_per_image;
use crate::report::Figure;
use crate::stats::Summary;
use crate::timing::{wall, TimedBackend};
use crate::torch::TorchRunner;
use crate::workload::{random_batch, TrainingStep};
use crate::{rates, BenchError, Recorder, CLASSES};

/// The networks of the training figures: the paper's smallest and deepest PreResNets, VGG-16, and a
/// small WideResNet (WRN-28-10 takes minutes per step on a few cores).
pub const PAPER_NETWORKS: [&str; 4] = ["preresnet20", "preresnet164", "vgg16", "wrn16x4"];

/// How many training steps to time, and in how many alternating rounds with PyTorch.
#[derive(Clone, Copy, Debug)]
pub struct Rounds {
    /// Timed swa-rs steps per round.
    pub steps: usize,
    /// Rounds; each times `steps` swa-rs steps, then one PyTorch run when PyTorch is measured.
    pub rounds: usize,
}

/// Throughput of one network.
#[derive(Clone, Copy, Debug)]
pub struct NetworkThroughput {
    /// Training images per second.
    pub images_per_second: Summary,
    /// Forward-pass FLOPs per image.
    pub forward_flops: u64,
}

/// Trains `architecture` at `batch` for the timed steps of `rounds` and records img/s and GFLOP/s
/// (compared with `peak` when given), and PyTorch's img/s, one run per round, when `torch` is given.
#[allow(clippy::too_many_arguments)]
pub fn run_network<B: TimedBackend>(
    backend: &B,
    suite: &str,
    architecture: Architecture,
    batch: usize,
    rounds: Rounds,
    peak: Option<(&str, f64)>,
    torch: Option<&TorchRunner>,
    recorder: &mut Recorder,
) -> Result<NetworkThroughput, BenchError> {
    let forward_flops = forward_flops_per_image(architecture, CLASSES)?;
    let mut trainer = TrainingStep::new(architecture.build(backend, CLASSES, 0)?);
    let data = random_batch(batch, CLASSES, 11);
    trainer.run(backend, &data)?;
    let name = architecture.to_string();
    let mut times = Vec::with_capacity(rounds.steps * rounds.rounds);
    let mut torch_runs = Vec::new();
    let mut torch = torch;
    for _ in 0..rounds.rounds.max(1) {
        for _ in 0..rounds.steps {
            let (_, time) = wall(backend, || trainer.run(backend, &data))?;
            times.push(time);
        }
        if let Some(runner) = torch {
            match runner.train_images_per_second(&name, batch) {
                Ok(value) => torch_runs.push(value),
                Err(e) => {
                    recorder.note(suite, format!("PyTorch on {name}: {e}"));
                    torch = None;
                }
            }
        }
    }
    drop(trainer);
    let images = rates(batch as f64, &times, "training step")?;
    let mut figure = Figure::new(suite, format!("{name} b{batch} training"), "img/s", images);
    let torch_images = Summary::of(&torch_runs);
    if let Some(theirs) = &torch_images {
        figure = figure.against("PyTorch", theirs.median, None);
    }
    recorder.push(figure);
    if let Some(theirs) = torch_images {
        recorder.push(
            Figure::new(
                suite,
                format!("PyTorch {name} b{batch} training"),
                "img/s",
                theirs,
            )
            .note("torch_ref.py: mean over 6 steps after a warm-up step, one run per round"),
        );
    }

    let gflop_per_image = 3.0 * forward_flops as f64 / 1e9;
    let mut gflops = Figure::new(
        suite,
        format!("{name} b{batch} training compute"),
        "GFLOP/s",
        images.scaled(gflop_per_image),
    )
    .note(format!(
        "3 × {:.3} GFLOP forward per image",
        forward_flops as f64 / 1e9
    ));
    if let Some((what, value)) = peak {
        gflops = gflops.against(what, value, None);
    }
    recorder.push(gflops);
    Ok(NetworkThroughput {
        images_per_second: images,
        forward_flops,
    })
}
