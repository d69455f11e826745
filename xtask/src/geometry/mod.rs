//! `cargo xtask geometry rays|line|plane|all --run DIR`: the paper's flatness figures for the runs of one
//! seed that `cargo xtask reproduce` trained (`OUT/<data>/<model>/seed-<s>`).
//!
//! The surveys, their evaluation and the flatness numbers are `swa_models::geometry`'s; this command
//! finds the checkpoints, loads the data, shows progress, and writes `geometry.json`, `results.md` and
//! SVG figures into `DIR/geometry` (every finished point is cached there, so a killed survey resumes).

mod plots;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use swa_core::backend::Backend;
use swa_core::CpuBackend;
use swa_data::{BatchConfig, Batches, DatasetKind};
use swa_models::geometry::{
    line, linspace, plane, ray_seed, rays, run_survey, run_survey_across_ranks, Metric, PlaneMark,
    PointCache, PointMetrics, RayWidth, SeedRuns, SurfaceData, SurfaceProbe, Survey, WeightsFile,
};
use swa_models::protocol::RunKind;
use swa_models::{Architecture, HostBatch};

use crate::reproduce::ranks::Ranks;
use crate::reproduce::{choose_device, normalization_of, write_reports, Device, DeviceChoice};

/// Which figures to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Figures {
    /// Random rays from the SGD and SWA solutions, and the flatness summary.
    Rays,
    /// The line through SGD and SWA.
    Line,
    /// Planes through three points (those whose checkpoints the runs have).
    Plane,
    /// All of the above.
    All,
}

/// The planes of the paper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlaneKind {
    /// SGD at convergence, SWA, and the common start from which both continued.
    SgdSwa,
    /// Three consecutive FGE snapshots, the SWA solution projected.
    Fge,
    /// First, middle and last snapshot of the SWA run's constant-learning-rate trajectory.
    Constant,
    /// First, middle and last snapshot of the FGE run's cyclical-learning-rate trajectory.
    Cyclical,
}

impl PlaneKind {
    fn name(self) -> &'static str {
        match self {
            PlaneKind::SgdSwa => "plane-sgd-swa",
            PlaneKind::Fge => "plane-fge",
            PlaneKind::Constant => "plane-constant-lr",
            PlaneKind::Cyclical => "plane-cyclical-lr",
        }
    }

    fn title(self) -> &'static str {
        match self {
            PlaneKind::SgdSwa => "SGD, SWA and their common start",
            PlaneKind::Fge => "three FGE snapshots and SWA",
            PlaneKind::Constant => "constant learning rate: first, middle, last snapshot",
            PlaneKind::Cyclical => "cyclical learning rate: first, middle, last snapshot",
        }
    }
}

/// The arguments of the commands that work on one seed's finished runs (`geometry`, `calibrate`).
#[derive(Args, Debug, Clone)]
pub struct SeedFolderArgs {
    /// The folder of one seed's runs, as `cargo xtask reproduce` writes it:
    /// `OUT/<data>/<model>/seed-<s>` with `sgd/`, `swa/` (and `fge/`) inside.
    #[arg(long)]
    pub run: PathBuf,
    /// Output folder (default: a folder named after the command inside RUN).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Data folder or archive (default: `$SWA_DATA_DIR` or the cache).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The data set (default: the name of RUN's grandparent folder, `cifar10` or `cifar100`).
    #[arg(long, value_enum)]
    pub data_set: Option<crate::data::DatasetArg>,
}

impl SeedFolderArgs {
    /// The seed's runs, network and data set, and the output folder (`RUN/<name>` by default), created.
    pub fn open(&self, name: &str) -> Result<(SeedRuns, Architecture, DatasetKind, PathBuf)> {
        let runs = SeedRuns::open(&self.run)?;
        let (architecture, kind) = identify(&self.run, self.data_set)?;
        let out = self.out.clone().unwrap_or_else(|| self.run.join(name));
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        Ok((runs, architecture, kind, out))
    }

    /// The data set as evaluation batches (no augmentation) for the seed's `runs`: the first
    /// `train_limit` images of those the runs trained on, the training images they held out
    /// ([`SeedRuns::holdout`]), and the first `test_limit` test images.
    pub fn load_batches(
        &self,
        kind: DatasetKind,
        runs: &SeedRuns,
        architecture: Architecture,
        (train_limit, test_limit): (usize, usize),
        batch_size: usize,
    ) -> Result<SeedBatches> {
        if batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let splits = crate::data::load_splits(kind, self.data.as_deref())?;
        let classes = splits.train.num_classes();
        let (trained, held_out) = splits.train.hold_out(runs.holdout()?)?;
        Ok(SeedBatches {
            train: eval_batches(trained, train_limit, batch_size, architecture)?,
            holdout: eval_batches(held_out, usize::MAX, batch_size, architecture)?,
            test: eval_batches(splits.test, test_limit, batch_size, architecture)?,
            classes,
        })
    }
}

/// A seed's images as evaluation batches ([`SeedFolderArgs::load_batches`]).
pub struct SeedBatches {
    /// Training images the runs trained on.
    pub train: Vec<HostBatch>,
    /// Training images the runs held out (none for the paper's protocol).
    pub holdout: Vec<HostBatch>,
    /// Test images.
    pub test: Vec<HostBatch>,
    /// The data set's class count.
    pub classes: usize,
}

/// Arguments of `cargo xtask geometry`.
#[derive(Args, Debug)]
pub struct GeometryArgs {
    /// The figures.
    #[arg(value_enum)]
    pub figures: Figures,
    /// The seed's runs, the data and where to write.
    #[command(flatten)]
    pub folder: SeedFolderArgs,
    /// Random rays per solution.
    #[arg(long, default_value_t = 10)]
    pub rays: usize,
    /// Points per ray and on the line.
    #[arg(long, default_value_t = 13)]
    pub points: usize,
    /// Distances along the rays, `START:END` in weight-space units (default: 0 to 4 times the distance
    /// between the SGD and SWA solutions).
    #[arg(long, value_parser = parse_range)]
    pub ray_range: Option<(f64, f64)>,
    /// The line's `t` range, `START:END` (t = 0 is SWA, t = 1 SGD).
    #[arg(long, value_parser = parse_range, default_value = "-1:2")]
    pub line_range: (f64, f64),
    /// Plane grid, `COLUMNSxROWS`.
    #[arg(long, value_parser = parse_grid, default_value = "13x13")]
    pub grid: (usize, usize),
    /// Margin of the plane grid around its points, as a fraction of their extent.
    #[arg(long, default_value_t = 0.3)]
    pub margin: f64,
    /// Which planes (default: every one whose checkpoints the runs have).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub planes: Vec<PlaneKind>,
    /// Training images for BatchNorm recomputation and the train loss (the first N; default: 5000 on a
    /// CPU, all on a GPU).
    #[arg(long)]
    pub train_subset: Option<usize>,
    /// Test images (the first N; default: all).
    #[arg(long)]
    pub test_subset: Option<usize>,
    /// Batch size of the BatchNorm pass and of evaluation.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Seed of the ray directions.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rise of the train loss above its value at the solution that ends a basin, for the flatness summary.
    #[arg(long, default_value_t = 0.1)]
    pub loss_rise: f64,
    /// Rise of the test error (percentage points) that ends a basin, for the flatness summary.
    #[arg(long, default_value_t = 2.0)]
    pub error_rise: f64,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// CPU threads in all (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Points evaluated side by side on the CPU, each by its own network with an equal share of the
    /// threads (on a GPU: one).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Under mpirun: seconds a collective between ranks may wait before the survey is aborted as
    /// stalled (it must exceed the evaluation of a point).
    #[arg(long, default_value_t = 3600)]
    pub collective_timeout: u64,
}

fn parse_range(text: &str) -> Result<(f64, f64), String> {
    let (a, b) = text
        .split_once(':')
        .ok_or_else(|| format!("expected START:END, got {text:?}"))?;
    let parse = |s: &str| {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("{s:?} is not a finite number"))
    };
    let (a, b) = (parse(a)?, parse(b)?);
    if a >= b {
        return Err(format!(
            "the range {text:?} is empty: START must be below END"
        ));
    }
    Ok((a, b))
}

fn parse_grid(text: &str) -> Result<(usize, usize), String> {
    let (a, b) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("expected COLUMNSxROWS, got {text:?}"))?;
    let parse = |s: &str| {
        s.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n >= 2)
            .ok_or_else(|| format!("{s:?} is not a count of at least 2"))
    };
    Ok((parse(a)?, parse(b)?))
}

/// Everything written to `geometry.json`: enough to evaluate any point again elsewhere.
#[derive(Serialize)]
struct Report {
    run: PathBuf,
    model: String,
    data_set: String,
    weight_decay: f32,
    train_images: usize,
    test_images: usize,
    batch_size: usize,
    device: String,
    solutions: Vec<Anchor>,
    surveys: Vec<SurveyReport>,
    flatness: Vec<RayWidth>,
}

#[derive(Serialize)]
struct Anchor {
    label: String,
    path: PathBuf,
    norm: f64,
}

#[derive(Serialize)]
struct SurveyReport {
    name: String,
    /// How the points are built from the anchors.
    construction: String,
    /// The weight files the construction starts from.
    anchors: Vec<Anchor>,
    /// Rays: the seed of each direction (ChaCha8 + standard normal, normalised).
    direction_seeds: Vec<u64>,
    /// Planes: the marked points in plane coordinates.
    marks: Vec<PlaneMark>,
    grid: Option<(usize, usize)>,
    seconds: f64,
    points: Vec<PointReport>,
}

#[derive(Serialize)]
struct PointReport {
    series: String,
    coordinates: Vec<f64>,
    metrics: PointMetrics,
}

/// Runs the command.
pub fn run(args: GeometryArgs) -> Result<()> {
    let ranks = Ranks::join(Duration::from_secs(args.collective_timeout))?;
    let outcome = survey_on(&args, &ranks);
    ranks.end_all_on_error(outcome)
}

/// The command on this process's rank: under mpirun, every rank evaluates its share of each survey's
/// points and rank 0 alone prints, caches and writes.
fn survey_on(args: &GeometryArgs, ranks: &Ranks) -> Result<()> {
    let (runs, architecture, kind, out) = args.folder.open("geometry")?;

    match choose_device(args.device, args.threads)? {
        Device::Cpu(_) => {
            let threads = args.threads.unwrap_or_else(num_cpus).max(1);
            let workers = args.workers.clamp(1, threads);
            // One probe of all threads by default: measured with swa-bench's geometry suite on a 2-core
            // AMD EPYC, it evaluates PreResNet-20's points 1.4 times as fast as two single-threaded
            // probes, whose networks and activations share the caches.
            let probes = (0..workers)
                .map(|_| CpuBackend::with_threads(threads / workers))
                .collect();
            survey_all(args, ranks, &runs, architecture, kind, &out, probes, 5000)
        }
        Device::Gpu(gpu) => survey_all(
            args,
            ranks,
            &runs,
            architecture,
            kind,
            &out,
            vec![gpu],
            usize::MAX,
        ),
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The network and data set of a run folder `OUT/<data>/<model>/seed-<s>` (the data set given overrides
/// the folder's name).
fn identify(
    run: &Path,
    data_set: Option<crate::data::DatasetArg>,
) -> Result<(Architecture, DatasetKind)> {
    let dir = run
        .canonicalize()
        .with_context(|| format!("{}", run.display()))?;
    let model_dir = dir.parent();
    let name_of = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .map(str::to_string)
    };
    let model = name_of(model_dir).with_context(|| {
        format!(
            "{}: expected a seed folder OUT/<data>/<model>/seed-<s>",
            dir.display()
        )
    })?;
    let architecture: Architecture = model.parse().with_context(|| {
        format!(
            "{}: the folder above a seed folder names the network",
            dir.display()
        )
    })?;
    let kind = match data_set {
        Some(arg) => arg.into(),
        None => match name_of(model_dir.and_then(Path::parent)).as_deref() {
            Some("cifar10") => DatasetKind::Cifar10,
            Some("cifar100") => DatasetKind::Cifar100,
            other => bail!(
                "{}: cannot tell the data set from the folder name {other:?}; pass --data-set",
                dir.display()
            ),
        },
    };
    Ok((architecture, kind))
}

/// Batches of the first `limit` images of a split, in order, without augmentation (none for an empty
/// split).
fn eval_batches(
    split: swa_data::Dataset,
    limit: usize,
    batch_size: usize,
    architecture: Architecture,
) -> Result<Vec<HostBatch>> {
    if split.is_empty() || limit == 0 {
        return Ok(Vec::new());
    }
    let split = if limit < split.len() {
        split.head(limit)
    } else {
        split
    };
    let batches = Batches::new(
        Arc::new(split),
        BatchConfig::eval(batch_size, normalization_of(architecture)),
    )?;
    Ok(batches
        .epoch(0)
        .map(|b| {
            let shape = b.shape();
            HostBatch {
                images: b.images,
                shape,
                labels: b.labels,
            }
        })
        .collect())
}

#[allow(clippy::too_many_arguments)]
fn survey_all<B: Backend + Send>(
    args: &GeometryArgs,
    ranks: &Ranks,
    runs: &SeedRuns,
    architecture: Architecture,
    kind: DatasetKind,
    out: &Path,
    backends: Vec<B>,
    default_train_subset: usize,
) -> Result<()> {
    let SeedBatches {
        train,
        test,
        classes,
        ..
    } = args.folder.load_batches(
        kind,
        runs,
        architecture,
        (
            args.train_subset.unwrap_or(default_train_subset),
            args.test_subset.unwrap_or(usize::MAX),
        ),
        args.batch_size,
    )?;
    let data = SurfaceData {
        train: &train,
        test: &test,
    };
    let weight_decay = runs.weight_decay()?;
    let device = backends
        .first()
        .map(|b| format!("{} x {}", backends.len(), b.name()))
        .unwrap_or_default();
    let writes = ranks.writes();
    let communicator = ranks.communicator().as_ref();
    if writes {
        println!(
            "geometry of {architecture} on {} ({} train / {} test images, weight decay {weight_decay}) \
             on {device}{}",
            kind.display_name(),
            data.train_images(),
            data.test_images(),
            match communicator.size() {
                1 => String::new(),
                n => format!(" on each of {n} ranks"),
            }
        );
    }
    let build_probes = || -> Result<Vec<SurfaceProbe<B>>> {
        backends
            .iter()
            .map(|b| {
                Ok(SurfaceProbe::new(
                    b.clone(),
                    architecture.build(b, classes, 0)?,
                    weight_decay,
                ))
            })
            .collect()
    };
    let layout = build_probes()?
        .first()
        .map(|p| p.layout().clone())
        .context("no device to evaluate on")?;
    let load = |file: &WeightsFile| -> Result<(String, swa_models::geometry::WeightVector)> {
        let vector = layout
            .load(&file.path)
            .with_context(|| format!("{} ({})", file.label, file.path.display()))?;
        Ok((file.label.clone(), vector))
    };

    let context = [
        weight_decay.to_bits() as u64,
        data.train_images() as u64,
        data.test_images() as u64,
        args.batch_size as u64,
        classes as u64,
    ];
    let mut report = Report {
        run: args.folder.run.clone(),
        model: architecture.to_string(),
        data_set: kind.cli_name().to_string(),
        weight_decay,
        train_images: data.train_images(),
        test_images: data.test_images(),
        batch_size: args.batch_size,
        device,
        solutions: Vec::new(),
        surveys: Vec::new(),
        flatness: Vec::new(),
    };
    let wants = |f: Figures| args.figures == f || args.figures == Figures::All;
    let evaluate = |survey: &Survey| -> Result<(Vec<PointMetrics>, f64)> {
        let path = out.join(format!("{}.jsonl", survey.name));
        // Rank 0 alone keeps the cache; the other ranks learn from it which points are done.
        let mut cache = if writes {
            Some(PointCache::open(
                &path,
                survey,
                survey.fingerprint(&context),
            )?)
        } else {
            None
        };
        let pending = cache
            .as_ref()
            .map_or(survey.points.len(), |c| c.pending().len());
        let bar = if writes {
            progress(&survey.name, survey.points.len(), pending)
        } else {
            ProgressBar::hidden()
        };
        let started = Instant::now();
        let show = |m: &PointMetrics| {
            bar.inc(1);
            bar.set_message(format!(
                "train loss {:.3}, test error {:.2}%",
                m.train_loss, m.test_error
            ));
        };
        let metrics = match cache.as_mut() {
            Some(cache) if communicator.size() == 1 => {
                run_survey(survey, data, build_probes()?, cache, |_, m| show(m))?
            }
            cache => run_survey_across_ranks(
                communicator,
                survey,
                data,
                build_probes()?,
                cache,
                |_, m| show(m),
            )?,
        };
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        if writes {
            println!(
                "{}: {} points ({} cached) in {:.0} s{}",
                survey.name,
                survey.points.len(),
                survey.points.len() - pending,
                seconds,
                if pending > 0 {
                    format!(", {:.1} s a point", seconds / pending as f64)
                } else {
                    String::new()
                }
            );
        }
        Ok((metrics, seconds))
    };

    let mut written = Vec::new();
    let solutions = if wants(Figures::Rays) || wants(Figures::Line) {
        let files = [runs.sgd_solution()?, runs.swa_solution()?];
        let sgd = load(&files[0])?;
        let swa = load(&files[1])?;
        for (file, (_, v)) in files.iter().zip([&sgd, &swa]) {
            report.solutions.push(Anchor {
                label: file.label.clone(),
                path: file.path.clone(),
                norm: v.norm(),
            });
        }
        Some((sgd, swa))
    } else {
        None
    };

    if let Some(((_, sgd), (_, swa))) = &solutions {
        let span = sgd.distance(swa);
        if writes {
            println!("distance between the SGD and SWA solutions: {span:.3}");
        }
        if wants(Figures::Line) {
            let ts = linspace(args.line_range.0, args.line_range.1, args.points.max(2));
            let survey = line(sgd, swa, &ts)?;
            let (metrics, seconds) = evaluate(&survey)?;
            let path = out.join("line.svg");
            if writes {
                plots::line(&path, &architecture.to_string(), span, &survey, &metrics)?;
                written.push(path);
            }
            report.surveys.push(survey_report(
                &survey,
                &metrics,
                seconds,
                "w(t) = t·w_SGD + (1 − t)·w_SWA; coordinates [t, t·|w_SGD − w_SWA|]",
                &report.solutions,
            ));
        }
        if wants(Figures::Rays) {
            let (start, end) = args.ray_range.unwrap_or((0.0, 4.0 * span));
            let distances = linspace(start, end, args.points.max(2));
            let survey = rays(
                &[("SGD", sgd), ("SWA", swa)],
                args.rays,
                &distances,
                args.seed,
            )?;
            let (metrics, seconds) = evaluate(&survey)?;
            let path = out.join("rays.svg");
            if writes {
                plots::rays(&path, &architecture.to_string(), &survey, &metrics)?;
                written.push(path);
            }
            let mut entry = survey_report(
                &survey,
                &metrics,
                seconds,
                "w + t·d_k, d_k uniform on the unit sphere (the same directions for every solution); \
                 coordinates [t]",
                &report.solutions,
            );
            entry.direction_seeds = (0..args.rays).map(|k| ray_seed(args.seed, k)).collect();
            report.surveys.push(entry);
            report.flatness = flatness(&survey, &metrics, args.loss_rise, args.error_rise);
        }
    }

    if wants(Figures::Plane) {
        let kinds = if args.planes.is_empty() {
            vec![
                PlaneKind::SgdSwa,
                PlaneKind::Fge,
                PlaneKind::Constant,
                PlaneKind::Cyclical,
            ]
        } else {
            args.planes.clone()
        };
        for plane_kind in kinds {
            let files = match plane_files(runs, plane_kind) {
                Ok(files) => files,
                Err(e) if args.planes.is_empty() => {
                    if writes {
                        println!("{}: skipped: {e}", plane_kind.name());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (defining, projected) = files;
            let loaded: Vec<(String, _)> = defining.iter().map(&load).collect::<Result<_>>()?;
            let extra: Vec<(String, _)> = projected.iter().map(&load).collect::<Result<_>>()?;
            let defining_refs = [0, 1, 2].map(|i| (loaded[i].0.as_str(), &loaded[i].1));
            let extra_refs: Vec<(&str, _)> = extra.iter().map(|(l, v)| (l.as_str(), v)).collect();
            let built = plane(
                plane_kind.name(),
                defining_refs,
                &extra_refs,
                args.grid,
                args.margin,
            )?;
            let (metrics, seconds) = evaluate(&built.survey)?;
            for metric in [Metric::TrainLoss, Metric::TestError]
                .into_iter()
                .filter(|_| writes)
            {
                let path = out.join(format!(
                    "{}-{}.svg",
                    plane_kind.name(),
                    metric.name().replace('_', "-")
                ));
                plots::plane(
                    &path,
                    &format!("{architecture}: {}", plane_kind.title()),
                    &built,
                    &metrics,
                    metric,
                )?;
                written.push(path);
            }
            let anchors = defining
                .iter()
                .chain(&projected)
                .zip(loaded.iter().chain(&extra))
                .map(|(f, (_, v))| Anchor {
                    label: f.label.clone(),
                    path: f.path.clone(),
                    norm: v.norm(),
                })
                .collect::<Vec<_>>();
            let mut entry = survey_report(
                &built.survey,
                &metrics,
                seconds,
                "origin w1, u = (w2 − w1)/|w2 − w1|, v = the part of w3 − w1 orthogonal to u, \
                 normalised; points origin + x·u + y·v; coordinates [x, y]",
                &anchors,
            );
            entry.marks = built.marks.clone();
            entry.grid = Some(built.grid);
            report.surveys.push(entry);
        }
    }

    if !writes {
        return Ok(());
    }
    let json_path = out.join("geometry.json");
    let json = serde_json::to_vec_pretty(&report)?;
    swa_models::checkpoint::write_atomically(&json_path, &json)?;
    written.push(json_path);
    let md_path = out.join("results.md");
    swa_models::checkpoint::write_atomically(&md_path, markdown(&report).as_bytes())?;
    written.push(md_path);
    // The data set's report gathers the flatness of every surveyed seed, when RUN lies where
    // `cargo xtask reproduce` puts seeds (OUT/<data>/<model>/seed-<s>).
    if let Some(data_dir) = args
        .folder
        .run
        .canonicalize()?
        .parent()
        .and_then(Path::parent)
    {
        if data_dir.file_name().and_then(|n| n.to_str()) == Some(kind.cli_name()) {
            written.extend(write_reports(data_dir, kind)?);
        }
    }
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

type PlaneFiles = (Vec<WeightsFile>, Vec<WeightsFile>);

/// The three defining weight files of a plane, and those projected onto it.
fn plane_files(runs: &SeedRuns, kind: PlaneKind) -> Result<PlaneFiles> {
    Ok(match kind {
        PlaneKind::SgdSwa => (
            vec![
                runs.sgd_solution()?,
                runs.swa_solution()?,
                runs.common_start()?,
            ],
            Vec::new(),
        ),
        PlaneKind::Fge => (runs.fge_snapshots()?.to_vec(), vec![runs.swa_solution()?]),
        PlaneKind::Constant => (runs.trajectory(RunKind::Swa)?.to_vec(), Vec::new()),
        PlaneKind::Cyclical => (runs.trajectory(RunKind::Fge)?.to_vec(), Vec::new()),
    })
}

fn survey_report(
    survey: &Survey,
    metrics: &[PointMetrics],
    seconds: f64,
    construction: &str,
    anchors: &[Anchor],
) -> SurveyReport {
    SurveyReport {
        name: survey.name.clone(),
        construction: construction.to_string(),
        anchors: anchors
            .iter()
            .map(|a| Anchor {
                label: a.label.clone(),
                path: a.path.clone(),
                norm: a.norm,
            })
            .collect(),
        direction_seeds: Vec::new(),
        marks: Vec::new(),
        grid: None,
        seconds,
        points: survey
            .points
            .iter()
            .zip(metrics)
            .map(|(p, m)| PointReport {
                series: p.series.clone(),
                coordinates: p.coordinates.clone(),
                metrics: *m,
            })
            .collect(),
    }
}

/// Ray widths of each solution for the train loss and the test error.
fn flatness(
    survey: &Survey,
    metrics: &[PointMetrics],
    loss_rise: f64,
    error_rise: f64,
) -> Vec<RayWidth> {
    let mut widths = Vec::new();
    for solution in ["SGD", "SWA"] {
        for (metric, threshold) in [
            (Metric::TrainLoss, loss_rise),
            (Metric::TestError, error_rise),
        ] {
            let curves = plots::ray_curves(survey, metrics, solution, metric);
            widths.push(RayWidth::of(solution, metric.name(), threshold, &curves));
        }
    }
    widths
}

fn markdown(report: &Report) -> String {
    let mut text = format!(
        "# Loss-surface geometry: {} on {}\n\n{} train images (BatchNorm recomputed on them at every point), \
         {} test images, weight decay {} in the train loss; {}.\n\n",
        report.model,
        report.data_set,
        report.train_images,
        report.test_images,
        report.weight_decay,
        report.device
    );
    if !report.flatness.is_empty() {
        text.push_str(
            "## Flatness along random rays\n\nDistance from the solution at which the metric first rises by the \
             threshold above its value at the solution (mean ± std over rays; the same directions for both \
             solutions).\n\n| solution | metric | at the solution | rise | distance |\n|---|---|---:|---:|---:|\n",
        );
        for w in &report.flatness {
            text.push_str(&format!(
                "| {} | {} | {:.4} | {} | {} |\n",
                w.solution,
                w.metric,
                w.at_solution,
                w.threshold,
                w.describe()
            ));
        }
        text.push('\n');
    }
    text.push_str("## Surveys\n\n| survey | points | seconds |\n|---|---:|---:|\n");
    for s in &report.surveys {
        text.push_str(&format!(
            "| {} | {} | {:.0} |\n",
            s.name,
            s.points.len(),
            s.seconds
        ));
    }
    text
}

fn progress(name: &str, total: usize, pending: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} points, {elapsed} elapsed, ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(name.to_string());
    bar.set_position((total - pending) as u64);
    bar.reset_eta();
    bar
}
