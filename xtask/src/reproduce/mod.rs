//! `cargo xtask reproduce cifar100|cifar10`: SGD vs SWA vs FGE on the paper's protocol; `cargo xtask
//! reproduce imagenet`: SWA from pretrained weights ([`imagenet`]).
//!
//! Every run writes its checkpoints under `OUT/<data>/<model>/seed-<s>/<run>/`; running the same command
//! again continues each run from its last finished epoch. At the end the results of all runs found under
//! `OUT/<data>` are gathered into `results.md`, `results.json` and SVG plots.
//!
//! Started under `mpirun` (xtask built with the feature `mpi`), every run trains data parallel over the
//! ranks, each on its shard of every batch ([`ranks`]); `--method swap` trains SWAP instead ([`swap`]).

mod imagenet;
mod presets;
pub(crate) mod ranks;
mod report;
mod source;
mod swap;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::data::DatasetArg;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use swa_core::backend::{Backend, BackendError};
use swa_core::CpuBackend;
use swa_data::DatasetKind;
use swa_gpu::{GpuBackend, GpuOptions};
use swa_models::distributed::{BatchNormMode, ShardedBatches};
use swa_models::protocol::{plan_seed, PlannedRun, RunStart, FINAL_WEIGHTS_FILE, SWA_WEIGHTS_FILE};
use swa_models::train::{EpochRecord, Silent, TrainObserver, Trainer};
use swa_models::{module::parameter_count, Module};

pub use presets::{normalization_of, Preset, RunKind};
use ranks::Ranks;
pub use report::write_reports;
use source::CifarSource;

/// Which device trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// A GPU when wgpu finds a hardware adapter, else the CPU.
    Auto,
    /// The ndarray CPU backend.
    Cpu,
    /// The WGSL backend (fails when no adapter exists).
    Gpu,
}

/// Methods that `cargo xtask reproduce` adds to the runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// SWA-Gaussian: moments from the SWA run, Bayesian model averaging, and the calibration table.
    Swag,
    /// SWAP over the ranks of `mpirun` (xtask built with `--features mpi`): synchronous data-parallel
    /// training until swa_start, the ranks apart at the SWA learning rate, their weights averaged. It
    /// replaces the SGD, SWA and FGE runs.
    Swap,
}

/// The experiments `cargo xtask reproduce` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Experiment {
    /// CIFAR-10: SGD, SWA and FGE from scratch (Table 1).
    Cifar10,
    /// CIFAR-100: SGD, SWA and FGE from scratch (Table 1).
    Cifar100,
    /// ImageNet: SWA from pretrained weights (Table 2); needs --data DIR and --weights FILE.
    Imagenet,
}

/// Arguments of `cargo xtask reproduce`.
#[derive(Args, Debug)]
pub struct ReproduceArgs {
    /// The experiment.
    #[arg(value_enum)]
    pub experiment: Experiment,
    /// Networks to train (default: the preset's; the paper's are vgg16, preresnet164, wrn28x10).
    #[arg(long = "model", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Number of seeds per network (seeds 1..=N).
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Which runs to make: sgd, swa, fge (default: the preset's).
    #[arg(long, value_delimiter = ',')]
    pub runs: Vec<RunKind>,
    /// Training device.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Data folder or archive (default: `$SWA_DATA_DIR` or the cache, downloading when missing).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output folder for checkpoints, tables and plots.
    #[arg(long, default_value = "out/reproduce")]
    pub out: PathBuf,
    /// Protocol preset.
    #[arg(long, value_enum, default_value_t = Preset::Paper)]
    pub preset: Preset,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Continue from the checkpoints in OUT (the default; kept for explicitness).
    #[arg(long)]
    pub resume: bool,
    /// Evaluate the FGE run on the test set every this many steps, for the figure of test error against
    /// iteration under its cyclical learning rate (0: at epoch ends only). Part of the FGE run's
    /// configuration: set it before the run starts.
    #[arg(long, default_value_t = 0)]
    pub fge_test_every: usize,
    /// Methods beyond the runs: `swag` collects SWAG moments from the SWA run's snapshots (the quick and
    /// smoke presets always do) and, once a seed's runs are done, scores SGD, SWA, SWA + temperature,
    /// SWAG-Diagonal, SWAG and FGE with `cargo xtask calibrate`'s defaults (30 samples per posterior).
    #[arg(long = "method", value_enum, value_delimiter = ',')]
    pub methods: Vec<Method>,
    /// Training images held out of every run at the end of the training split (0: none, the paper's
    /// protocol), on which `--method swag` fits the temperature of temperature scaling, as the SWAG
    /// authors hold out 5000. Without them the temperature is cross-fitted on halves of the test set.
    #[arg(long)]
    pub holdout: Option<usize>,
    /// Under mpirun: seconds a collective between ranks may wait before the run is aborted as stalled (it
    /// must exceed rank 0's checkpoint writes).
    #[arg(long, default_value_t = 600)]
    pub collective_timeout: u64,
    /// Under mpirun: synchronised BatchNorm (PyTorch's `SyncBatchNorm`): every BatchNorm layer normalises
    /// a training batch with the statistics of all ranks' shards, so that the ranks train as one process
    /// on the global batch. Without it each rank normalises its own shard, as PyTorch's DDP does. No
    /// effect in one process. Part of a run's configuration: keep it when resuming.
    #[arg(long)]
    pub sync_bn: bool,
    /// Stop after this many epochs of each run in this invocation (to split long runs; rerun to continue).
    #[arg(long, hide = true)]
    pub max_epochs_per_run: Option<usize>,
    /// ImageNet: the pretrained weights SWA starts from (torchvision's `.pth`, or safetensors).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Images per batch (default: the preset's recipe; 256 for the paper's ImageNet protocol).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// CIFAR: train for a budget of this many epochs instead of the preset's; the SWA run (1.5 budgets)
    /// and `swa_start` keep their proportions to it unless `--swa-start` is given.
    #[arg(long)]
    pub budget: Option<usize>,
    /// CIFAR: epochs before the first average (the original code's `--swa_start`).
    #[arg(long)]
    pub swa_start: Option<usize>,
    /// CIFAR: the initial learning rate (the original code's `--lr_init`).
    #[arg(long)]
    pub lr: Option<f32>,
    /// CIFAR: the SWA learning rate (the original code's `--swa_lr`).
    #[arg(long)]
    pub swa_lr: Option<f32>,
    /// CIFAR: train on the first this many training images only.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// CIFAR: evaluate on the first this many test images only.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// ImageNet: leave unreadable or corrupt images out and list them in the results, rather than stop
    /// at the first one with its path.
    #[arg(long)]
    pub skip_bad_images: bool,
}

impl ReproduceArgs {
    /// How BatchNorm normalises the training batches of a run over several ranks (`--sync-bn`).
    pub fn batch_norm_mode(&self) -> BatchNormMode {
        if self.sync_bn {
            BatchNormMode::Synchronized
        } else {
            BatchNormMode::PerRank
        }
    }
}

/// Runs the reproduction.
pub fn run(args: ReproduceArgs) -> Result<()> {
    let data_set = match args.experiment {
        Experiment::Cifar10 => DatasetArg::Cifar10,
        Experiment::Cifar100 => DatasetArg::Cifar100,
        Experiment::Imagenet => return imagenet::run(&args),
    };
    for (given, flag) in [
        (args.weights.is_some(), "--weights"),
        (args.skip_bad_images, "--skip-bad-images"),
    ] {
        if given {
            bail!("{flag} applies to reproduce imagenet only");
        }
    }
    let kind: DatasetKind = data_set.into();
    let models: Vec<String> = if args.models.is_empty() {
        presets::default_models(args.preset)
            .into_iter()
            .map(String::from)
            .collect()
    } else {
        args.models.clone()
    };
    let runs = if args.runs.is_empty() {
        presets::default_runs(args.preset)
    } else {
        args.runs.clone()
    };
    let recipes = models
        .iter()
        .map(|m| {
            let mut recipe = presets::recipe(args.preset, m, kind)?;
            if let Some(budget) = args.budget {
                recipe = recipe.with_budget(budget)?;
            }
            recipe.swa_start = args.swa_start.unwrap_or(recipe.swa_start);
            recipe.lr_init = args.lr.unwrap_or(recipe.lr_init);
            recipe.swa_lr = args.swa_lr.unwrap_or(recipe.swa_lr);
            recipe.batch_size = args.batch_size.unwrap_or(recipe.batch_size);
            recipe.train_limit = args.train_limit.or(recipe.train_limit);
            recipe.test_limit = args.test_limit.or(recipe.test_limit);
            recipe.fge_test_every = args.fge_test_every;
            if let Some(holdout) = args.holdout {
                recipe.holdout = holdout;
            }
            if args.methods.contains(&Method::Swag) && recipe.swag_max_rank.is_none() {
                recipe.swag_max_rank = Some(swa_core::swag::DEFAULT_MAX_RANK);
            }
            recipe.validate()?;
            Ok(recipe)
        })
        .collect::<Result<Vec<_>>>()?;
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }

    let splits = crate::data::load_splits(kind, args.data.as_deref())?;
    let train = Arc::new(splits.train);
    let test = Arc::new(splits.test);
    let classes = train.num_classes();
    let data_dir = args.out.join(kind.cli_name());

    let ranks = Ranks::join(Duration::from_secs(args.collective_timeout))?;
    if ranks.writes() {
        let recorded = recipes
            .iter()
            .try_for_each(|recipe| record_recipe(&data_dir, recipe));
        ranks.end_all_on_error(recorded)?;
    }
    let trained = if args.methods.contains(&Method::Swap) {
        swap::run(&args, &ranks, &recipes, &train, &test, classes, &data_dir)
    } else {
        match choose_device(args.device, args.threads)? {
            Device::Cpu(backend) => run_all(
                backend, &args, &ranks, kind, &recipes, &runs, &train, &test, classes, &data_dir,
            ),
            Device::Gpu(backend) => run_all(
                backend, &args, &ranks, kind, &recipes, &runs, &train, &test, classes, &data_dir,
            ),
        }
    };
    ranks.end_all_on_error(trained)?;
    // What follows reads the runs' files, and is done once.
    if !ranks.writes() || args.methods.contains(&Method::Swap) {
        return Ok(());
    }
    if args.methods.contains(&Method::Swag) {
        for (model, recipe) in models.iter().zip(&recipes) {
            for seed in 1..=args.seeds {
                let run = data_dir.join(model).join(format!("seed-{seed}"));
                crate::calibrate::run(crate::calibrate::CalibrateArgs::for_seed(
                    run,
                    args.data.clone(),
                    data_set,
                    args.device,
                    args.threads,
                    (recipe.train_limit, recipe.test_limit),
                ))?;
            }
        }
    }
    let written = report::write_reports(&data_dir, kind)?;
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The file in a network's output folder with the recipe its runs are trained with.
pub const RECIPE_FILE: &str = "recipe.json";

/// Writes `recipe` to its network's folder under `data_dir`, after checking that the runs already there
/// were trained with the same one: resuming them under another budget, learning rate or data limit would
/// mix two protocols in one run without a word.
fn record_recipe(data_dir: &Path, recipe: &presets::Recipe) -> Result<()> {
    let dir = data_dir.join(recipe.architecture.to_string());
    let path = dir.join(RECIPE_FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let recorded: presets::Recipe = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a recipe this version reads: move it away to train anew there",
                path.display()
            )
        })?;
        let differences = recipe.training_differences(&recorded);
        if !differences.is_empty() {
            bail!(
                "the runs in {} were trained with another recipe ({}, now vs recorded in {}): give                  another --out, or the settings they were started with",
                dir.display(),
                differences.join("; "),
                path.display()
            );
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = dir.join(format!("{RECIPE_FILE}.partial"));
    std::fs::write(&partial, serde_json::to_string_pretty(recipe)?)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub enum Device {
    Cpu(CpuBackend),
    Gpu(GpuBackend),
}

pub fn choose_device(choice: DeviceChoice, threads: Option<usize>) -> Result<Device> {
    let cpu = || match threads {
        Some(n) => CpuBackend::with_threads(n),
        None => CpuBackend::new(),
    };
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu(cpu())),
        DeviceChoice::Gpu => {
            let gpu = GpuBackend::from_env().context("--device gpu")?;
            Ok(Device::Gpu(gpu))
        }
        DeviceChoice::Auto => {
            match GpuBackend::new(GpuOptions::from_env().context("--device auto")?) {
                // A software adapter (llvmpipe) is far slower than the CPU backend: only real GPUs are
                // chosen.
                Ok(gpu) if gpu.adapter_info().device_type != wgpu::DeviceType::Cpu => {
                    Ok(Device::Gpu(gpu))
                }
                // Tiles set by the user that do not fit the GPU are a mistake to report, not a reason
                // to train on the CPU instead.
                Err(e @ BackendError::InvalidArgument { .. }) => {
                    Err(anyhow::Error::new(e).context("--device auto"))
                }
                _ => Ok(Device::Cpu(cpu())),
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_all<B: Backend>(
    backend: B,
    args: &ReproduceArgs,
    ranks: &Ranks,
    kind: DatasetKind,
    recipes: &[presets::Recipe],
    runs: &[RunKind],
    train: &Arc<swa_data::Dataset>,
    test: &Arc<swa_data::Dataset>,
    classes: usize,
    data_dir: &Path,
) -> Result<()> {
    // The plan, with a time estimate from the throughput of a few measured training steps.
    let trained = train.len().saturating_sub(recipes[0].holdout);
    let say = |line: String| {
        if ranks.writes() {
            println!("{line}");
        }
    };
    say(format!(
        "reproduce {} ({} preset) on {}: {} train{} / {} test images, {} classes",
        kind.display_name(),
        args.preset,
        backend.name(),
        recipes[0].train_limit.map_or(trained, |l| l.min(trained)),
        match recipes[0].holdout {
            0 => String::new(),
            held_out => format!(" ({held_out} held out)"),
        },
        recipes[0]
            .test_limit
            .map_or(test.len(), |l| l.min(test.len())),
        classes
    ));
    let communicator = ranks.communicator();
    if communicator.size() > 1 {
        say(format!(
            "  data parallel over {} ranks: each trains on its shard of every batch",
            communicator.size()
        ));
    }
    // Every seed's runs, each with the earlier run it starts from (`plans[recipe][seed - 1]`).
    let plans = recipes
        .iter()
        .map(|recipe| {
            let steps = CifarSource::new(train, test, recipe, 0)?.steps_per_epoch();
            (1..=args.seeds)
                .map(|seed| {
                    let seed_dir = data_dir
                        .join(recipe.architecture.to_string())
                        .join(format!("seed-{seed}"));
                    Ok(plan_seed(recipe, runs, seed, steps, &seed_dir)?)
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let mut total_seconds = 0.0;
    for (recipe, seeds) in recipes.iter().zip(&plans) {
        let (mut per_seed, mut shared, mut left) = (0, 0, 0);
        for plan in seeds.iter().flatten() {
            let taken = plan.taken_epochs();
            let done = swa_models::train::find_checkpoints(&plan.checkpoint_dir())?
                .last()
                .map_or(0, |c| c.0);
            left += plan.config.epochs.saturating_sub(done.max(taken));
        }
        // Every seed has the same runs.
        for plan in seeds.first().into_iter().flatten() {
            let taken = plan.taken_epochs();
            per_seed += plan.config.epochs - taken;
            shared += taken;
        }
        let source = CifarSource::new(train, test, recipe, 0)?;
        let per_epoch = estimate_epoch_seconds(&backend, recipe, classes, &source)?;
        let seconds = per_epoch * left as f64;
        total_seconds += seconds;
        say(format!(
            "  {:<14} runs {:<12} {:>4} epochs a seed ({} more shared between runs) x {} seed(s), {} to train, ~{:.0} s/epoch: ~{}",
            recipe.architecture.to_string(),
            runs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            per_seed,
            shared,
            args.seeds,
            left,
            per_epoch,
            human_duration(seconds)
        ));
    }
    say(format!(
        "  estimated total: {} (epochs already in checkpoints are not counted)",
        human_duration(total_seconds)
    ));

    for (recipe, seeds) in recipes.iter().zip(&plans) {
        for (seed, plans) in (1..).zip(seeds) {
            let source = ShardedBatches::new(
                CifarSource::new(train, test, recipe, seed)?,
                communicator.as_ref(),
            );
            for plan in plans {
                train_one(
                    &backend,
                    ranks,
                    recipe,
                    plan,
                    seed,
                    classes,
                    &source,
                    args.max_epochs_per_run,
                    args.batch_norm_mode(),
                )?;
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn train_one<B: Backend>(
    backend: &B,
    ranks: &Ranks,
    recipe: &presets::Recipe,
    plan: &PlannedRun,
    seed: u64,
    classes: usize,
    sharded: &ShardedBatches<CifarSource>,
    max_epochs: Option<usize>,
    batch_norm: BatchNormMode,
) -> Result<()> {
    let (run, config, dir) = (plan.kind, &plan.config, plan.dir.as_path());
    let source = sharded.inner();
    let mut trainer = plan.trainer(backend, recipe.architecture, classes, seed)?;
    trainer.with_communicator(Arc::clone(ranks.communicator()))?;
    trainer.with_batch_norm_mode(batch_norm);
    let label = format!("{} seed {seed} {run}", recipe.architecture);
    let say = |line: String| {
        if ranks.writes() {
            println!("{line}");
        }
    };
    let start = plan
        .start(&mut trainer, source.steps_per_epoch())
        .with_context(|| format!("{label}: resuming {}", dir.display()))?;
    let done = trainer.epochs_done();
    match &start {
        RunStart::Branched {
            from,
            epochs,
            checkpoint,
        } => say(format!(
            "{label}: epochs 1-{epochs} are the {from} run's (trained identically), taken from {}",
            checkpoint.display()
        )),
        RunStart::Resumed { epochs } if *epochs < config.epochs => {
            say(format!("{label}: resuming after epoch {epochs}"))
        }
        RunStart::Resumed { .. } | RunStart::Fresh => {}
    }
    if done >= config.epochs {
        say(format!("{label}: finished earlier ({done} epochs)"));
    } else {
        let mut progress = ranks
            .writes()
            .then(|| Progress::new(&label, config.epochs, done, source.steps_per_epoch()));
        let mut silent = Silent;
        let observer: &mut dyn TrainObserver = match &mut progress {
            Some(progress) => progress,
            None => &mut silent,
        };
        let started = Instant::now();
        let stop_at = max_epochs.map_or(config.epochs, |m| (done + m).min(config.epochs));
        while trainer.epochs_done() < stop_at {
            trainer.run_epoch(sharded, observer).with_context(|| {
                format!(
                    "{label} (checkpoints in {})",
                    plan.checkpoint_dir().display()
                )
            })?;
        }
        if let Some(progress) = &progress {
            progress.finish(started.elapsed().as_secs_f64());
        }
    }
    write_run_files(&mut trainer, ranks, sharded, recipe, run, seed, dir)
}

/// Writes the run's history and final weights for the report (and for users: PyTorch-loadable weights),
/// on rank 0; every rank takes part in recomputing the average's BatchNorm statistics.
fn write_run_files<B: Backend>(
    trainer: &mut Trainer<B>,
    ranks: &Ranks,
    source: &ShardedBatches<CifarSource>,
    recipe: &presets::Recipe,
    run: RunKind,
    seed: u64,
    dir: &Path,
) -> Result<()> {
    if trainer.epochs_done() == trainer.config().epochs {
        let backend = trainer.backend().clone();
        if ranks.writes() {
            swa_models::train::save_weights(
                &backend,
                trainer.model(),
                &dir.join(FINAL_WEIGHTS_FILE),
            )?;
        }
        if let Some(swa) = trainer.swa_model(source)? {
            if ranks.writes() {
                swa_models::train::save_weights(&backend, swa, &dir.join(SWA_WEIGHTS_FILE))?;
            }
        }
    }
    if !ranks.writes() {
        return Ok(());
    }
    let history = trainer.history().to_vec();
    let summary = report::RunSummary {
        model: recipe.architecture.to_string(),
        run,
        seed,
        budget: recipe.budget,
        epochs_planned: trainer.config().epochs,
        parameters: parameter_count(trainer.model() as &dyn Module<B>),
        shared_epochs: trainer.branched_epochs(),
        history,
    };
    let json = serde_json::to_vec_pretty(&summary)?;
    swa_models::checkpoint::write_atomically(&dir.join("history.json"), &json)?;
    Ok(())
}

fn estimate_epoch_seconds<B: Backend>(
    backend: &B,
    recipe: &presets::Recipe,
    classes: usize,
    source: &CifarSource,
) -> Result<f64> {
    use swa_models::batch::BatchSource;
    let per_image = seconds_per_training_image(
        backend,
        recipe.architecture,
        classes,
        recipe.weight_decay,
        source,
    )?;
    // Evaluation of the test set and BN recomputation cost about a third of a training step per image.
    let images = source.train_images() as f64 + source.test_len() as f64 / 3.0;
    Ok(per_image * images)
}

/// Seconds per image of the trainer's step on the first training batches of `source`, for a plan's time
/// estimate (0 when the source has fewer than two batches to time).
fn seconds_per_training_image<B: Backend>(
    backend: &B,
    architecture: swa_models::Architecture,
    classes: usize,
    weight_decay: f32,
    source: &dyn swa_models::batch::BatchSource,
) -> Result<f64> {
    let mut model = architecture.build(backend, classes, 0)?;
    let mut optimizer =
        swa_models::optim::Sgd::<B>::new(swa_models::optim::SgdConfig::momentum(weight_decay));
    let batches = source
        .train_epoch(0)
        .take(3)
        .collect::<Result<Vec<_>, _>>()?;
    let per_image =
        swa_models::step::seconds_per_image(backend, model.as_mut(), &mut optimizer, &batches)?;
    Ok(per_image.unwrap_or(0.0))
}

/// A learning rate as the logs show it: four decimals, or three significant digits below 10⁻³ (the ImageNet
/// cycles end at 10⁻⁵).
fn learning_rate(lr: f32) -> String {
    if lr != 0.0 && lr.abs() < 1e-3 {
        format!("{lr:.2e}")
    } else {
        format!("{lr:.4}")
    }
}

fn human_duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ if s < 3 * 86_400 => format!("{:.1} h", s as f64 / 3600.0),
        _ => format!("{:.1} days", s as f64 / 86_400.0),
    }
}

/// A progress bar over a run's steps, with a line per epoch.
pub(crate) struct Progress {
    bar: ProgressBar,
    label: String,
}

impl Progress {
    pub(crate) fn new(label: &str, epochs: usize, done: usize, steps: usize) -> Self {
        let total = (epochs * steps) as u64;
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} steps, {elapsed} elapsed, ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(label.to_string());
        bar.set_position((done * steps) as u64);
        bar.reset_eta();
        Self {
            bar,
            label: label.to_string(),
        }
    }

    pub(crate) fn finish(&self, seconds: f64) {
        self.bar.finish_and_clear();
        println!("{}: done in {}", self.label, human_duration(seconds));
    }
}

impl TrainObserver for Progress {
    fn on_step(&mut self, _epoch: usize, _step: usize, _steps: usize, loss: f32) {
        self.bar.inc(1);
        self.bar.set_message(format!("loss {loss:.3}"));
    }

    fn on_epoch(&mut self, r: &EpochRecord) {
        let swa = r
            .swa_test
            .map(|m| format!(" swa {:.2}%", m.accuracy))
            .unwrap_or_default();
        let fge = r
            .ensemble_test
            .map(|m| format!(" fge {:.2}% ({} members)", m.accuracy, r.snapshots))
            .unwrap_or_default();
        let line = format!(
            "{} epoch {:>3}: lr {} train loss {:.3} acc {:.2}% | test loss {:.3} acc {:.2}%{swa}{fge} | {:.0} s",
            self.label, r.epoch, learning_rate(r.lr_last), r.train.loss, r.train.accuracy, r.test.loss, r.test.accuracy, r.epoch_seconds
        );
        // A hidden bar (output not a terminal: logs, CI) prints nothing, not even its `println`s.
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}
