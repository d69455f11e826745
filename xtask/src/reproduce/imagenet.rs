//! `cargo xtask reproduce imagenet`: SWA from pretrained weights on an ImageFolder, the paper's Table 2.
//!
//! The protocol is `swa_models::protocol::PretrainedSwa`; this module finds the data (`DIR/train` and
//! `DIR/val`, torchvision's ImageFolder layout), feeds swa-data's JPEG pipeline to the trainer, prints the
//! plan, shows progress, and writes `OUT/imagenet/<model>/results.md` beside the paper's numbers. Like the
//! CIFAR runs it resumes from its checkpoints when run again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use swa_core::backend::Backend;
use swa_data::{
    BadImages, DataError, FolderBatchConfig, FolderBatches, FolderEpoch, FolderTransform,
    ImageFolder,
};
use swa_models::batch::{until_error, BatchResult, BatchSource};
use swa_models::evaluate::{evaluate, Metrics};
use swa_models::protocol::PretrainedSwa;
use swa_models::{Architecture, TrainError};

use super::report::{stat, Stat};
use super::source::host;
use super::{
    choose_device, human_duration, seconds_per_training_image, Device, Preset, Progress,
    ReproduceArgs,
};

/// The network when `--model` is not given.
const DEFAULT_MODEL: &str = "resnet50";
/// Side of the images of the smoke preset: small enough for a CI machine, and large enough that the last
/// stage keeps 2×2 positions, so that training-mode BatchNorm has more than one value per channel even
/// in a last batch of one image.
const SMOKE_IMAGE_SIDE: u32 = 64;

/// The recipe of a preset: the paper's, or two short epochs of small batches for trying the command.
fn recipe(
    preset: Preset,
    architecture: Architecture,
    batch_size: Option<usize>,
) -> Result<PretrainedSwa> {
    let mut recipe = match preset {
        Preset::Paper => PretrainedSwa::paper(architecture),
        Preset::Smoke => PretrainedSwa {
            epochs: 2,
            batch_size: 8,
            report_epochs: vec![1, 2],
            ..PretrainedSwa::paper(architecture)
        },
        Preset::Quick => {
            bail!("the quick preset is a CIFAR budget; ImageNet has the paper and smoke presets")
        }
    };
    if let Some(batch_size) = batch_size {
        recipe.batch_size = batch_size;
    }
    recipe.validate()?;
    Ok(recipe)
}

fn transform(preset: Preset) -> FolderTransform {
    match preset {
        Preset::Smoke => FolderTransform::with_size(SMOKE_IMAGE_SIDE),
        Preset::Paper | Preset::Quick => FolderTransform::IMAGENET,
    }
}

/// The paper's top-1 accuracies (Izmailov et al. 2018, Table 2): the pretrained network, then SWA after 5
/// and after 10 epochs (mean and standard deviation over 3 runs).
fn published(architecture: Architecture) -> Option<(f64, [(f64, f64); 2])> {
    match architecture.to_string().as_str() {
        "resnet50" => Some((76.15, [(76.83, 0.01), (76.97, 0.05)])),
        "resnet152" => Some((78.31, [(78.82, 0.01), (78.94, 0.07)])),
        "densenet161" => Some((77.65, [(78.26, 0.09), (78.44, 0.06)])),
        _ => None,
    }
}

/// The training and validation folders of `root`, with the same classes.
fn open_folders(
    root: &Path,
    bad_images: BadImages,
) -> Result<(Arc<ImageFolder>, Arc<ImageFolder>)> {
    let layout = "expected ImageNet's layout as torchvision's ImageFolder reads it: DIR/train/<class>/*.JPEG \
                  and DIR/val/<class>/*.JPEG, the validation images sorted into the same class folders";
    let open = |split: &str| -> Result<Arc<ImageFolder>> {
        let dir = root.join(split);
        if !dir.is_dir() {
            bail!("{}: no such folder; {layout}", dir.display());
        }
        Ok(Arc::new(
            ImageFolder::open_with(&dir, bad_images)
                .with_context(|| format!("{}: {layout}", dir.display()))?,
        ))
    };
    let (train, val) = (open("train")?, open("val")?);
    if train.classes() != val.classes() {
        let missing: Vec<&String> = train
            .classes()
            .iter()
            .filter(|c| !val.classes().contains(c))
            .chain(
                val.classes()
                    .iter()
                    .filter(|c| !train.classes().contains(c)),
            )
            .take(5)
            .collect();
        bail!(
            "{}: train has {} classes and val {}, not the same ones (first differing: {missing:?}); {layout}",
            root.display(),
            train.num_classes(),
            val.num_classes()
        );
    }
    Ok((train, val))
}

/// swa-data's ImageFolder batches as the trainer's batch source; images skipped under
/// `--bad-images skip` are collected for the report.
struct FolderSource {
    train: FolderBatches,
    val: FolderBatches,
    skipped: Mutex<Vec<String>>,
}

impl FolderSource {
    fn new(
        train: &Arc<ImageFolder>,
        val: &Arc<ImageFolder>,
        recipe: &PretrainedSwa,
        preset: Preset,
        bad_images: BadImages,
        seed: u64,
    ) -> Result<Self> {
        let configure = |mut config: FolderBatchConfig| {
            config.transform = transform(preset);
            config.bad_images = bad_images;
            config
        };
        Ok(FolderSource {
            train: FolderBatches::new(
                Arc::clone(train),
                configure(FolderBatchConfig::train(recipe.batch_size, seed)),
            )?,
            val: FolderBatches::new(
                Arc::clone(val),
                configure(FolderBatchConfig::eval(recipe.batch_size)),
            )?,
            skipped: Mutex::new(Vec::new()),
        })
    }

    fn epoch(
        &self,
        batches: &FolderBatches,
        epoch: usize,
    ) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        Box::new(Reported {
            epoch: batches.epoch(epoch as u64),
            skipped: &self.skipped,
        })
    }

    /// The images left out so far, `path: why`, each once.
    fn skipped(&self) -> Vec<String> {
        let mut skipped = self
            .skipped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        skipped.sort();
        skipped.dedup();
        skipped
    }
}

/// One epoch of folder batches as trainer batches, handing the images it left out to its source.
struct Reported<'a> {
    epoch: FolderEpoch,
    skipped: &'a Mutex<Vec<String>>,
}

impl Iterator for Reported<'_> {
    type Item = BatchResult;

    fn next(&mut self) -> Option<BatchResult> {
        let next = self.epoch.next();
        let left_out = self.epoch.take_skipped();
        if !left_out.is_empty() {
            let mut skipped = self.skipped.lock().unwrap_or_else(PoisonError::into_inner);
            skipped.extend(
                left_out
                    .into_iter()
                    .map(|s| format!("{}: {}", s.path.display(), s.error)),
            );
        }
        Some(match next? {
            Ok(batch) => Ok(host(batch)),
            Err(error) => Err(data_error(error)),
        })
    }
}

fn data_error(error: DataError) -> TrainError {
    TrainError::Data(Box::new(error))
}

impl BatchSource for FolderSource {
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        self.epoch(&self.train, epoch)
    }

    fn train_batches_per_epoch(&self) -> usize {
        self.train.batches_per_epoch()
    }

    fn test(&self) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        self.epoch(&self.val, 0)
    }

    fn test_len(&self) -> usize {
        self.val.folder().len()
    }
}

/// The pretrained network's validation metrics, kept so that a resumed run does not evaluate it again.
#[derive(Serialize, Deserialize)]
struct PretrainedEvaluation {
    weights: PathBuf,
    weights_bytes: u64,
    images: usize,
    metrics: Metrics,
}

/// What `results.json` holds.
#[derive(Serialize)]
struct ImageNetResults {
    model: String,
    weights: PathBuf,
    pretrained: Metrics,
    /// Per seed: the SWA average's metrics at each report epoch reached, `(epoch, metrics)`.
    swa: Vec<Vec<(usize, Metrics)>>,
    /// Images left out as unreadable (`--bad-images skip`).
    skipped_images: Vec<String>,
}

/// Runs `cargo xtask reproduce imagenet`.
pub fn run(args: &ReproduceArgs) -> Result<()> {
    for (given, flag) in [
        (args.budget.is_some(), "--budget"),
        (args.swa_start.is_some(), "--swa-start"),
        (args.lr.is_some(), "--lr"),
        (args.swa_lr.is_some(), "--swa-lr"),
        (args.train_limit.is_some(), "--train-limit"),
        (args.test_limit.is_some(), "--test-limit"),
    ] {
        if given {
            bail!("{flag} applies to reproduce cifar10 and cifar100 only");
        }
    }
    let Some(weights) = args.weights.as_deref() else {
        bail!(
            "reproduce imagenet starts from pretrained weights: give --weights FILE (torchvision's .pth, \
             e.g. resnet50-0676ba61.pth, or a safetensors file of the same state dict)"
        );
    };
    let Some(root) = args.data.as_deref() else {
        bail!("reproduce imagenet needs --data DIR, the folder holding train/ and val/");
    };
    let model = match args.models.as_slice() {
        [] => DEFAULT_MODEL,
        [one] => one.as_str(),
        more => bail!("reproduce imagenet trains one --model at a time, got {more:?}"),
    };
    let architecture: Architecture = model.parse()?;
    if !architecture.is_imagenet() {
        bail!("{architecture} is a CIFAR network; reproduce imagenet takes torchvision's networks (resnet50, resnet152, …)");
    }
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let recipe = recipe(args.preset, architecture, args.batch_size)?;
    let bad_images = if args.skip_bad_images {
        BadImages::Skip
    } else {
        BadImages::Fail
    };
    let (train, val) = open_folders(root, bad_images)?;
    let out = args.out.join("imagenet").join(architecture.to_string());
    match choose_device(args.device, args.threads)? {
        Device::Cpu(backend) => run_on(
            &backend, args, &recipe, weights, &train, &val, bad_images, &out,
        ),
        Device::Gpu(backend) => run_on(
            &backend, args, &recipe, weights, &train, &val, bad_images, &out,
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_on<B: Backend>(
    backend: &B,
    args: &ReproduceArgs,
    recipe: &PretrainedSwa,
    weights: &Path,
    train: &Arc<ImageFolder>,
    val: &Arc<ImageFolder>,
    bad_images: BadImages,
    out: &Path,
) -> Result<()> {
    let classes = train.num_classes();
    let architecture = recipe.architecture;
    // The weights are checked before anything is planned or trained.
    let mut pretrained = recipe
        .pretrained_network(backend, weights, classes)
        .with_context(|| {
            format!(
                "{}: not {architecture} weights for the {classes} classes of {}",
                weights.display(),
                train.root().display()
            )
        })?;
    let source = FolderSource::new(train, val, recipe, args.preset, bad_images, 1)?;
    println!(
        "reproduce ImageNet ({} preset) on {}: {architecture} from {}, {} train / {} val images, {classes} classes",
        args.preset,
        backend.name(),
        weights.display(),
        train.len(),
        val.len()
    );
    println!(
        "  SWA for {} epochs, one cycle per epoch from {} to {}, batch {}, weight decay {}, average reported after epochs {:?}, {} seed(s)",
        recipe.epochs, recipe.alpha1, recipe.alpha2, recipe.batch_size, recipe.weight_decay, recipe.report_epochs, args.seeds
    );
    let seconds_per_image =
        seconds_per_training_image(backend, architecture, classes, recipe.weight_decay, &source)?;
    let mut epochs_left = 0;
    for seed in 1..=args.seeds {
        let done = swa_models::train::find_checkpoints(&checkpoints(out, seed))?
            .last()
            .map_or(0, |c| c.0);
        epochs_left += recipe.epochs.saturating_sub(done);
    }
    // An evaluation image costs about a third of a training image; BatchNorm recomputation for the
    // average is a forward pass over the training images at each report epoch.
    let per_epoch = seconds_per_image * (train.len() as f64 + val.len() as f64 / 3.0);
    let reports = seconds_per_image * (train.len() + val.len()) as f64 / 3.0
        * recipe.report_epochs.len() as f64;
    println!(
        "  ~{:.0} s an epoch, {epochs_left} epochs to train: estimated total {}",
        per_epoch,
        human_duration(per_epoch * epochs_left as f64 + reports * args.seeds as f64)
    );

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let before = evaluate_pretrained(backend, pretrained.as_mut(), &source, weights, out)?;
    drop(pretrained);
    println!(
        "{architecture} pretrained: top-1 {:.2}%, top-5 {}",
        before.accuracy,
        percent(before.top5_accuracy)
    );

    let mut per_seed = Vec::new();
    let mut skipped_images = source.skipped();
    for seed in 1..=args.seeds {
        let source = FolderSource::new(train, val, recipe, args.preset, bad_images, seed)?;
        let label = format!("{architecture} seed {seed} swa");
        let (mut trainer, done) = recipe
            .trainer(backend, weights, classes, seed, &checkpoints(out, seed))
            .with_context(|| format!("{label}: starting from {}", weights.display()))?;
        if done >= recipe.epochs {
            println!("{label}: finished earlier ({done} epochs)");
        } else {
            if done > 0 {
                println!("{label}: resuming after epoch {done}");
            }
            let mut observer = Progress::new(
                &label,
                recipe.epochs,
                done,
                source.train_batches_per_epoch(),
            );
            let started = Instant::now();
            while trainer.epochs_done() < recipe.epochs {
                trainer.run_epoch(&source, &mut observer).with_context(|| {
                    format!(
                        "{label} (checkpoints in {})",
                        checkpoints(out, seed).display()
                    )
                })?;
            }
            observer.finish(started.elapsed().as_secs_f64());
        }
        let seed_dir = out.join(format!("seed-{seed}"));
        let history = trainer.history().to_vec();
        swa_models::checkpoint::write_atomically(
            &seed_dir.join("history.json"),
            &serde_json::to_vec_pretty(&history)?,
        )?;
        if trainer.epochs_done() == recipe.epochs {
            let backend = trainer.backend().clone();
            if let Some(swa) = trainer.swa_model(&source)? {
                // The format users of torchvision load, and safetensors.
                for file in ["swa.pth", "swa.safetensors"] {
                    swa_models::train::save_weights(&backend, swa, &seed_dir.join(file))?;
                }
            }
        }
        per_seed.push(
            history
                .iter()
                .filter_map(|r| r.swa_test.map(|m| (r.epoch, m)))
                .collect::<Vec<_>>(),
        );
        let skipped = source.skipped();
        if let Some(first) = skipped.first() {
            println!(
                "{label}: {} unreadable images left out, e.g. {first}",
                skipped.len()
            );
        }
        skipped_images.extend(skipped);
    }
    skipped_images.sort();
    skipped_images.dedup();
    let results = ImageNetResults {
        model: architecture.to_string(),
        weights: weights.to_path_buf(),
        pretrained: before,
        swa: per_seed,
        skipped_images,
    };
    swa_models::checkpoint::write_atomically(
        &out.join("results.json"),
        &serde_json::to_vec_pretty(&results)?,
    )?;
    let table = results_table(&results, recipe, architecture);
    swa_models::checkpoint::write_atomically(&out.join("results.md"), table.as_bytes())?;
    println!("{table}");
    println!("wrote {}", out.join("results.md").display());
    Ok(())
}

fn checkpoints(out: &Path, seed: u64) -> PathBuf {
    out.join(format!("seed-{seed}")).join("checkpoints")
}

/// The pretrained network's metrics on the validation images, from the cache in `out` when it was
/// computed for the same weights file and images.
fn evaluate_pretrained<B: Backend>(
    backend: &B,
    network: &mut dyn swa_models::Module<B>,
    source: &FolderSource,
    weights: &Path,
    out: &Path,
) -> Result<Metrics> {
    let cache = out.join("pretrained.json");
    let weights_bytes = std::fs::metadata(weights)
        .with_context(|| format!("reading {}", weights.display()))?
        .len();
    let images = source.test_len();
    if let Ok(bytes) = std::fs::read(&cache) {
        if let Ok(cached) = serde_json::from_slice::<PretrainedEvaluation>(&bytes) {
            if cached.weights == weights
                && cached.weights_bytes == weights_bytes
                && cached.images == images
            {
                return Ok(cached.metrics);
            }
        }
    }
    let metrics = until_error(source.test(), |batches| evaluate(backend, network, batches))
        .context("evaluating the pretrained network")?;
    let record = PretrainedEvaluation {
        weights: weights.to_path_buf(),
        weights_bytes,
        images,
        metrics,
    };
    swa_models::checkpoint::write_atomically(&cache, &serde_json::to_vec_pretty(&record)?)?;
    Ok(metrics)
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.2}%"))
}

fn results_table(
    results: &ImageNetResults,
    recipe: &PretrainedSwa,
    architecture: Architecture,
) -> String {
    let paper = published(architecture);
    let seeds = results.swa.len();
    let mut table = format!(
        "# SWA from pretrained weights: {architecture}\n\n\
         Weights `{}`; top-1 and top-5 accuracy (%) on the validation images, mean ± standard deviation \
         over {seeds} seed(s); the paper's top-1 (Izmailov et al. 2018, Table 2) beside.\n\n\
         | | top-1 | top-5 | paper top-1 |\n|---|---:|---:|---:|\n",
        results.weights.display()
    );
    table.push_str(&format!(
        "| pretrained | {:.2} | {} | {} |\n",
        results.pretrained.accuracy,
        results
            .pretrained
            .top5_accuracy
            .map_or("–".into(), |v| format!("{v:.2}")),
        paper.map_or("–".into(), |(sgd, _)| format!("{sgd:.2}"))
    ));
    for &epoch in &recipe.report_epochs {
        let at: Vec<Metrics> = results
            .swa
            .iter()
            .filter_map(|seed| seed.iter().find(|(e, _)| *e == epoch).map(|(_, m)| *m))
            .collect();
        let top1 = stat(&at.iter().map(|m| m.accuracy).collect::<Vec<_>>());
        let top5 = stat(
            &at.iter()
                .filter_map(|m| m.top5_accuracy)
                .collect::<Vec<_>>(),
        );
        let cell = |v: Option<Stat>| match v {
            Some(s) if s.seeds > 1 => format!("{:.2} ± {:.2}", s.mean, s.std),
            Some(s) => format!("{:.2}", s.mean),
            None => "–".into(),
        };
        // The paper reports SWA after 5 and 10 epochs; other report epochs have no published value.
        let published_cell = paper
            .and_then(|(_, swa)| match epoch {
                5 => Some(swa[0]),
                10 => Some(swa[1]),
                _ => None,
            })
            .map_or("–".into(), |(mean, std)| format!("{mean:.2} ± {std:.2}"));
        table.push_str(&format!(
            "| SWA, {epoch} epochs | {} | {} | {published_cell} |\n",
            cell(top1),
            cell(top5)
        ));
    }
    if !results.skipped_images.is_empty() {
        table.push_str(&format!(
            "\n{} unreadable images were left out (`--skip-bad-images`); results.json lists them.\n",
            results.skipped_images.len()
        ));
    }
    table
}
