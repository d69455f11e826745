//! Data-parallel training over MPI, run as two ranks under `mpirun` and checked against one process:
//! two ranks end with the weights one process reaches on the same global batches (up to the order of
//! floating-point additions), bit-identical from run to run and on both ranks; BatchNorm recomputed over
//! the ranks' shards equals one process's over all of them; an SWA run keeps the same average on both
//! ranks and resumes from rank 0's checkpoint to the uninterrupted result; SWAP's averaged weights are the
//! mean of the ranks' independently trained ones, with BatchNorm as one process computes it over all
//! shards; synchronised BatchNorm trains as one process on the global batch; evaluation, ensembles and
//! survey points shared between the ranks equal one process's; three ranks with uneven shards train and
//! recompute BatchNorm as one process; a rank that is killed, panics or stalls ends the run with a message
//! within a bounded time.
//!
//! Each test starts `mpirun -np 2 --oversubscribe` (one test `-np 3`) on this test binary itself, running only
//! [`mpi_rank`], which reads its scenario from [`SCENARIO`]. `mpirun` must be on the PATH (Debian's
//! `openmpi-bin`); without it the tests fail and say so.

#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use swa_core::averaging::{BufferPolicy, WeightRule};
use swa_core::schedule::{Period, Schedule};
use swa_core::CpuBackend;
use swa_models::batch::BatchResult;
use swa_models::checkpoint::{save_module, StateDict, StoredTensor};
use swa_models::distributed::mpi::{MpiCommunicator, PANIC_EXIT_CODE, STALLED_EXIT_CODE};
use swa_models::distributed::{
    add_ensemble_member_across_ranks, evaluate_across_ranks, shard, update_bn_across_ranks,
    BatchNormMode, Communicator, ShardedBatches, SingleProcess,
};
use swa_models::evaluate::{Ensemble, Metrics};
use swa_models::geometry::{
    line, run_survey, run_survey_across_ranks, PointCache, PointMetrics, SurfaceData, SurfaceProbe,
    WeightVector,
};
use swa_models::layers::{
    AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, Flatten, Linear, ReLU, Sequential,
};
use swa_models::optim::SgdConfig;
use swa_models::protocol::{independent_dir, run_swap, Recipe, SwapData};
use swa_models::train::{
    RunConfig, Silent, SnapshotUse, Snapshots, TrainObserver, Trainer, MODEL_FILE,
};
use swa_models::{update_bn, Architecture, BatchSource, HostBatch, Module};

/// The environment variable that names a rank's scenario.
const SCENARIO: &str = "SWA_MPI_SCENARIO";
/// The environment variable that names the folder where ranks write their results.
const OUT: &str = "SWA_MPI_OUT";
/// The environment variable that holds the number of ranks `mpirun` started.
const RANKS_STARTED: &str = "SWA_MPI_RANKS";
/// The number of ranks most tests start.
const RANKS: usize = 2;
/// Images per global batch, split 4 + 4 over two ranks and 2 + 3 + 3 over three.
const GLOBAL_BATCH: usize = 8;
const STEPS_PER_EPOCH: usize = 3;
const CLASSES: usize = 3;
const SIDE: usize = 8;
/// The collectives' timeout in the stalled-rank scenario.
const STALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long any one `mpirun` may take before the test fails instead of waiting.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Deterministic images whose class shows in their mean, different at every (epoch, step).
struct Synthetic;

fn synthetic_batch(epoch: usize, step: usize) -> HostBatch {
    let pixels = 3 * SIDE * SIDE;
    let labels: Vec<u32> = (0..GLOBAL_BATCH)
        .map(|i| ((i + step + epoch) % CLASSES) as u32)
        .collect();
    let images = labels
        .iter()
        .enumerate()
        .flat_map(|(i, &label)| {
            (0..pixels).map(move |p| {
                let noise = ((p * 7919 + i * 104_729 + step * 31 + epoch * 17) % 23) as f32 / 23.0;
                label as f32 * 0.4 - 0.4 + (noise - 0.5) * 0.6
            })
        })
        .collect();
    HostBatch {
        images,
        shape: [GLOBAL_BATCH, 3, SIDE, SIDE],
        labels,
    }
}

impl BatchSource for Synthetic {
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        Box::new((0..STEPS_PER_EPOCH).map(move |step| Ok(synthetic_batch(epoch, step))))
    }
    fn train_batches_per_epoch(&self) -> usize {
        STEPS_PER_EPOCH
    }
    fn test(&self) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        Box::new(std::iter::once(Ok(synthetic_batch(99, 0))))
    }
    fn test_len(&self) -> usize {
        GLOBAL_BATCH
    }
}

/// The batches of one rank in phase 2 of SWAP: its own, different from every other rank's.
struct RankData {
    rank: usize,
}

impl BatchSource for RankData {
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        Synthetic.train_epoch(epoch + 100 * (self.rank + 1))
    }
    fn train_batches_per_epoch(&self) -> usize {
        STEPS_PER_EPOCH
    }
    fn test(&self) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        Synthetic.test()
    }
    fn test_len(&self) -> usize {
        GLOBAL_BATCH
    }
}

/// Rank `rank` of `ranks`'s shards of an epoch's batches, on which BatchNorm is recomputed.
fn update_bn_shards(epoch: usize, rank: usize, ranks: usize) -> Vec<HostBatch> {
    (0..STEPS_PER_EPOCH)
        .map(|step| shard(&synthetic_batch(epoch, step), rank, ranks).expect("shard"))
        .collect()
}

/// What one process computes with `update_bn` over every one of `ranks` ranks' shards of `epoch`, one
/// rank after the other.
fn update_bn_alone(
    backend: &CpuBackend,
    model: &mut dyn Module<CpuBackend>,
    epoch: usize,
    ranks: usize,
) {
    let all_shards: Vec<HostBatch> = (0..ranks)
        .flat_map(|rank| update_bn_shards(epoch, rank, ranks))
        .collect();
    let seen = update_bn(backend, model, all_shards, 0).expect("update_bn");
    assert_eq!(seen, STEPS_PER_EPOCH * GLOBAL_BATCH);
}

/// A small network; with `batch_norm`, a BatchNorm after the convolution.
fn network(backend: &CpuBackend, batch_norm: bool) -> Box<dyn Module<CpuBackend>> {
    let mut rng = StdRng::seed_from_u64(7);
    let conv = Conv2d::new(backend, Conv2dConfig::new(3, 6, 3).padding(1), &mut rng).expect("conv");
    let mut net = Sequential::new().with(conv);
    if batch_norm {
        net.push(BatchNorm2d::new(backend, 6).expect("batch norm"));
    }
    let net = net
        .with(ReLU::new())
        .with(AvgPool2d::new(SIDE).expect("pool"))
        .with(Flatten::new())
        .with(Linear::new(backend, 6, CLASSES, &mut rng).expect("linear"));
    Box::new(net)
}

fn run_config(epochs: usize, swa: bool) -> RunConfig {
    RunConfig {
        epochs,
        schedule: Schedule::constant(0.1).expect("schedule"),
        snapshots: swa.then_some(Snapshots {
            start_epoch: 1,
            every: Period::Epochs(1),
            usage: SnapshotUse::AverageWeights {
                buffers: BufferPolicy::RecomputeLater,
                rule: WeightRule::Equal,
            },
        }),
        sgd: SgdConfig::momentum(5e-4),
        seed: 3,
        swa_eval_epochs: Vec::new(),
        swa_eval_every: 0,
        test_every_iterations: 0,
        swag: None,
        holdout: 0,
    }
}

fn trainer(backend: &CpuBackend, config: RunConfig, batch_norm: bool) -> Trainer<CpuBackend> {
    Trainer::new(
        backend.clone(),
        config,
        network(backend, batch_norm),
        network(backend, batch_norm),
    )
    .expect("trainer")
}

/// A rank of the tests below, started by them through `mpirun`; it does what [`SCENARIO`] says and writes
/// its results into [`OUT`].
#[test]
#[ignore = "one rank of the MPI tests, which start it through mpirun"]
fn mpi_rank() {
    let scenario = std::env::var(SCENARIO).unwrap_or_else(|_| {
        panic!("{SCENARIO} is not set: this test is a rank that the MPI tests start")
    });
    let out = PathBuf::from(std::env::var(OUT).expect("the folder for results"));
    let timeout = if scenario == "stall" {
        STALL_TIMEOUT
    } else {
        RUN_LIMIT
    };
    let communicator = Arc::new(MpiCommunicator::initialize(timeout).expect("MPI"));
    let rank = communicator.rank();
    let ranks: usize = std::env::var(RANKS_STARTED)
        .expect("the number of ranks")
        .parse()
        .expect("a number of ranks");
    assert_eq!(communicator.size(), ranks, "started with -np {ranks}");
    let backend = CpuBackend::with_threads(1);
    let data = ShardedBatches::new(Synthetic, communicator.as_ref());
    let save = |model: &dyn Module<CpuBackend>, name: &str| {
        save_module(
            &backend,
            model,
            &out.join(format!("{name}-rank{rank}.safetensors")),
        )
        .expect("writing the rank's weights");
    };
    match scenario.as_str() {
        "sgd" => {
            let mut trainer = trainer(&backend, run_config(2, false), false);
            trainer
                .with_communicator(communicator.clone())
                .expect("communicator");
            trainer.run(&data, &mut Silent).expect("training");
            save(trainer.model(), "sgd");
        }
        "update_bn" => {
            let mut model = network(&backend, true);
            let seen = update_bn_across_ranks(
                communicator.as_ref(),
                &backend,
                model.as_mut(),
                update_bn_shards(5, rank, ranks),
                0,
            )
            .expect("update_bn");
            assert_eq!(seen, STEPS_PER_EPOCH * GLOBAL_BATCH, "images of all ranks");
            save(model.as_ref(), "update_bn");
        }
        "evaluation" => {
            let shared = shared_evaluation(
                communicator.as_ref(),
                &backend,
                Some(&out.join("survey.jsonl")),
            );
            let json = serde_json::to_string(&shared).expect("JSON");
            std::fs::write(out.join(format!("evaluation-rank{rank}.json")), json)
                .expect("writing the rank's results");
        }
        "batch_norm_modes" => {
            for (mode, name) in [
                (BatchNormMode::Synchronized, "sync_bn"),
                (BatchNormMode::PerRank, "per_rank_bn"),
            ] {
                let mut trainer = trainer(&backend, run_config(2, false), true);
                trainer
                    .with_communicator(communicator.clone())
                    .expect("communicator");
                trainer.with_batch_norm_mode(mode);
                trainer.run(&data, &mut Silent).expect("training");
                save(trainer.model(), name);
            }
        }
        "three_ranks" => {
            let mut plain = trainer(&backend, run_config(2, false), false);
            plain
                .with_communicator(communicator.clone())
                .expect("communicator");
            plain.run(&data, &mut Silent).expect("training");
            save(plain.model(), "sgd");
            let mut synchronized = trainer(&backend, run_config(2, false), true);
            synchronized
                .with_communicator(communicator.clone())
                .expect("communicator");
            synchronized.with_batch_norm_mode(BatchNormMode::Synchronized);
            synchronized.run(&data, &mut Silent).expect("training");
            save(synchronized.model(), "sync_bn");
            let mut model = network(&backend, true);
            update_bn_across_ranks(
                communicator.as_ref(),
                &backend,
                model.as_mut(),
                update_bn_shards(5, rank, ranks),
                0,
            )
            .expect("update_bn");
            save(model.as_ref(), "update_bn");
        }
        "swa" | "swa_interrupted" => {
            let mut trainer = trainer(&backend, run_config(3, true), true);
            trainer
                .with_communicator(communicator.clone())
                .expect("communicator");
            trainer
                .with_checkpoints(out.join("checkpoints"))
                .expect("checkpoints");
            let epochs = if scenario == "swa" { 3 } else { 2 };
            while trainer.epochs_done() < epochs {
                trainer.run_epoch(&data, &mut Silent).expect("an epoch");
            }
            save(trainer.model(), &scenario);
            if scenario == "swa" {
                let swa = trainer
                    .swa_model(&data)
                    .expect("BatchNorm")
                    .expect("an average");
                save(swa, "swa_average");
            }
        }
        "swap" => {
            let recipe = Recipe {
                architecture: Architecture::PreResNet { depth: 20 },
                budget: 2,
                swa_epochs: 3,
                lr_init: 0.1,
                swa_start: 1,
                swa_lr: 0.05,
                weight_decay: 5e-4,
                batch_size: GLOBAL_BATCH,
                fge_cycle: 2,
                fge_test_every: 0,
                swa_eval_every: 1,
                train_limit: None,
                test_limit: None,
                swag_max_rank: None,
                holdout: 0,
            };
            let config = recipe.swap_config(3).expect("SWAP's phases");
            let build = || Ok(network(&backend, true));
            let mut merged = network(&backend, true);
            let outcome = run_swap(
                communicator.clone(),
                &backend,
                &config,
                &build,
                SwapData {
                    synchronous: &data,
                    independent: &RankData { rank },
                },
                &out.join("swap"),
                &mut Silent,
                merged.as_mut(),
            )
            .expect("SWAP");
            assert!(outcome.swap_test.loss.is_finite(), "{outcome:?}");
            save(merged.as_ref(), "swap_merged");
        }
        "kill" | "stall" | "panic" => {
            /// Rank 1 dies, stalls or panics after the first step; rank 0 goes on into the second step's
            /// all-reduce.
            struct Failing<'a> {
                rank: usize,
                how: &'a str,
            }
            impl TrainObserver for Failing<'_> {
                fn on_step(&mut self, _: usize, step: usize, _: usize, _: f32) {
                    if self.rank == 1 && step == 0 {
                        match self.how {
                            "stall" => std::thread::sleep(RUN_LIMIT),
                            "panic" => panic!("rank 1 fails on purpose"),
                            _ => {
                                let pid = std::process::id().to_string();
                                let _ = Command::new("kill").args(["-9", &pid]).status();
                            }
                        }
                    }
                }
            }
            let mut trainer = trainer(&backend, run_config(2, false), false);
            trainer
                .with_communicator(communicator.clone())
                .expect("communicator");
            let mut failing = Failing {
                rank,
                how: &scenario,
            };
            trainer.run(&data, &mut failing).expect("training");
            panic!("rank {rank} finished a run that a rank should have ended");
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// The test set of the evaluation tests: five batches (three for rank 0 of two, two for rank 1), the
/// last one smaller.
fn evaluation_batches() -> Vec<HostBatch> {
    let mut batches: Vec<HostBatch> = (0..4).map(|i| synthetic_batch(50 + i, 0)).collect();
    batches.push(shard(&synthetic_batch(60, 0), 0, 2).expect("half a batch"));
    batches
}

/// What [`shared_evaluation`] computes.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct SharedEvaluation {
    /// A network's test metrics.
    metrics: Metrics,
    /// Each ensemble member's own metrics, then the ensemble's.
    ensemble_metrics: Vec<Metrics>,
    /// The ensemble's mean probabilities.
    probabilities: Vec<f64>,
    /// The metrics of a survey's points.
    survey: Vec<PointMetrics>,
}

/// A test evaluation, an ensemble of two members and a survey of five points along a line, over
/// `communicator`'s ranks (with [`SingleProcess`], as one process computes them); rank 0 caches the
/// survey's points in `cache`.
fn shared_evaluation(
    communicator: &dyn Communicator,
    backend: &CpuBackend,
    cache: Option<&Path>,
) -> SharedEvaluation {
    let test = evaluation_batches();
    let mut model = network(backend, true);
    update_bn(backend, model.as_mut(), update_bn_shards(3, 0, 1), 0).expect("update_bn");
    let metrics =
        evaluate_across_ranks(communicator, backend, model.as_mut(), &test).expect("evaluation");

    let mut ensemble = Ensemble::new();
    let mut ensemble_metrics = Vec::new();
    for epoch in [1, 2] {
        update_bn(backend, model.as_mut(), update_bn_shards(epoch, 0, 1), 0).expect("update_bn");
        ensemble_metrics.push(
            add_ensemble_member_across_ranks(
                communicator,
                &mut ensemble,
                backend,
                model.as_mut(),
                &test,
            )
            .expect("an ensemble member"),
        );
    }
    ensemble_metrics.push(ensemble.metrics());

    let probe = SurfaceProbe::new(backend.clone(), network(backend, true), 5e-4);
    let start = probe
        .layout()
        .vector_from(backend, network(backend, true).as_ref())
        .expect("weights");
    let end = WeightVector(start.0.iter().map(|w| 0.5 * w + 0.01).collect());
    let survey = line(&start, &end, &[-0.5, 0.0, 0.5, 1.0, 1.5]).expect("a line");
    let train = update_bn_shards(4, 0, 1);
    let data = SurfaceData {
        train: &train[..2],
        test: &test[..2],
    };
    let fingerprint = survey.fingerprint(&[]);
    let mut cache = cache.map(|path| PointCache::open(path, &survey, fingerprint).expect("cache"));
    let survey = if communicator.size() == 1 {
        let mut cache = cache.expect("a cache for one process");
        run_survey(&survey, data, vec![probe], &mut cache, |_, _| {})
    } else {
        run_survey_across_ranks(
            communicator,
            &survey,
            data,
            vec![probe],
            cache.as_mut().filter(|_| communicator.rank() == 0),
            |_, _| {},
        )
    }
    .expect("the survey");
    SharedEvaluation {
        metrics,
        ensemble_metrics,
        probabilities: ensemble.probabilities().to_vec(),
        survey,
    }
}

/// What one `mpirun` did.
struct Launch {
    success: bool,
    code: Option<i32>,
    output: String,
    elapsed: Duration,
}

/// Runs [`mpi_rank`] as [`RANKS`] ranks on `scenario`, results in `out`.
fn launch(scenario: &str, out: &Path) -> Launch {
    launch_ranks(scenario, out, RANKS)
}

/// Runs [`mpi_rank`] as `ranks` ranks on `scenario`, results in `out`.
fn launch_ranks(scenario: &str, out: &Path, ranks: usize) -> Launch {
    let exe = std::env::current_exe().expect("the test binary");
    let log = out.join(format!("{scenario}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let started = Instant::now();
    let spawned = Command::new("mpirun")
        .args(["-np", &ranks.to_string(), "--oversubscribe"])
        .arg(&exe)
        .args([
            "--exact",
            "mpi_rank",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCENARIO, scenario)
        .env(OUT, out)
        .env(RANKS_STARTED, ranks.to_string())
        // CI runs as root, which OpenMPI refuses without these.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot start mpirun ({e}): these tests need OpenMPI (Debian: apt-get install openmpi-bin \
             libopenmpi-dev)"
        ),
    };
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for mpirun") {
            break status;
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mpirun {scenario} ran longer than {RUN_LIMIT:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Launch {
        success: status.success(),
        code: status.code(),
        output: std::fs::read_to_string(&log).unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

fn launch_ok(scenario: &str, out: &Path) {
    launch_ranks_ok(scenario, out, RANKS);
}

fn launch_ranks_ok(scenario: &str, out: &Path, ranks: usize) {
    let run = launch_ranks(scenario, out, ranks);
    assert!(
        run.success,
        "mpirun {scenario} failed ({:?}):\n{}",
        run.code, run.output
    );
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let dict = StateDict::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    dict.iter()
        .filter_map(|(name, tensor)| match tensor {
            StoredTensor::F32 { values, .. } => Some((name.to_owned(), values.clone())),
            _ => None,
        })
        .collect()
}

fn model_tensors(backend: &CpuBackend, model: &dyn Module<CpuBackend>) -> Vec<(String, Vec<f32>)> {
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join("model.safetensors");
    save_module(backend, model, &path).expect("saving");
    tensors(&path)
}

fn counters(path: &Path) -> Vec<(String, Vec<i64>)> {
    let dict = StateDict::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    dict.iter()
        .filter_map(|(name, tensor)| match tensor {
            StoredTensor::I64 { values, .. } => Some((name.to_owned(), values.clone())),
            _ => None,
        })
        .collect()
}

/// The largest difference between two sets of tensors relative to max(1, |expected|), after checking
/// that they have the same names and sizes.
fn largest_difference(found: &[(String, Vec<f32>)], expected: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(
        found.iter().map(|(n, v)| (n, v.len())).collect::<Vec<_>>(),
        expected
            .iter()
            .map(|(n, v)| (n, v.len()))
            .collect::<Vec<_>>(),
        "the same tensors"
    );
    found
        .iter()
        .zip(expected)
        .flat_map(|((_, a), (_, b))| a.iter().zip(b))
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f32::max)
}

fn rank_file(out: &Path, name: &str, rank: usize) -> PathBuf {
    out.join(format!("{name}-rank{rank}.safetensors"))
}

#[test]
fn two_ranks_train_as_one_process_on_the_global_batch() {
    let first = tempfile::tempdir().expect("temporary folder");
    let second = tempfile::tempdir().expect("temporary folder");
    launch_ok("sgd", first.path());
    launch_ok("sgd", second.path());
    let rank0 = tensors(&rank_file(first.path(), "sgd", 0));
    assert_eq!(
        rank0,
        tensors(&rank_file(first.path(), "sgd", 1)),
        "both ranks hold the same weights"
    );
    assert_eq!(
        rank0,
        tensors(&rank_file(second.path(), "sgd", 0)),
        "a second run repeats the first bit for bit"
    );

    let backend = CpuBackend::with_threads(1);
    let mut alone = trainer(&backend, run_config(2, false), false);
    alone.run(&Synthetic, &mut Silent).expect("training");
    let expected = model_tensors(&backend, alone.model());
    let initial = model_tensors(&backend, network(&backend, false).as_ref());
    assert!(
        largest_difference(&expected, &initial) > 1e-2,
        "the steps moved the weights"
    );
    // Six SGD steps on the sum of two half-batch gradients rather than one full-batch gradient: only the
    // order of additions differs, a few units of f32 rounding per step.
    let difference = largest_difference(&rank0, &expected);
    assert!(
        difference < 1e-6,
        "2 ranks differ from 1 process by {difference}"
    );
}

/// The weights and statistics one process reaches in [`run_config`]`(2, false)` on the global batches.
fn trained_alone(backend: &CpuBackend, batch_norm: bool) -> Vec<(String, Vec<f32>)> {
    let mut alone = trainer(backend, run_config(2, false), batch_norm);
    alone.run(&Synthetic, &mut Silent).expect("training");
    model_tensors(backend, alone.model())
}

#[test]
fn synchronized_batch_norm_trains_two_ranks_as_one_process_on_the_global_batch() {
    let out = tempfile::tempdir().expect("temporary folder");
    launch_ok("batch_norm_modes", out.path());
    let synchronized = tensors(&rank_file(out.path(), "sync_bn", 0));
    assert_eq!(
        synchronized,
        tensors(&rank_file(out.path(), "sync_bn", 1)),
        "both ranks hold the same weights and statistics"
    );
    let per_rank = tensors(&rank_file(out.path(), "per_rank_bn", 0));

    let backend = CpuBackend::with_threads(1);
    let expected = trained_alone(&backend, true);
    let initial = model_tensors(&backend, network(&backend, true).as_ref());
    assert!(
        largest_difference(&expected, &initial) > 1e-2,
        "the steps moved the weights"
    );
    // Six steps through a BatchNorm whose statistics are combined from the ranks' f32 means and
    // variances in f64: a few units of f32 rounding per step, as without BatchNorm (measured 1.1e-7).
    let difference = largest_difference(&synchronized, &expected);
    eprintln!("synchronised BatchNorm over 2 ranks differs from 1 process by {difference:e}");
    assert!(
        difference < 1e-6,
        "synchronised BatchNorm over 2 ranks differs from 1 process by {difference}"
    );
    // Normalising each half-batch on its own trains another network (measured 2e-2): the bound above
    // tells the two apart.
    let per_rank_difference = largest_difference(&per_rank, &expected);
    eprintln!("BatchNorm per rank differs from 1 process by {per_rank_difference:e}");
    assert!(
        per_rank_difference > 1e-3,
        "BatchNorm per rank differs from 1 process by only {per_rank_difference}"
    );
}

#[test]
fn three_ranks_with_uneven_shards_train_and_recompute_batch_norm_as_one_process() {
    let out = tempfile::tempdir().expect("temporary folder");
    // 8 images a batch: shards of 2, 3 and 3.
    launch_ranks_ok("three_ranks", out.path(), 3);
    let backend = CpuBackend::with_threads(1);
    for name in ["sgd", "sync_bn", "update_bn"] {
        let rank0 = tensors(&rank_file(out.path(), name, 0));
        for rank in 1..3 {
            assert_eq!(
                rank0,
                tensors(&rank_file(out.path(), name, rank)),
                "{name}: rank {rank} holds rank 0's tensors"
            );
        }
    }
    let difference = largest_difference(
        &tensors(&rank_file(out.path(), "sgd", 0)),
        &trained_alone(&backend, false),
    );
    eprintln!("3 ranks without BatchNorm differ from 1 process by {difference:e}");
    assert!(
        difference < 1e-6,
        "3 ranks differ from 1 process by {difference}"
    );
    let difference = largest_difference(
        &tensors(&rank_file(out.path(), "sync_bn", 0)),
        &trained_alone(&backend, true),
    );
    eprintln!("3 ranks with synchronised BatchNorm differ from 1 process by {difference:e}");
    assert!(
        difference < 1e-6,
        "3 ranks with synchronised BatchNorm differ from 1 process by {difference}"
    );
    let mut model = network(&backend, true);
    update_bn_alone(&backend, model.as_mut(), 5, 3);
    let difference = largest_difference(
        &tensors(&rank_file(out.path(), "update_bn", 0)),
        &model_tensors(&backend, model.as_ref()),
    );
    eprintln!("update_bn over 3 ranks differs from 1 process by {difference:e}");
    assert!(
        difference < 1e-6,
        "update_bn over 3 ranks differs by {difference}"
    );
}

#[test]
fn evaluation_ensembles_and_surveys_shared_between_ranks_equal_one_process() {
    let out = tempfile::tempdir().expect("temporary folder");
    launch_ok("evaluation", out.path());
    let read = |rank: usize| -> SharedEvaluation {
        let path = out.path().join(format!("evaluation-rank{rank}.json"));
        let text = std::fs::read_to_string(&path).expect("a rank's results");
        serde_json::from_str(&text).expect("a rank's results")
    };
    let shared = read(0);
    assert_eq!(shared, read(1), "both ranks hold the same results");

    let backend = CpuBackend::with_threads(1);
    let alone_dir = tempfile::tempdir().expect("temporary folder");
    let alone = shared_evaluation(
        &SingleProcess,
        &backend,
        Some(&alone_dir.path().join("survey.jsonl")),
    );
    assert_eq!(alone.metrics.count, 36, "every test image counted once");
    assert_eq!(alone.survey.len(), 5);
    assert!(
        alone.ensemble_metrics[0] != alone.ensemble_metrics[1],
        "the members predict differently"
    );
    // Exact: every image is evaluated by one rank, and the exchange adds zeros to its outcomes. JSON
    // keeps f64 to the bit (serde_json's float_roundtrip).
    assert_eq!(shared, alone, "2 ranks compute what one process computes");

    // Rank 0 cached every point of the survey.
    let cached = std::fs::read_to_string(out.path().join("survey.jsonl")).expect("rank 0's cache");
    assert_eq!(cached.lines().count(), 1 + 5, "a header and five points");
}

#[test]
fn batch_norm_recomputed_over_ranks_equals_one_process_over_all_shards() {
    let out = tempfile::tempdir().expect("temporary folder");
    launch_ok("update_bn", out.path());
    let rank0 = rank_file(out.path(), "update_bn", 0);
    let found = tensors(&rank0);
    assert_eq!(
        found,
        tensors(&rank_file(out.path(), "update_bn", 1)),
        "both ranks hold the same statistics"
    );

    let backend = CpuBackend::with_threads(1);
    let mut model = network(&backend, true);
    update_bn_alone(&backend, model.as_mut(), 5, RANKS);
    let expected = model_tensors(&backend, model.as_ref());
    let running_mean = expected
        .iter()
        .find(|(name, _)| name.ends_with("running_mean"))
        .expect("a BatchNorm");
    assert!(
        running_mean.1.iter().any(|m| m.abs() > 1e-3),
        "statistics were computed"
    );
    let difference = largest_difference(&found, &expected);
    assert!(
        difference < 1e-6,
        "distributed update_bn differs by {difference}"
    );
    let batch_counts = counters(&rank0);
    assert_eq!(
        batch_counts
            .iter()
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>(),
        vec![vec![(RANKS * STEPS_PER_EPOCH) as i64]],
        "the batch counter counts every rank's batches"
    );
}

#[test]
fn swa_over_ranks_keeps_one_average_and_resumes_from_rank_zeros_checkpoint() {
    let whole = tempfile::tempdir().expect("temporary folder");
    launch_ok("swa", whole.path());
    for name in ["swa", "swa_average"] {
        assert_eq!(
            tensors(&rank_file(whole.path(), name, 0)),
            tensors(&rank_file(whole.path(), name, 1)),
            "{name}: both ranks hold the same tensors"
        );
    }
    let checkpoints: Vec<_> = std::fs::read_dir(whole.path().join("checkpoints"))
        .expect("the checkpoint folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        checkpoints,
        ["epoch-0003"],
        "rank 0 wrote the checkpoints, the last one kept"
    );

    let resumed = tempfile::tempdir().expect("temporary folder");
    launch_ok("swa_interrupted", resumed.path());
    launch_ok("swa", resumed.path());
    for name in ["swa", "swa_average"] {
        assert_eq!(
            tensors(&rank_file(resumed.path(), name, 0)),
            tensors(&rank_file(whole.path(), name, 0)),
            "{name}: the resumed run ends as the uninterrupted one"
        );
    }
}

#[test]
fn swap_merges_the_ranks_weights_into_their_mean_with_batch_norm_over_all_shards() {
    let out = tempfile::tempdir().expect("temporary folder");
    launch_ok("swap", out.path());
    let swap = out.path().join("swap");
    let synchronous: Vec<_> = std::fs::read_dir(swap.join("synchronous"))
        .expect("the synchronous phase's checkpoints")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        synchronous,
        ["epoch-0001"],
        "rank 0 wrote the synchronous phase"
    );
    let parameters = |set: Vec<(String, Vec<f32>)>| -> Vec<(String, Vec<f32>)> {
        set.into_iter()
            .filter(|(name, _)| !name.contains("running_"))
            .collect()
    };
    // Each rank's own weights after the independent phase, from its last checkpoint.
    let local: Vec<_> = (0..RANKS)
        .map(|rank| {
            parameters(tensors(
                &independent_dir(&swap, rank)
                    .join("epoch-0002")
                    .join(MODEL_FILE),
            ))
        })
        .collect();
    assert!(
        largest_difference(&local[0], &local[1]) > 1e-3,
        "the ranks trained apart in the independent phase"
    );
    let merged = tensors(&rank_file(out.path(), "swap_merged", 0));
    assert_eq!(
        merged,
        tensors(&rank_file(out.path(), "swap_merged", 1)),
        "both ranks hold the merged weights"
    );
    let mean: Vec<(String, Vec<f32>)> = local[0]
        .iter()
        .zip(&local[1])
        .map(|((name, a), (_, b))| {
            let values = a.iter().zip(b).map(|(a, b)| (a + b) / 2.0).collect();
            (name.clone(), values)
        })
        .collect();
    let difference = largest_difference(&parameters(merged.clone()), &mean);
    assert!(
        difference < 1e-6,
        "the merge differs from the mean by {difference}"
    );

    // BatchNorm of the merged weights: what one process computes over all ranks' shards of the
    // synchronous phase's last epoch.
    let backend = CpuBackend::with_threads(1);
    let mut alone = network(&backend, true);
    swa_models::checkpoint::load_module(
        &backend,
        alone.as_mut(),
        &rank_file(out.path(), "swap_merged", 0),
    )
    .expect("the merged weights");
    update_bn_alone(&backend, alone.as_mut(), 0, RANKS);
    let difference = largest_difference(&merged, &model_tensors(&backend, alone.as_ref()));
    assert!(difference < 1e-6, "BatchNorm differs by {difference}");
}

/// Runs `scenario`, in which a rank fails, and checks that the run failed within `within`, with an output
/// that holds every one of `says` and, when given, the exit status `code`.
fn assert_ends(scenario: &str, within: Duration, says: &[&str], code: Option<i32>) {
    let out = tempfile::tempdir().expect("temporary folder");
    let run = launch(scenario, out.path());
    assert!(!run.success, "the run failed:\n{}", run.output);
    assert!(run.elapsed < within, "ended after {:?}", run.elapsed);
    for said in says {
        assert!(
            run.output.contains(said),
            "the output says {said:?}:\n{}",
            run.output
        );
    }
    if code.is_some() {
        assert_eq!(run.code, code, "the exit status:\n{}", run.output);
    }
}

#[test]
fn a_killed_rank_ends_the_run_within_bounded_time() {
    // mpirun names the rank that died.
    assert_ends(
        "kill",
        Duration::from_secs(60),
        &["rank 1", "signal 9"],
        None,
    );
}

#[test]
fn a_panicking_rank_ends_the_run_at_once() {
    // Well before the collectives' timeout (RUN_LIMIT), which would otherwise end it.
    assert_ends(
        "panic",
        Duration::from_secs(60),
        &["rank 1 of 2: a panic ended this rank, and with it the run"],
        Some(PANIC_EXIT_CODE),
    );
}

#[test]
fn a_stalled_rank_ends_the_run_with_the_watchdogs_message() {
    // Rank 0's watchdog says what it waited in.
    assert_ends(
        "stall",
        STALL_TIMEOUT + Duration::from_secs(30),
        &[
            "rank 0 of 2: the loss all-reduce waited",
            "a rank has died or stalled",
        ],
        Some(STALLED_EXIT_CODE),
    );
}
