//! # swa-bench
//!
//! How fast swa-rs is, measured against the limits of the machine it runs on and against PyTorch, in
//! one command: `cargo run -p swa-bench --release -- [SUITE…]`.
//!
//! A speed figure means little on its own: 40 GFLOP/s is excellent on two cores and poor on sixty-four.
//! So every figure is measured next to a reference taken in the same run, with the same threads:
//!
//! | suite | measures | against |
//! |---|---|---|
//! | `averaging` | [`WeightAverage::update`](swa_core::WeightAverage) and EMA updates over 1.7M and 36.5M parameters (PreResNet-164, WRN-28-10), GB/s | a plain memory copy (target ≥ 90%) |
//! | `overhead` | a PreResNet-20 training span with and without an SWA update; `update_bn` | an epoch (target ≤ 1%); a forward-only pass (target: no slower) |
//! | `kernels` | convolutions (forward, weight gradient, both gradients) and their GEMMs at the shapes of PreResNet-20/164 and VGG-16, GFLOP/s | a large square GEMM from the `gemm` crate (the machine's practical peak) |
//! | `training` | training images/s of PreResNet-20 (batch 32, 64, 128, 256), PreResNet-164, VGG-16, WRN-16-4 (batch 128), GFLOP/s, and the peak resident memory of training, each side in a child process of its own ([`memory`]) | the GEMM peak; PyTorch on the same network and batch (`--torch PYTHON`), in alternating rounds, per-round ratios included: memory target ≤ 1.0× |
//! | `layers` | the trainer's step on the training suite's networks and batches, one row per layer operation and shape: time per step, share of the step, convolutions' GFLOP/s ([`profile`]) | the GEMM peak |
//! | `epoch` | img/s of a slice of a real CIFAR-10 epoch (`--data DIR` or `SWA_CIFAR10_DIR`): swa-data's shuffled, augmented batches into the trainer's step | PyTorch's same loop with numpy augmentation (`--torch PYTHON`), in alternating rounds |
//! | `eval` | img/s of `evaluate` and `update_bn` on PreResNet-20, VGG-16 and VGG-16-BN at batch 128, in rounds | PyTorch's `model.eval()` under `no_grad` and `swa_utils.update_bn` (`--torch PYTHON`): targets ≥ 1.5× and ≥ 1.3× |
//! | `data` | augmented batches/s from swa-data | — |
//! | `gpu` | averaging, kernels and training on the wgpu backend | the GPU's own copy bandwidth |
//!
//! Each figure is the median of several runs, with the minimum and maximum, printed as a table and
//! written as JSON with the machine's description (CPU, cores, threads, load, adapter), the crate and
//! compiler versions and the command line ([`report::Report`]).
//!
//! The library holds the pieces the binary puts together: [`stats`] (median, min, max, per-round
//! ratios), [`flops`] (FLOP counts, including a counting backend that measures a network's FLOPs by
//! running it), [`timing`] (how each backend is timed), [`memory`] (peak resident memory of training,
//! measured in child processes), [`profile`] (a backend that times each layer operation), [`workload`]
//! (what is run), [`torch`] (the PyTorch reference) and
//! [`suites`].

pub mod flops;
pub mod machine;
pub mod memory;
pub mod profile;
pub mod report;
pub mod stats;
pub mod suites;
pub mod timing;
pub mod torch;
pub mod workload;

use swa_core::averaging::AveragingError;
use swa_core::backend::BackendError;
use swa_models::{Architecture, ModelError, TrainError};

use crate::report::Figure;

/// Classes of the networks benchmarked: CIFAR-100's, as the PyTorch reference script builds them.
pub const CLASSES: usize = 100;

/// Batch size of the training and kernel figures (the paper's).
pub const BATCH: usize = 128;

/// Steps per epoch of CIFAR at batch 128 (50 000 / 128, rounded up): the unit of the overhead targets.
pub const STEPS_PER_EPOCH: usize = 391;

/// Errors of a benchmark run; each names what was being measured.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A backend operation failed.
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    /// An averaging update failed.
    #[error("averaging: {0}")]
    Averaging(#[from] AveragingError),
    /// A training step, SGD update or BN recomputation failed.
    #[error("training: {0}")]
    Train(#[from] TrainError),
    /// A network could not be built.
    #[error("building a network: {0}")]
    Model(#[from] ModelError),
    /// The data pipeline failed.
    #[error("data: {0}")]
    Data(#[from] swa_data::DataError),
    /// The PyTorch reference could not be run or read.
    #[error(transparent)]
    Torch(#[from] torch::TorchError),
    /// Peak memory could not be measured.
    #[error("peak memory: {0}")]
    Memory(#[from] memory::MemoryError),
    /// A loss-surface survey failed.
    #[error("survey: {0}")]
    Geometry(#[from] swa_models::geometry::GeometryError),
    /// A benchmark could not be set up (a thread pool, a buffer, …).
    #[error("setting up {0}")]
    Setup(String),
    /// A measurement produced no usable sample.
    #[error("no usable sample for {0}")]
    NoSamples(String),
}

/// What the suites run and how much of it.
#[derive(Debug)]
pub struct Settings {
    /// CPU threads for the backend, the copy reference, the GEMM peak, the data pipeline and PyTorch.
    pub threads: usize,
    /// Fewer runs and smaller spans: a smoke test whose figures are rough.
    pub quick: bool,
    /// The networks of the training suite.
    pub networks: Vec<Architecture>,
    /// Timed training steps per network and round, after one warm-up step.
    pub train_steps: usize,
    /// Rounds of the training suite, each timing `train_steps` steps and then one PyTorch run.
    pub rounds: usize,
    /// Batch sizes of the training suite for every network, when given; otherwise
    /// [`suites::training::batch_sizes`]' defaults.
    pub train_batches: Option<Vec<usize>>,
    /// Training steps of each peak-memory child (the first included); 0 measures no memory.
    pub memory_steps: usize,
    /// Where the epoch suite finds CIFAR-10, when anything says.
    pub data: Option<suites::epoch::DataLocation>,
    /// The networks of the epoch suite.
    pub epoch_networks: Vec<Architecture>,
    /// Batches per timed slice of the epoch suite.
    pub epoch_batches: usize,
    /// Rounds of the epoch suite, each timing one slice of swa-rs's and then one of PyTorch's.
    pub epoch_rounds: usize,
    /// The PyTorch reference, when asked for.
    pub torch: Option<torch::TorchRunner>,
    /// The networks of the evaluation suite.
    pub eval_networks: Vec<Architecture>,
    /// Batch sizes of the evaluation suite.
    pub eval_batch_sizes: Vec<usize>,
    /// Batches per timed pass of the evaluation suite.
    pub eval_batches: usize,
    /// Timed passes per round of the evaluation suite.
    pub eval_passes: usize,
    /// Rounds of the evaluation suite, each timing swa-rs's passes and then one PyTorch run.
    pub eval_rounds: usize,
}

impl Settings {
    /// `full` runs normally, a few under [`Settings::quick`].
    pub fn runs(&self, full: usize) -> usize {
        if self.quick {
            full.min(3)
        } else {
            full
        }
    }
}

/// Collects figures and notes, printing each as it arrives.
#[derive(Debug, Default)]
pub struct Recorder {
    /// The figures so far.
    pub figures: Vec<Figure>,
    /// The notes so far.
    pub notes: Vec<String>,
}

impl Recorder {
    /// Records and prints a figure.
    pub fn push(&mut self, figure: Figure) {
        println!("{}", figure.row());
        self.figures.push(figure);
    }

    /// Records and prints a remark about a suite.
    pub fn note(&mut self, suite: &str, text: impl Into<String>) {
        let note = format!("{suite}: {}", text.into());
        println!("  note: {note}");
        self.notes.push(note);
    }
}

/// The summary of rates `work / duration`, or an error naming `what` when no run took measurable time.
pub(crate) fn rates(
    work: f64,
    durations: &[std::time::Duration],
    what: &str,
) -> Result<stats::Summary, BenchError> {
    stats::Summary::rates(work, durations).ok_or_else(|| BenchError::NoSamples(what.into()))
}

/// The summary of durations in milliseconds, or an error naming `what` when there are none.
pub(crate) fn millis(
    durations: &[std::time::Duration],
    what: &str,
) -> Result<stats::Summary, BenchError> {
    stats::Summary::millis(durations).ok_or_else(|| BenchError::NoSamples(what.into()))
}
