//! `swa-bench`: measures swa-rs against the machine's limits and against PyTorch, prints a table and
//! writes a JSON report. See the crate documentation for what each suite measures.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use swa_core::CpuBackend;
use swa_models::Architecture;

use swa_bench::machine::{load_average, Machine};
use swa_bench::memory::{probe_this_process, ProbeRequest, SelfProbe, PROBE_COMMAND};
use swa_bench::report::{header, Report, Versions};
use swa_bench::suites::{
    averaging, data, epoch, evaluation, folder, geometry, kernels, layers, overhead, training,
};
use swa_bench::torch::{default_script, TorchRunner};
use swa_bench::{Recorder, Settings, BATCH};

// The same allocator and setting as `cargo xtask` (`swa_core::allocator`, turned on first thing in `main`),
// so that the figures are those of the training users run.
#[global_allocator]
static ALLOCATOR: swa_core::allocator::MiMalloc = swa_core::allocator::MiMalloc;

/// A benchmark suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// SWA and EMA update bandwidth against a memory copy.
    Averaging,
    /// SWA's cost in training: averaging per epoch, BatchNorm recomputation.
    Overhead,
    /// Convolution and GEMM GFLOP/s at the paper's shapes against the GEMM peak.
    Kernels,
    /// Training images/s, GFLOP/s and peak memory of the paper's networks (and PyTorch's with --torch).
    Training,
    /// Per-layer time and GFLOP/s of the trainer's step on the CPU, against the GEMM peak.
    Layers,
    /// Images/s of a slice of a real CIFAR-10 epoch, data pipeline included (and PyTorch's with --torch).
    Epoch,
    /// Images/s of `evaluate` and `update_bn` (and PyTorch's with --torch).
    Eval,
    /// Points per hour of a loss-surface survey (`cargo xtask geometry`'s path) on PreResNet-20.
    Geometry,
    /// Augmented batches/s from swa-data.
    Data,
    /// ImageNet's JPEG input pipeline (decode, RandomResizedCrop 224, flip) against torchvision's.
    Folder,
    /// The averaging, kernel and training figures on the GPU backend.
    Gpu,
}

impl Suite {
    const ALL: [Suite; 11] = [
        Suite::Averaging,
        Suite::Overhead,
        Suite::Kernels,
        Suite::Training,
        Suite::Layers,
        Suite::Epoch,
        Suite::Eval,
        Suite::Geometry,
        Suite::Data,
        Suite::Folder,
        Suite::Gpu,
    ];

    fn name(self) -> &'static str {
        match self {
            Suite::Averaging => "averaging",
            Suite::Overhead => "overhead",
            Suite::Kernels => "kernels",
            Suite::Training => "training",
            Suite::Layers => "layers",
            Suite::Epoch => "epoch",
            Suite::Eval => "eval",
            Suite::Geometry => "geometry",
            Suite::Data => "data",
            Suite::Folder => "folder",
            Suite::Gpu => "gpu",
        }
    }
}

/// Measures swa-rs against the machine's limits and against PyTorch.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Suites to run, in order (default: all).
    #[arg(value_enum)]
    suites: Vec<Suite>,

    /// CPU threads for swa-rs, the references and PyTorch (default: all logical CPUs).
    #[arg(long)]
    threads: Option<usize>,

    /// Where to write the JSON report.
    #[arg(long, default_value = "target/swa-bench/latest.json")]
    json: PathBuf,

    /// A Python interpreter with PyTorch: also measure PyTorch's training speed on the same networks.
    #[arg(long, value_name = "PYTHON")]
    torch: Option<PathBuf>,

    /// The PyTorch reference script (default: the copy in this crate).
    #[arg(long, value_name = "PATH")]
    torch_script: Option<PathBuf>,

    /// Networks of the training suite, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "preresnet20,preresnet164,vgg16,wrn16x4"
    )]
    networks: Vec<String>,

    /// Timed training steps per network and round (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    train_steps: usize,

    /// Rounds of the training suite: each times the steps of swa-rs, then one PyTorch run, so that a
    /// machine whose speed drifts slows both alike; then measures each side's peak memory.
    #[arg(long, default_value_t = 1)]
    rounds: usize,

    /// Batch sizes of the training suite for every network, comma-separated (default: 32,64,128,256
    /// for PreResNet-20, 128 for the other networks).
    #[arg(long, value_delimiter = ',', value_name = "SIZES")]
    batches: Option<Vec<usize>>,

    /// Training steps of each peak-memory child of the training suite, the first included; one child
    /// per side, network, batch and round. 0 measures no memory.
    #[arg(long, default_value_t = 3)]
    memory_steps: usize,

    /// The CIFAR-10 data of the epoch suite: the official binary folder (cifar-10-batches-bin) or
    /// anything swa-data recognises (default: the SWA_CIFAR10_DIR environment variable).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,

    /// Networks of the epoch suite, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "preresnet20")]
    epoch_networks: Vec<String>,

    /// Batches of 128 images per timed slice of the epoch suite.
    #[arg(long, default_value_t = 50)]
    epoch_batches: usize,

    /// Rounds of the epoch suite: each times one slice of swa-rs's, then one of PyTorch's.
    #[arg(long, default_value_t = 3)]
    epoch_rounds: usize,

    /// Networks of the eval suite, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "preresnet20,vgg16,vgg16bn"
    )]
    eval_networks: Vec<String>,

    /// Batch sizes of the eval suite, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    eval_batch: Vec<usize>,

    /// Batches per timed pass of the eval suite.
    #[arg(long, default_value_t = 4)]
    eval_batches: usize,

    /// Timed passes of each function per round of the eval suite, on each side.
    #[arg(long, default_value_t = 2)]
    eval_passes: usize,

    /// Rounds of the eval suite: each times swa-rs's passes, then one PyTorch run of as many.
    #[arg(long, default_value_t = 5)]
    eval_rounds: usize,

    /// Fewer runs and shorter spans: a smoke test whose figures are rough.
    #[arg(long)]
    quick: bool,
}

/// The hidden subcommand with which swa-bench measures its own training's peak memory in a child
/// process (see `swa_bench::memory`); the training suite starts it, users need not.
#[derive(Parser, Debug)]
#[command(name = "swa-bench peak-memory-probe")]
struct ProbeCli {
    /// The network to train.
    #[arg(long)]
    network: String,
    /// Images per batch.
    #[arg(long)]
    batch: usize,
    /// Training steps, the first included.
    #[arg(long)]
    steps: usize,
    /// Backend threads.
    #[arg(long)]
    threads: usize,
}

/// Trains as `swa-bench peak-memory-probe …` asks and prints the resident memory line.
fn run_memory_probe() -> Result<()> {
    let cli = ProbeCli::parse_from(std::env::args_os().skip(1));
    anyhow::ensure!(cli.batch > 0, "--batch must be positive");
    // The thread pools of a measuring run, so that the child's memory is that of the same setup.
    rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads.max(1))
        .build_global()
        .context("configuring the global thread pool")?;
    let request = ProbeRequest {
        network: cli.network.parse().context("--network")?,
        batch: cli.batch,
        steps: cli.steps,
        threads: cli.threads,
    };
    let rss = probe_this_process(&request)?;
    println!("{}", rss.line());
    Ok(())
}

fn main() -> Result<()> {
    swa_core::allocator::keep_freed_memory();
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == PROBE_COMMAND)
    {
        return run_memory_probe();
    }
    let cli = Cli::parse();
    let started = Instant::now();
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // swa-data builds batches on rayon's global pool: give it the same threads as everything else.
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("configuring the global thread pool")?;

    let networks = parse_networks(&cli.networks).context("--networks")?;
    let eval_networks = parse_networks(&cli.eval_networks).context("--eval-networks")?;
    let epoch_networks = parse_networks(&cli.epoch_networks).context("--epoch-networks")?;
    if let Some(batches) = &cli.batches {
        anyhow::ensure!(
            !batches.is_empty() && batches.iter().all(|&b| b > 0),
            "--batches: batch sizes must be positive, got {batches:?}"
        );
    }
    anyhow::ensure!(
        cli.eval_batch.iter().all(|&b| b > 0),
        "--eval-batch: batch sizes must be positive, got {:?}",
        cli.eval_batch
    );
    let torch = match &cli.torch {
        Some(python) => {
            let script = cli.torch_script.clone().unwrap_or_else(default_script);
            anyhow::ensure!(
                script.is_file(),
                "the PyTorch reference script {} does not exist (give it with --torch-script)",
                script.display()
            );
            Some(TorchRunner {
                python: python.clone(),
                script,
                threads,
            })
        }
        None => None,
    };
    let settings = Settings {
        threads,
        quick: cli.quick,
        networks,
        train_steps: if cli.quick { 1 } else { cli.train_steps.max(1) },
        rounds: cli.rounds.max(1),
        train_batches: cli.batches.clone(),
        memory_steps: cli.memory_steps,
        data: epoch::data_location(cli.data.as_deref(), std::env::var_os(epoch::DATA_ENV)),
        epoch_networks,
        epoch_batches: if cli.quick {
            5
        } else {
            cli.epoch_batches.max(1)
        },
        epoch_rounds: if cli.quick {
            1
        } else {
            cli.epoch_rounds.max(1)
        },
        torch,
        eval_networks,
        eval_batch_sizes: cli.eval_batch.clone(),
        eval_batches: if cli.quick {
            2
        } else {
            cli.eval_batches.max(1)
        },
        eval_passes: if cli.quick { 1 } else { cli.eval_passes.max(1) },
        eval_rounds: if cli.quick { 1 } else { cli.eval_rounds.max(1) },
    };
    let suites: Vec<Suite> = if cli.suites.is_empty() {
        Suite::ALL.to_vec()
    } else {
        cli.suites.clone()
    };

    let mut machine = Machine::probe(threads);
    // Read before measuring: the working tree may move on while the suites run.
    let versions = Versions::current();
    let backend = CpuBackend::with_threads(threads);
    println!(
        "swa-bench on {} ({} logical CPUs, {} threads used, load {}), {}{}",
        machine.cpu_model,
        machine.logical_cpus,
        threads,
        machine
            .load_average
            .start
            .map_or("unknown".into(), |l| format!("{l:.2}")),
        swa_core::Backend::name(&backend),
        if cli.quick {
            ", QUICK (rough figures)"
        } else {
            ""
        }
    );
    println!("{}", header());

    let mut recorder = Recorder::default();
    if cli.quick {
        recorder.note(
            "run",
            "--quick: few runs and short spans, figures are rough",
        );
    }
    let mut peak: Option<f64> = None;
    for &suite in &suites {
        let suite_start = Instant::now();
        let result = run_suite(
            suite,
            &settings,
            &backend,
            &mut peak,
            &mut machine,
            &mut recorder,
        );
        if let Err(e) = result {
            recorder.note(suite.name(), format!("FAILED: {e:#}"));
        }
        println!(
            "  ({} took {:.1} s)",
            suite.name(),
            suite_start.elapsed().as_secs_f64()
        );
    }

    machine.load_average.end = load_average();
    let highest_load = [machine.load_average.start, machine.load_average.end]
        .into_iter()
        .flatten()
        .reduce(f64::max);
    if let Some(load) = highest_load {
        if load > threads as f64 + 0.5 {
            recorder.note(
                "run",
                format!(
                    "1-minute load average reached {load:.2} with {threads} threads: other work shared the \
                     machine during the run, so figures may read low"
                ),
            );
        }
    }
    let report = Report {
        machine,
        versions,
        command: std::env::args().collect(),
        started_unix_s,
        duration_s: started.elapsed().as_secs_f64(),
        suites: suites.iter().map(|s| s.name().to_string()).collect(),
        figures: recorder.figures,
        notes: recorder.notes,
    };

    println!("\n{}", header());
    for figure in &report.figures {
        println!("{}", figure.row());
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    if let Some(dir) = cli.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&report).context("encoding the report")?;
    std::fs::write(&cli.json, json).with_context(|| format!("writing {}", cli.json.display()))?;
    println!(
        "\n{} figures in {:.0} s; report written to {}",
        report.figures.len(),
        report.duration_s,
        cli.json.display()
    );
    Ok(())
}

/// Network names parsed, in order.
fn parse_networks(names: &[String]) -> Result<Vec<Architecture>, swa_models::ModelError> {
    names.iter().map(|n| n.parse::<Architecture>()).collect()
}

/// The peak GFLOP/s reference, measured once per run by whichever suite needs it first.
fn gemm_peak(settings: &Settings, peak: &mut Option<f64>, recorder: &mut Recorder) -> Result<f64> {
    if let Some(value) = *peak {
        return Ok(value);
    }
    let side = kernels::PEAK_SIDE;
    let summary = kernels::gemm_peak(settings.threads, side, settings.runs(7))?;
    recorder.push(
        swa_bench::report::Figure::new(
            "peak",
            format!("GEMM peak: gemm crate {side}³ f32"),
            "GFLOP/s",
            summary,
        )
        .note(format!(
            "{} threads; the reference of every GFLOP/s figure",
            settings.threads
        )),
    );
    *peak = Some(summary.median);
    Ok(summary.median)
}

fn run_suite(
    suite: Suite,
    settings: &Settings,
    backend: &CpuBackend,
    peak: &mut Option<f64>,
    machine: &mut Machine,
    recorder: &mut Recorder,
) -> Result<()> {
    match suite {
        Suite::Averaging => {
            let sizes: Vec<(String, usize)> = averaging::PAPER_SIZES
                .iter()
                .map(|(label, n)| (label.to_string(), *n))
                .collect();
            averaging::run(
                backend,
                "averaging",
                &sizes,
                settings.runs(15),
                averaging::TARGET,
                recorder,
            )?;
        }
        Suite::Overhead => {
            overhead::run(
                backend,
                "overhead",
                overhead::OverheadPlan::for_settings(settings),
                recorder,
            )?;
        }
        Suite::Kernels => {
            let peak = gemm_peak(settings, peak, recorder)?;
            let shapes: &[kernels::ConvShape] = if settings.quick {
                &kernels::PAPER_SHAPES[..3]
            } else {
                &kernels::PAPER_SHAPES
            };
            kernels::run(
                backend,
                "kernels",
                shapes,
                BATCH,
                settings.runs(5),
                Some(("GEMM peak", peak)),
                recorder,
            )?;
        }
        Suite::Training => {
            let peak = gemm_peak(settings, peak, recorder)?;
            let memory = match settings.memory_steps {
                0 => None,
                steps => match SelfProbe::current(steps, settings.threads) {
                    Ok(probe) => Some(probe),
                    Err(e) => {
                        recorder.note("training", format!("no peak-memory figures: {e}"));
                        None
                    }
                },
            };
            for &architecture in &settings.networks {
                for batch in training::batch_sizes(architecture, settings.train_batches.as_deref())
                {
                    training::run_network(
                        backend,
                        "training",
                        architecture,
                        batch,
                        training::Rounds {
                            steps: settings.train_steps,
                            rounds: settings.rounds,
                        },
                        training::References {
                            peak: Some(("GEMM peak", peak)),
                            torch: settings.torch.as_ref(),
                            memory: memory.as_ref(),
                            cpu: &machine.cpu_model,
                        },
                        recorder,
                    )?;
                }
            }
        }
        Suite::Layers => {
            let peak = gemm_peak(settings, peak, recorder)?;
            for &architecture in &settings.networks {
                for batch in settings.train_batches.as_deref().unwrap_or(&[BATCH]) {
                    layers::run_network(
                        backend,
                        "layers",
                        architecture,
                        *batch,
                        settings.train_steps.max(3),
                        Some(("GEMM peak", peak)),
                        recorder,
                    )?;
                }
            }
        }
        Suite::Epoch => {
            let Some(data) = &settings.data else {
                recorder.note(
                    "epoch",
                    format!(
                        "skipped: no CIFAR-10 data given (--data DIR or the {} environment variable, \
                         naming the cifar-10-batches-bin folder)",
                        epoch::DATA_ENV
                    ),
                );
                return Ok(());
            };
            anyhow::ensure!(
                data.path.exists(),
                "the CIFAR-10 data {} (from {}) does not exist",
                data.path.display(),
                data.source
            );
            for &architecture in &settings.epoch_networks {
                epoch::run_network(
                    backend,
                    "epoch",
                    architecture,
                    data,
                    epoch::SlicePlan {
                        batches: settings.epoch_batches,
                        batch: BATCH,
                        rounds: settings.epoch_rounds,
                    },
                    settings.torch.as_ref(),
                    &machine.cpu_model,
                    recorder,
                )
                .with_context(|| {
                    format!(
                        "the epoch slice of {architecture} on {} (from {})",
                        data.path.display(),
                        data.source
                    )
                })?;
            }
        }
        Suite::Eval => {
            for &batch in &settings.eval_batch_sizes {
                for &architecture in &settings.eval_networks {
                    evaluation::run_network(
                        backend,
                        "eval",
                        architecture,
                        evaluation::EvaluationPlan {
                            batch,
                            batches: settings.eval_batches,
                            passes: settings.eval_passes,
                            rounds: settings.eval_rounds,
                        },
                        settings.torch.as_ref(),
                        &machine.cpu_model,
                        recorder,
                    )?;
                }
            }
        }
        Suite::Geometry => {
            // The command's defaults on a CPU; --quick surveys a few hundred images.
            let (train_images, test_images, points, rounds) = if settings.quick {
                (256, 256, 2, 1)
            } else {
                (5000, 10000, 3, 3)
            };
            let plan = geometry::SurveyPlan {
                network: Architecture::PreResNet { depth: 20 },
                train_images,
                test_images,
                batch: BATCH,
                points,
                rounds,
            };
            geometry::run(
                "geometry",
                plan,
                settings.threads,
                &machine.cpu_model,
                recorder,
            )?;
        }
        Suite::Data => {
            let batches = if settings.quick { 10 } else { 100 };
            data::run("data", batches, settings.runs(7), recorder)?;
        }
        Suite::Folder => {
            let plan = folder::FolderPlan {
                images: if settings.quick { 64 } else { 512 },
                threads: settings.threads,
                rounds: settings.runs(5),
            };
            folder::run(
                "folder",
                plan,
                settings.torch.as_ref(),
                &machine.cpu_model,
                recorder,
            )?;
        }
        Suite::Gpu => {
            #[cfg(feature = "gpu")]
            {
                machine.adapter = swa_bench::suites::gpu::run(settings, recorder)?;
            }
            #[cfg(not(feature = "gpu"))]
            {
                let _ = machine;
                recorder.note("gpu", "skipped: built without the `gpu` feature");
            }
        }
    }
    Ok(())
}
