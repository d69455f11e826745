//! Training throughput and peak memory of the paper's networks, against the GEMM peak and PyTorch.
//!
//! Each network trains on random data with SGD (momentum 0.9, weight decay 5·10⁻⁴): one untimed warm-up
//! step, then steps timed one by one, each including the upload of the batch and the read-back of the
//! loss, as swa-models' trainer takes them. GFLOP/s counts three times the forward pass's convolution
//! and linear FLOPs per image (forward, input gradient, weight gradient). PreResNet-20 trains at batch 32,
//! 64, 128 and 256 by default ([`batch_sizes`]), the other networks at 128.
//!
//! With a [`TorchRunner`], PyTorch trains the same network (from the project's reference script) at the
//! same batch with the same threads, and the ratio of the two medians is reported. The measurement runs
//! in [`Rounds`]: each round times swa-rs's steps and then one PyTorch run, so that a machine whose speed
//! drifts (a shared VM) slows both sides alike instead of whichever happened to run later; the ratio of
//! each round's figures is reported too, its minimum being the worst round.
//!
//! With a [`SelfProbe`], each round also measures the peak resident memory of training, each side in a
//! child process of its own (see [`crate::memory`]): swa-rs re-executed, and `torch_ref.py peak` with
//! a [`TorchRunner`]. The target is a peak no larger than PyTorch's; the worst round is the largest ratio.

use swa_models::Architecture;

use crate::flops::forward_flops_per_image;
use crate::memory::{kib_to_mib, PeakRss, SelfProbe};
use crate::report::{Figure, Target};
use crate::stats::{RoundRatios, Summary};
use crate::timing::{wall, TimedBackend};
use crate::torch::TorchRunner;
use crate::workload::{image_side, random_batch_of_side, TrainingStep};
use crate::{rates, BenchError, Recorder, BATCH, CLASSES};

/// The networks of the training figures: the paper's smallest and deepest PreResNets, VGG-16, and a
/// small WideResNet (WRN-28-10 takes minutes per step on a few cores).
pub const PAPER_NETWORKS: [&str; 4] = ["preresnet20", "preresnet164", "vgg16", "wrn16x4"];

/// The network trained at every batch of [`SWEEP_BATCHES`] by default: the smallest, whose small
/// convolutions make the batch size matter most.
pub const SWEPT_NETWORK: Architecture = Architecture::PreResNet { depth: 20 };

/// The batch sizes of [`SWEPT_NETWORK`] by default.
pub const SWEEP_BATCHES: [usize; 4] = [32, 64, 128, 256];

/// The peak memory the project aims for, as a multiple of PyTorch's (at most).
pub const MEMORY_TARGET: f64 = 1.0;

/// The batch sizes `network` trains at: `chosen` when given (every network alike), otherwise
/// [`SWEEP_BATCHES`] for [`SWEPT_NETWORK`] and the paper's [`BATCH`] for the others.
pub fn batch_sizes(network: Architecture, chosen: Option<&[usize]>) -> Vec<usize> {
    match chosen {
        Some(batches) => batches.to_vec(),
        None if network == SWEPT_NETWORK => SWEEP_BATCHES.to_vec(),
        None => vec![BATCH],
    }
}

/// How many training steps to time, and in how many alternating rounds with PyTorch.
#[derive(Clone, Copy, Debug)]
pub struct Rounds {
    /// Timed swa-rs steps per round.
    pub steps: usize,
    /// Rounds; each times `steps` swa-rs steps, then one PyTorch run when PyTorch is measured.
    pub rounds: usize,
}

/// What the training figures are compared with.
#[derive(Clone, Copy, Debug, Default)]
pub struct References<'a> {
    /// A GFLOP/s peak and its name, for the compute figure.
    pub peak: Option<(&'a str, f64)>,
    /// PyTorch, for the speed and (with `memory`) the memory figures.
    pub torch: Option<&'a TorchRunner>,
    /// Measures swa-rs's peak memory in children, once per round.
    pub memory: Option<&'a SelfProbe>,
    /// The processor, named in the notes of the figures compared with PyTorch.
    pub cpu: &'a str,
}

/// Throughput of one network.
#[derive(Clone, Copy, Debug)]
pub struct NetworkThroughput {
    /// Training images per second.
    pub images_per_second: Summary,
    /// Forward-pass FLOPs per image.
    pub forward_flops: u64,
}

/// One side's resident memory over the rounds.
#[derive(Debug, Default)]
struct MemorySide {
    peaks: Vec<PeakRss>,
}

impl MemorySide {
    fn peak_mib(&self) -> Option<Summary> {
        Summary::of(&self.peaks.iter().map(PeakRss::peak_mib).collect::<Vec<_>>())
    }

    fn growth_mib(&self) -> Option<Summary> {
        Summary::of(
            &self
                .peaks
                .iter()
                .map(PeakRss::growth_mib)
                .collect::<Vec<_>>(),
        )
    }

    fn start_mib(&self) -> Option<Summary> {
        Summary::of(
            &self
                .peaks
                .iter()
                .map(|p| kib_to_mib(p.start_kib))
                .collect::<Vec<_>>(),
        )
    }
}

/// Trains `architecture` at `batch` for the timed steps of `rounds` and records img/s and GFLOP/s
/// (compared with the peak of `against` when given), PyTorch's img/s, one run per round, when
/// `against.torch` is given, and both sides' peak memory, one child each per round, when
/// `against.memory` is given.
pub fn run_network<B: TimedBackend>(
    backend: &B,
    suite: &str,
    architecture: Architecture,
    batch: usize,
    rounds: Rounds,
    against: References<'_>,
    recorder: &mut Recorder,
) -> Result<NetworkThroughput, BenchError> {
    let forward_flops = forward_flops_per_image(architecture, CLASSES)?;
    let mut trainer = TrainingStep::new(architecture.build(backend, CLASSES, 0)?);
    let data = random_batch_of_side(batch, image_side(architecture), CLASSES, 11);
    trainer.run(backend, &data)?;
    let name = architecture.to_string();
    let label = format!("{name} b{batch}");
    let mut times = Vec::with_capacity(rounds.steps * rounds.rounds);
    let mut torch_runs = Vec::new();
    let mut speed_ratios = RoundRatios::default();
    let (mut ours_memory, mut torch_memory) = (MemorySide::default(), MemorySide::default());
    let mut memory_ratios = RoundRatios::default();
    // A side that fails once is not asked again: the note says why, and the other figures still come.
    let mut torch_speed = against.torch;
    let mut torch_peak = against.torch.filter(|_| against.memory.is_some());
    let mut memory = against.memory;
    for _ in 0..rounds.rounds.max(1) {
        let mut round_times = Vec::with_capacity(rounds.steps);
        for _ in 0..rounds.steps {
            let (_, time) = wall(backend, || trainer.run(backend, &data))?;
            round_times.push(time);
        }
        let ours_round = Summary::rates(batch as f64, &round_times).map(|s| s.median);
        times.extend_from_slice(&round_times);
        if let Some(runner) = torch_speed {
            match runner.train_images_per_second(&name, batch) {
                Ok(value) => {
                    torch_runs.push(value);
                    speed_ratios.add(ours_round, Some(value));
                }
                Err(e) => {
                    recorder.note(suite, format!("PyTorch on {label}: {e}"));
                    torch_speed = None;
                }
            }
        }
        let Some(probe) = memory else { continue };
        let ours_peak = match probe.measure(architecture, batch) {
            Ok(peak) => peak,
            Err(e) => {
                recorder.note(suite, format!("peak memory of {label}: {e}"));
                memory = None;
                continue;
            }
        };
        ours_memory.peaks.push(ours_peak);
        if let Some(runner) = torch_peak {
            match runner.train_peak_rss(&name, batch, probe.steps) {
                Ok(theirs) => {
                    torch_memory.peaks.push(theirs);
                    memory_ratios.add(Some(ours_peak.peak_mib()), Some(theirs.peak_mib()));
                }
                Err(e) => {
                    recorder.note(suite, format!("PyTorch's peak memory on {label}: {e}"));
                    torch_peak = None;
                }
            }
        }
    }
    drop(trainer);

    let images = rates(batch as f64, &times, "training step")?;
    let mut figure = Figure::new(suite, format!("{label} training"), "img/s", images);
    let torch_images = Summary::of(&torch_runs);
    if let Some(theirs) = &torch_images {
        figure = figure.against("PyTorch", theirs.median, None);
    }
    recorder.push(figure);
    if let Some(theirs) = torch_images {
        recorder.push(
            Figure::new(suite, format!("PyTorch {label} training"), "img/s", theirs)
                .note("torch_ref.py: mean over 6 steps after a warm-up step, one run per round"),
        );
    }
    if let Some(per_round) = speed_ratios.summary() {
        recorder.push(
            Figure::new(
                suite,
                format!("{label} training / PyTorch, per round"),
                "×",
                per_round,
            )
            .with_ratio("PyTorch", per_round.median, None)
            .note(format!(
                "each round's median step rate over that round's PyTorch run; min is the worst round; {}",
                against.cpu
            )),
        );
    }

    let gflop_per_image = 3.0 * forward_flops as f64 / 1e9;
    let mut gflops = Figure::new(
        suite,
        format!("{label} training compute"),
        "GFLOP/s",
        images.scaled(gflop_per_image),
    )
    .note(format!(
        "3 × {:.3} GFLOP forward per image",
        forward_flops as f64 / 1e9
    ));
    if let Some((what, value)) = against.peak {
        gflops = gflops.against(what, value, None);
    }
    recorder.push(gflops);

    if let Some(probe) = against.memory {
        record_memory(
            suite,
            &label,
            probe.steps,
            &ours_memory,
            &torch_memory,
            &memory_ratios,
            against.cpu,
            recorder,
        );
    }
    Ok(NetworkThroughput {
        images_per_second: images,
        forward_flops,
    })
}

/// Records the peak-memory figures of one network and batch: swa-rs's peak against PyTorch's median,
/// PyTorch's peak, and the ratio of each round's peaks.
#[allow(clippy::too_many_arguments)]
fn record_memory(
    suite: &str,
    label: &str,
    steps: usize,
    ours: &MemorySide,
    theirs: &MemorySide,
    ratios: &RoundRatios,
    cpu: &str,
    recorder: &mut Recorder,
) {
    let Some(ours_peak) = ours.peak_mib() else {
        return;
    };
    let describe = |side: &MemorySide, start: &str| match (side.growth_mib(), side.start_mib()) {
        (Some(growth), Some(first)) => format!(
            "{:.1} MiB above the {:.1} MiB resident {start}",
            growth.median, first.median
        ),
        _ => String::new(),
    };
    let mut figure = Figure::new(
        suite,
        format!("{label} training peak RSS"),
        "MiB",
        ours_peak,
    )
    .note(format!(
        "VmHWM of a child of swa-bench training {steps} steps; {}",
        describe(ours, "before building the network")
    ));
    let theirs_peak = theirs.peak_mib();
    if let Some(torch) = &theirs_peak {
        figure = figure.against(
            "PyTorch",
            torch.median,
            Some(Target::MaxRatio(MEMORY_TARGET)),
        );
    }
    recorder.push(figure);
    if let Some(torch) = theirs_peak {
        recorder.push(
            Figure::new(
                suite,
                format!("PyTorch {label} training peak RSS"),
                "MiB",
                torch,
            )
            .note(format!(
                "torch_ref.py peak: VmHWM of a process training {steps} steps; {}",
                describe(theirs, "after `import torch`")
            )),
        );
    }
    // PyTorch's process starts far larger (the interpreter and libtorch), so the peaks also compare
    // what training itself adds: the network, its activations and gradients, the optimiser's state.
    if let Some(growth) = ours.growth_mib() {
        let mut figure = Figure::new(
            suite,
            format!("{label} training RSS growth"),
            "MiB",
            growth,
        )
        .note("peak minus the resident set before building the network (PyTorch: after `import torch`)");
        if let Some(torch) = theirs.growth_mib() {
            figure = figure.against("PyTorch's growth", torch.median, None);
        }
        recorder.push(figure);
    }
    if let Some(per_round) = ratios.summary() {
        recorder.push(
            Figure::new(
                suite,
                format!("{label} peak RSS / PyTorch, per round"),
                "×",
                per_round,
            )
            .with_ratio(
                "PyTorch",
                per_round.median,
                Some(Target::MaxRatio(MEMORY_TARGET)),
            )
            .note(format!(
                "each round's peak over that round's PyTorch peak; max is the worst round; {cpu}"
            )),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preresnet20_sweeps_the_batch_sizes_and_the_others_train_at_128_unless_told() {
        let vgg = Architecture::Vgg16;
        assert_eq!(batch_sizes(SWEPT_NETWORK, None), vec![32, 64, 128, 256]);
        assert_eq!(batch_sizes(vgg, None), vec![128]);
        assert_eq!(
            batch_sizes(Architecture::PreResNet { depth: 164 }, None),
            vec![128]
        );
        assert_eq!(batch_sizes(vgg, Some(&[16, 64])), vec![16, 64]);
        assert_eq!(batch_sizes(SWEPT_NETWORK, Some(&[64])), vec![64]);
    }

    #[test]
    fn memory_figures_summarise_peaks_growth_and_start_in_mib() {
        let side = MemorySide {
            peaks: vec![
                PeakRss {
                    start_kib: 1024,
                    peak_kib: 11 * 1024,
                },
                PeakRss {
                    start_kib: 3 * 1024,
                    peak_kib: 9 * 1024,
                },
            ],
        };
        assert_eq!(side.peak_mib().map(|s| (s.min, s.max)), Some((9.0, 11.0)));
        assert_eq!(side.growth_mib().map(|s| (s.min, s.max)), Some((6.0, 10.0)));
        assert_eq!(side.start_mib().map(|s| s.median), Some(2.0));
        assert_eq!(MemorySide::default().peak_mib(), None);
    }
}
