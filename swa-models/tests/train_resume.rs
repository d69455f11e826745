//! The training loop: a run interrupted after any epoch and resumed from its checkpoint ends with weights,
//! average and history bit-identical to an uninterrupted run; so does a run started from another run's
//! checkpoint within the epochs they share; a diverging run stops with an error naming the epoch and step
//! and keeps its last good checkpoint.

use swa_core::averaging::{BufferPolicy, CustomRule, WeightAveraging, WeightRule};
use swa_core::schedule::{LrSchedule, Period, Schedule};
use swa_core::swag::{SwagError, SwagMoments};
use swa_core::Backend;
use swa_core::CpuBackend;
use swa_models::batch::BatchResult;
use swa_models::optim::SgdConfig;
use swa_models::protocol::PretrainedSwa;
use swa_models::train::{
    load_swag_moments, RunConfig, Silent, SnapshotUse, Snapshots, SwagCollection, Trainer,
    SWAG_FILE,
};
use swa_models::{Architecture, BatchSource, HostBatch, TrainError};

/// A tiny deterministic data set: two classes of 32×32 images told apart by their mean.
struct Toy {
    train: Vec<HostBatch>,
    test: Vec<HostBatch>,
}

impl Toy {
    fn new() -> Self {
        let batch = |offset: u32| {
            let n = 4;
            let labels: Vec<u32> = (0..n).map(|i| (i + offset) % 2).collect();
            let images = labels
                .iter()
                .flat_map(|&l| (0..3 * 32 * 32).map(move |p| if l == 1 { 0.5 } else { -0.5 } + ((p * 7919 % 13) as f32 - 6.0) * 0.05))
                .collect();
            HostBatch {
                images,
                shape: [n as usize, 3, 32, 32],
                labels,
            }
        };
        Self {
            train: vec![batch(0), batch(1)],
            test: vec![batch(3)],
        }
    }
}

impl BatchSource for Toy {
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        // The order depends on the epoch, as a shuffled loader's does.
        let mut batches = self.train.clone();
        if epoch % 2 == 1 {
            batches.reverse();
        }
        Box::new(batches.into_iter().map(Ok))
    }
    fn train_batches_per_epoch(&self) -> usize {
        self.train.len()
    }
    fn test(&self) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        Box::new(self.test.clone().into_iter().map(Ok))
    }
    fn test_len(&self) -> usize {
        4
    }
}

fn config(epochs: usize, lr: f32) -> RunConfig {
    RunConfig {
        epochs,
        schedule: Schedule::original_swa(lr, lr / 5.0, 2).expect("valid schedule"),
        snapshots: Some(Snapshots {
            start_epoch: 2,
            every: Period::Epochs(1),
            usage: SnapshotUse::AverageWeights {
                buffers: BufferPolicy::RecomputeLater,
                rule: WeightRule::Equal,
            },
        }),
        sgd: SgdConfig::momentum(1e-4),
        seed: 11,
        swa_eval_epochs: vec![3],
        swa_eval_every: 0,
        test_every_iterations: 0,
        swag: None,
        holdout: 0,
    }
}

fn trainer(backend: &CpuBackend, config: RunConfig) -> Trainer<CpuBackend> {
    let arch: Architecture = "wrn10x1".parse().expect("valid name");
    let arch = match arch {
        Architecture::WideResNet {
            depth,
            widen_factor,
            ..
        } => Architecture::WideResNet {
            depth,
            widen_factor,
            dropout_rate: 0.3,
        },
        other => other,
    };
    let model = arch.build(backend, 2, 5).expect("network");
    let eval = arch.build(backend, 2, 5).expect("network");
    Trainer::new(backend.clone(), config, model, eval).expect("trainer")
}

fn weights(trainer: &mut Trainer<CpuBackend>) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    trainer
        .model()
        .visit_tensors(&mut |name, _, t| out.push((name.to_string(), t.iter().copied().collect())));
    out
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one_bit_for_bit() {
    let backend = CpuBackend::with_threads(2);
    let data = Toy::new();
    let dir = tempfile::tempdir().expect("temporary folder");

    let mut whole = trainer(&backend, config(4, 0.05));
    whole.run(&data, &mut Silent).expect("uninterrupted run");

    // The same run, stopped after two epochs (the process "dies"), then resumed by a fresh trainer.
    let mut first = trainer(&backend, config(4, 0.05));
    assert_eq!(first.with_checkpoints(dir.path()).expect("empty folder"), 0);
    first.run_epoch(&data, &mut Silent).expect("epoch 1");
    first.run_epoch(&data, &mut Silent).expect("epoch 2");
    drop(first);
    let mut resumed = trainer(&backend, config(4, 0.05));
    assert_eq!(
        resumed
            .with_checkpoints(dir.path())
            .expect("checkpoint found"),
        2
    );
    resumed.run(&data, &mut Silent).expect("resumed run");

    assert_eq!(weights(&mut resumed), weights(&mut whole));
    let (a, b) = (
        resumed.average().expect("averaged"),
        whole.average().expect("averaged"),
    );
    assert_eq!(a.count(), 3, "snapshots after epochs 2, 3 and 4");
    assert_eq!(
        a.to_state(&backend).expect("state"),
        b.to_state(&backend).expect("state")
    );
    let strip = |t: &Trainer<CpuBackend>| -> Vec<_> {
        t.history()
            .iter()
            .map(|r| (r.epoch, r.train, r.test, r.swa_test, r.snapshots))
            .collect()
    };
    assert_eq!(strip(&resumed), strip(&whole));
    // SWA is evaluated at the requested epoch and at the end only.
    let evaluated: Vec<usize> = whole
        .history()
        .iter()
        .filter(|r| r.swa_test.is_some())
        .map(|r| r.epoch)
        .collect();
    assert_eq!(evaluated, vec![3, 4]);
    // One checkpoint is kept: the last.
    let kept: Vec<_> = std::fs::read_dir(dir.path())
        .expect("listing")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(kept, vec![std::ffi::OsString::from("epoch-0004")]);
}

#[test]
fn a_checkpoint_of_another_configuration_is_refused() {
    let backend = CpuBackend::with_threads(1);
    let data = Toy::new();
    let dir = tempfile::tempdir().expect("temporary folder");
    let mut first = trainer(&backend, config(2, 0.05));
    first.with_checkpoints(dir.path()).expect("empty folder");
    first.run_epoch(&data, &mut Silent).expect("epoch 1");
    let mut other = trainer(&backend, config(2, 0.01));
    match other.with_checkpoints(dir.path()) {
        Err(TrainError::StateMismatch(message)) => {
            assert!(message.contains("another configuration"), "{message}")
        }
        other => panic!("expected a state mismatch, got {other:?}"),
    }
}

#[test]
fn a_diverging_run_names_epoch_and_step_and_keeps_the_last_good_checkpoint() {
    let backend = CpuBackend::with_threads(1);
    let data = Toy::new();
    let dir = tempfile::tempdir().expect("temporary folder");
    let mut run = trainer(&backend, config(3, 0.05));
    run.with_checkpoints(dir.path()).expect("empty folder");
    run.run_epoch(&data, &mut Silent)
        .expect("a good first epoch");
    // Poison the weights, as an exploding step would.
    run.model().visit_tensors_mut(&mut |name, _, t| {
        if name == "linear.weight" {
            t.fill(f32::NAN);
        }
    });
    match run.run_epoch(&data, &mut Silent) {
        Err(TrainError::NonFiniteLoss { epoch, step, .. }) => assert_eq!((epoch, step), (1, 0)),
        other => panic!("expected a non-finite loss, got {other:?}"),
    }
    let mut again = trainer(&backend, config(3, 0.05));
    assert_eq!(
        again
            .with_checkpoints(dir.path())
            .expect("last good checkpoint"),
        1
    );
}

/// A source whose batches fail (a corrupt image) at a given place: `train_fails_at` in epoch `epoch`
/// (`None`: training never fails), or the test set's last batch.
struct Failing {
    toy: Toy,
    epoch: usize,
    train_fails_at: Option<usize>,
    test_fails: bool,
}

impl BatchSource for Failing {
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        let fails_at = self.train_fails_at.filter(|_| epoch == self.epoch);
        Box::new(self.toy.train_epoch(epoch).enumerate().map(move |(i, b)| {
            if Some(i) == fails_at {
                Err(TrainError::BadBatch(format!(
                    "image 7 of batch {i}: truncated JPEG"
                )))
            } else {
                b
            }
        }))
    }
    fn train_batches_per_epoch(&self) -> usize {
        self.toy.train_batches_per_epoch()
    }
    fn test(&self) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        let fails = self.test_fails;
        let last = self.toy.test.len() - 1;
        Box::new(self.toy.test().enumerate().map(move |(i, b)| {
            if fails && i == last {
                Err(TrainError::BadBatch("test image 3: unreadable".into()))
            } else {
                b
            }
        }))
    }
    fn test_len(&self) -> usize {
        self.toy.test_len()
    }
}

/// A batch the source cannot make stops the run with the source's error, before the epoch's snapshot and
/// checkpoint: a resumed run starts again from the last whole epoch, and a bad test image fails the
/// evaluation rather than leaving it out of the metrics.
#[test]
fn a_batch_the_source_cannot_make_stops_the_run_before_its_checkpoint() {
    let backend = CpuBackend::with_threads(1);
    let dir = tempfile::tempdir().expect("temporary folder");
    let mut run = trainer(&backend, config(3, 0.05));
    run.with_checkpoints(dir.path()).expect("empty folder");
    let data = Failing {
        toy: Toy::new(),
        epoch: 1,
        train_fails_at: Some(1),
        test_fails: false,
    };
    run.run_epoch(&data, &mut Silent)
        .expect("a good first epoch");
    match run.run_epoch(&data, &mut Silent) {
        Err(TrainError::BadBatch(message)) => {
            assert!(message.contains("truncated JPEG"), "{message}")
        }
        other => panic!("expected the source's error, got {other:?}"),
    }
    assert_eq!(run.epochs_done(), 1, "the failed epoch is not counted");
    let mut again = trainer(&backend, config(3, 0.05));
    assert_eq!(again.with_checkpoints(dir.path()).expect("checkpoint"), 1);

    let bad_test = Failing {
        toy: Toy::new(),
        epoch: 0,
        train_fails_at: None,
        test_fails: true,
    };
    match again.run_epoch(&bad_test, &mut Silent) {
        Err(TrainError::BadBatch(message)) => assert!(message.contains("unreadable"), "{message}"),
        other => panic!("expected the test set's error, got {other:?}"),
    }
}

/// The SGD baseline of the original code over `budget` epochs.
fn sgd_config(budget: usize, lr: f32) -> RunConfig {
    RunConfig {
        epochs: budget,
        schedule: Schedule::original_sgd(lr, budget).expect("valid schedule"),
        snapshots: None,
        sgd: SgdConfig::momentum(1e-4),
        seed: 11,
        swa_eval_epochs: Vec::new(),
        swa_eval_every: 0,
        test_every_iterations: 0,
        swag: None,
        holdout: 0,
    }
}

/// An SWA run averaging every epoch from `swa_start`, evaluated at the end.
fn swa_config(epochs: usize, swa_start: usize, lr: f32) -> RunConfig {
    RunConfig {
        schedule: Schedule::original_swa(lr, lr / 5.0, swa_start).expect("valid schedule"),
        snapshots: Some(Snapshots {
            start_epoch: swa_start,
            every: Period::Epochs(1),
            usage: SnapshotUse::AverageWeights {
                buffers: BufferPolicy::RecomputeLater,
                rule: WeightRule::Equal,
            },
        }),
        swa_eval_epochs: Vec::new(),
        ..sgd_config(epochs, lr)
    }
}

fn checkpoint_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("listing")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_run_branched_from_another_runs_checkpoint_equals_one_trained_from_scratch() {
    let backend = CpuBackend::with_threads(2);
    let data = Toy::new();
    let steps = data.train_batches_per_epoch();
    // Both keep lr 0.05 for epochs 0–2 (t = epoch / horizon ≤ 0.5), then decay differently; the SWA run's
    // first snapshot comes after epoch 3.
    let (sgd, swa) = (sgd_config(4, 0.05), swa_config(5, 4, 0.05));
    assert_eq!(swa.shared_epochs(&sgd, steps), 3);

    let sgd_dir = tempfile::tempdir().expect("temporary folder");
    let mut donor = trainer(&backend, sgd);
    donor.keep_checkpoints([3]);
    donor
        .with_checkpoints(sgd_dir.path())
        .expect("empty folder");
    donor.run(&data, &mut Silent).expect("SGD run");
    assert_eq!(
        checkpoint_names(sgd_dir.path()),
        vec!["epoch-0003", "epoch-0004"],
        "the kept checkpoint survives the newer ones"
    );

    let mut whole = trainer(&backend, swa.clone());
    whole.run(&data, &mut Silent).expect("SWA run from scratch");

    let swa_dir = tempfile::tempdir().expect("temporary folder");
    let mut branched = trainer(&backend, swa.clone());
    branched
        .with_checkpoints(swa_dir.path())
        .expect("empty folder");
    let taken = branched
        .branch_from(&sgd_dir.path().join("epoch-0003"), steps)
        .expect("the runs share 3 epochs");
    assert_eq!(taken, 3);
    assert_eq!(checkpoint_names(swa_dir.path()), vec!["epoch-0003"]);
    branched
        .run(&data, &mut Silent)
        .expect("SWA run after branching");

    assert_eq!(weights(&mut branched), weights(&mut whole));
    assert_eq!(
        branched
            .average()
            .expect("averaged")
            .to_state(&backend)
            .expect("state"),
        whole
            .average()
            .expect("averaged")
            .to_state(&backend)
            .expect("state")
    );
    let strip = |t: &Trainer<CpuBackend>| -> Vec<_> {
        t.history()
            .iter()
            .map(|r| {
                (
                    r.epoch,
                    r.lr_first,
                    r.lr_last,
                    r.train,
                    r.test,
                    r.swa_test,
                    r.snapshots,
                )
            })
            .collect()
    };
    assert_eq!(strip(&branched), strip(&whole));
    assert_eq!(
        (branched.branched_epochs(), whole.branched_epochs()),
        (3, 0)
    );

    // The count of epochs taken over survives a resume.
    let mut resumed = trainer(&backend, swa);
    assert_eq!(resumed.with_checkpoints(swa_dir.path()).expect("resume"), 5);
    assert_eq!(resumed.branched_epochs(), 3);
}

#[test]
fn branching_beyond_the_shared_epochs_or_after_training_is_refused() {
    let backend = CpuBackend::with_threads(1);
    let data = Toy::new();
    let steps = data.train_batches_per_epoch();
    let dir = tempfile::tempdir().expect("temporary folder");
    let mut donor = trainer(&backend, sgd_config(4, 0.05));
    donor.with_checkpoints(dir.path()).expect("empty folder");
    for _ in 0..4 {
        donor.run_epoch(&data, &mut Silent).expect("SGD epoch");
    }
    let late = dir.path().join("epoch-0004");

    let mut swa = trainer(&backend, swa_config(5, 4, 0.05));
    match swa.branch_from(&late, steps) {
        Err(TrainError::StateMismatch(message)) => {
            assert!(message.contains("only 3"), "{message}")
        }
        other => panic!("expected a state mismatch, got {other:?}"),
    }
    // Another seed changes the data's augmentation and dropout from the first step: nothing is shared.
    let mut other_seed = trainer(
        &backend,
        RunConfig {
            seed: 12,
            ..sgd_config(4, 0.05)
        },
    );
    assert!(matches!(
        other_seed.branch_from(&late, steps),
        Err(TrainError::StateMismatch(_))
    ));
    let mut trained = trainer(&backend, sgd_config(4, 0.05));
    trained.run_epoch(&data, &mut Silent).expect("epoch 1");
    match trained.branch_from(&late, steps) {
        Err(TrainError::StateMismatch(message)) => {
            assert!(message.contains("already trained"), "{message}")
        }
        other => panic!("expected a state mismatch, got {other:?}"),
    }
}

/// An SWA-style run whose snapshots are averaged by `rule` from epoch 2 on, BN statistics averaged too.
fn averaging_config(epochs: usize, rule: WeightRule) -> RunConfig {
    let mut config = config(epochs, 0.05);
    config.snapshots = Some(Snapshots {
        start_epoch: 2,
        every: Period::Epochs(1),
        usage: SnapshotUse::AverageWeights {
            buffers: BufferPolicy::Average,
            rule,
        },
    });
    config
}

#[test]
fn an_ema_run_averages_its_snapshots_with_ema_weights() {
    let backend = CpuBackend::with_threads(2);
    let data = Toy::new();
    let decay = 0.6f32;
    let mut run = trainer(&backend, averaging_config(5, WeightRule::Ema { decay }));
    // The snapshots, read from the trained model whenever the average's count grows.
    let mut snapshots: Vec<Vec<(String, Vec<f32>)>> = Vec::new();
    for _ in 0..5 {
        run.run_epoch(&data, &mut Silent).expect("epoch");
        let count = run.average().map_or(0, |a| a.count());
        if count > snapshots.len() as u64 {
            snapshots.push(weights(&mut run));
        }
    }
    assert_eq!(snapshots.len(), 4, "snapshots after epochs 2, 3, 4 and 5");
    let average = run.average().expect("averaged");
    assert_eq!(average.rule(), WeightRule::Ema { decay });
    assert_eq!(average.count(), 4);

    // The closed form of EMA in f64: d^(n−1)·w_1 + Σ_{k≥2} (1 − d)·d^(n−k)·w_k. As in swa-core's property
    // tests, each f32 update commits at most about 7·u·M, so 8·u·M·n bounds the difference.
    let (d, n) = (f64::from(decay), snapshots.len());
    let coefficient = |k: usize| {
        let kept = d.powi((n - 1 - k) as i32);
        if k == 0 {
            kept
        } else {
            (1.0 - d) * kept
        }
    };
    let mut differs_from_equal_weights = false;
    for (index, (name, _)) in snapshots[0].iter().enumerate() {
        let averaged = backend
            .to_host(average.tensor(name).expect("every tensor is averaged"))
            .expect("values");
        for (i, &value) in averaged.iter().enumerate() {
            let column: Vec<f64> = snapshots.iter().map(|s| f64::from(s[index].1[i])).collect();
            let exact: f64 = column
                .iter()
                .enumerate()
                .map(|(k, w)| coefficient(k) * w)
                .sum();
            let scale = column.iter().fold(0.0f64, |m, w| m.max(w.abs()));
            let tolerance = 8.0 * f64::from(f32::EPSILON) / 2.0 * scale * n as f64;
            assert!(
                (f64::from(value) - exact).abs() <= tolerance,
                "{name}[{i}]: average {value}, EMA of the snapshots {exact}"
            );
            let mean = column.iter().sum::<f64>() / n as f64;
            differs_from_equal_weights |= (f64::from(value) - mean).abs() > 2.0 * tolerance;
        }
    }
    assert!(
        differs_from_equal_weights,
        "the snapshots differ, so EMA weights must give another result than equal weights"
    );
}

/// Trains `config` without interruption, and again stopped after `stop_after` epochs (the process
/// "dies", its checkpoints in `dir`) and resumed by a fresh trainer: returns (uninterrupted, resumed).
fn whole_and_resumed(
    backend: &CpuBackend,
    config: &RunConfig,
    stop_after: usize,
    dir: &std::path::Path,
) -> (Trainer<CpuBackend>, Trainer<CpuBackend>) {
    let data = Toy::new();
    let mut whole = trainer(backend, config.clone());
    whole.run(&data, &mut Silent).expect("uninterrupted run");
    let mut first = trainer(backend, config.clone());
    first.with_checkpoints(dir).expect("empty folder");
    for _ in 0..stop_after {
        first.run_epoch(&data, &mut Silent).expect("epoch");
    }
    drop(first);
    let mut resumed = trainer(backend, config.clone());
    assert_eq!(resumed.with_checkpoints(dir).expect("resume"), stop_after);
    resumed.run(&data, &mut Silent).expect("resumed run");
    (whole, resumed)
}

#[test]
fn a_resumed_ema_run_equals_an_uninterrupted_one_bit_for_bit() {
    let backend = CpuBackend::with_threads(2);
    let config = averaging_config(4, WeightRule::Ema { decay: 0.75 });
    let dir = tempfile::tempdir().expect("temporary folder");
    let (mut whole, mut resumed) = whole_and_resumed(&backend, &config, 3, dir.path());
    assert_eq!(weights(&mut resumed), weights(&mut whole));
    let state = |t: &Trainer<CpuBackend>| t.average().expect("averaged").to_state(&backend);
    assert_eq!(
        state(&resumed).expect("state"),
        state(&whole).expect("state")
    );
    assert_eq!(
        resumed.average().expect("averaged").rule(),
        WeightRule::Ema { decay: 0.75 }
    );
}

#[test]
fn a_resumed_fge_run_keeps_its_ensemble_in_safetensors_and_ends_bit_identical() {
    let backend = CpuBackend::with_threads(2);
    let mut config = config(5, 0.05);
    config.snapshots = Some(Snapshots {
        start_epoch: 2,
        every: Period::Epochs(1),
        usage: SnapshotUse::EnsemblePredictions,
    });
    let dir = tempfile::tempdir().expect("temporary folder");
    let (mut whole, mut resumed) = whole_and_resumed(&backend, &config, 3, dir.path());
    // Two members after three epochs: their probabilities are a tensor file, not JSON text. The
    // interrupted run's checkpoint after epoch 3 was replaced by the resumed run's later ones, which
    // keep the same layout.
    let checkpoint = dir.path().join("epoch-0005");
    let ensemble =
        swa_models::checkpoint::StateDict::load(&checkpoint.join("ensemble.safetensors"))
            .expect("the ensemble's tensors");
    assert_eq!(
        ensemble.get("mean_probs").map(|t| t.shape().to_vec()),
        Some(vec![4, 2])
    );
    let state = std::fs::read_to_string(checkpoint.join("state.json")).expect("state.json");
    assert!(!state.contains("mean_probs"), "{state}");
    assert_eq!(weights(&mut resumed), weights(&mut whole));
    let ensemble_metrics = |t: &Trainer<CpuBackend>| -> Vec<_> {
        t.history()
            .iter()
            .map(|r| (r.snapshots, r.ensemble_test))
            .collect()
    };
    assert_eq!(ensemble_metrics(&resumed), ensemble_metrics(&whole));
    assert_eq!(resumed.history().last().map(|r| r.snapshots), Some(4));
}

#[test]
fn checkpoints_of_a_run_with_a_custom_rule_are_refused_up_front() {
    let backend = CpuBackend::with_threads(1);
    let rule = WeightRule::Custom(CustomRule::new("halves", |_| 0.5));
    let mut run = trainer(&backend, averaging_config(2, rule));
    let dir = tempfile::tempdir().expect("temporary folder");
    match run.with_checkpoints(dir.path()) {
        Err(TrainError::InvalidConfig(message)) => {
            assert!(message.contains("custom weight rule `halves`"), "{message}")
        }
        other => panic!("expected an invalid configuration, got {other:?}"),
    }
    // Without checkpoints the rule trains: weight 1/2 for every snapshot after the first.
    run.run(&Toy::new(), &mut Silent).expect("run");
    assert_eq!(run.average().expect("averaged").rule(), rule);
}

#[test]
fn a_checkpoint_in_the_old_format_is_refused_with_what_to_do() {
    let backend = CpuBackend::with_threads(1);
    let dir = tempfile::tempdir().expect("temporary folder");
    let old = dir.path().join("epoch-0001");
    std::fs::create_dir_all(&old).expect("folder");
    // The unversioned layout: momentum buffers and the average as JSON numbers inside state.json.
    let state = r#"{"config":{},"epochs_done":1,"history":[],
        "momentum":[["conv.weight",{"shape":[1],"values":[0.25]}]],"average":null,"ensemble":null}"#;
    std::fs::write(old.join("state.json"), state).expect("state.json");
    let mut run = trainer(&backend, config(2, 0.05));
    let err = run
        .with_checkpoints(dir.path())
        .expect_err("an old checkpoint is refused");
    assert!(
        matches!(&err, TrainError::CheckpointFormat { path, found: None, expected: 2 } if *path == old.join("state.json")),
        "{err:?}"
    );
    let message = err.to_string();
    for part in [
        "epoch-0001/state.json",
        "tensors inside state.json",
        "safetensors",
        "empty folder",
    ] {
        assert!(message.contains(part), "`{part}` missing from: {message}");
    }
}

/// The bytes of every file in a checkpoint folder.
fn checkpoint_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("listing")
        .flatten()
        .map(|e| e.metadata().expect("metadata").len())
        .sum()
}

/// The f32 elements of a model's tensors (weights and BN statistics) and of its parameters alone.
fn tensor_and_parameter_counts(trainer: &mut Trainer<CpuBackend>) -> (u64, u64) {
    let (mut tensors, mut parameters) = (0u64, 0u64);
    trainer.model().visit_tensors(&mut |_, role, t| {
        tensors += t.len() as u64;
        if role == swa_core::TensorRole::Parameter {
            parameters += t.len() as u64;
        }
    });
    (tensors, parameters)
}

#[test]
fn an_sgd_checkpoint_stores_weights_and_momentum_as_binary() {
    let backend = CpuBackend::with_threads(2);
    let mut run = trainer(&backend, sgd_config(1, 0.05));
    let dir = tempfile::tempdir().expect("temporary folder");
    run.with_checkpoints(dir.path()).expect("empty folder");
    run.run(&Toy::new(), &mut Silent).expect("one epoch");
    let (tensors, parameters) = tensor_and_parameter_counts(&mut run);
    let raw = (tensors + parameters) * 4;
    let written = checkpoint_bytes(&dir.path().join("epoch-0001"));
    assert!(
        (written as f64) < 1.1 * raw as f64,
        "the checkpoint takes {written} bytes for {raw} bytes of weights and momentum"
    );
}

/// Measures the checkpoint of WRN-28-10 (36.5M parameters) after one SGD step against 2 × parameters × 4
/// bytes (weights and momentum).
#[test]
#[ignore = "builds and trains WRN-28-10 on the CPU (a minute and 600 MB); run by hand to measure"]
fn wrn28x10_checkpoint_size() {
    let backend = CpuBackend::new();
    let image = |label: u32| HostBatch {
        images: vec![0.1 * label as f32; 3 * 32 * 32],
        shape: [1, 3, 32, 32],
        labels: vec![label],
    };
    struct One(HostBatch);
    impl BatchSource for One {
        fn train_epoch(&self, _: usize) -> Box<dyn Iterator<Item = BatchResult> + '_> {
            Box::new(std::iter::once(Ok(self.0.clone())))
        }
        fn train_batches_per_epoch(&self) -> usize {
            1
        }
        fn test(&self) -> Box<dyn Iterator<Item = BatchResult> + '_> {
            Box::new(std::iter::once(Ok(self.0.clone())))
        }
        fn test_len(&self) -> usize {
            1
        }
    }
    let arch: Architecture = "wrn28x10".parse().expect("valid name");
    let model = arch.build(&backend, 10, 0).expect("network");
    let eval = arch.build(&backend, 10, 0).expect("network");
    let mut run = Trainer::new(backend.clone(), sgd_config(1, 0.05), model, eval).expect("trainer");
    let dir = tempfile::tempdir().expect("temporary folder");
    run.with_checkpoints(dir.path()).expect("empty folder");
    run.run(&One(image(3)), &mut Silent).expect("one step");
    let (tensors, parameters) = tensor_and_parameter_counts(&mut run);
    let folder = dir.path().join("epoch-0001");
    let written = checkpoint_bytes(&folder);
    for entry in std::fs::read_dir(&folder).expect("listing").flatten() {
        println!(
            "{:>24} {:>12} bytes",
            entry.file_name().to_string_lossy(),
            entry.metadata().expect("metadata").len()
        );
    }
    let reference = 2 * parameters * 4;
    println!(
        "WRN-28-10: {parameters} parameters, {tensors} f32 tensor elements; checkpoint {written} bytes = {:.4} × (2 × parameters × 4 bytes = {reference})",
        written as f64 / reference as f64
    );
    assert!((written as f64) < 1.1 * ((tensors + parameters) * 4) as f64);
}

#[test]
fn testing_within_epochs_records_every_kth_iteration_and_leaves_the_trajectory_unchanged() {
    let backend = CpuBackend::with_threads(2);
    let data = Toy::new();
    let mut plain = trainer(&backend, config(4, 0.05));
    plain.run(&data, &mut Silent).expect("plain run");
    let mut tested = trainer(
        &backend,
        RunConfig {
            test_every_iterations: 1,
            ..config(4, 0.05)
        },
    );
    tested
        .run(&data, &mut Silent)
        .expect("run tested every step");

    assert_eq!(weights(&mut plain), weights(&mut tested));
    for (p, t) in plain.history().iter().zip(tested.history()) {
        assert_eq!((p.test, p.swa_test, p.train), (t.test, t.swa_test, t.train));
        assert_eq!(t.steps, 2);
        // Two steps an epoch: the first is tested within the epoch, the second is the epoch's own test.
        let iterations: Vec<usize> = t.iteration_tests.iter().map(|i| i.iteration).collect();
        assert_eq!(iterations, vec![2 * t.epoch - 1]);
        assert!(p.iteration_tests.is_empty());
        let within = t.iteration_tests[0];
        assert_eq!(within.test.count, 4);
        assert_eq!(within.lr, plain.config().schedule.lr(t.epoch - 1, 0, 2));
    }
    // After the first step of training the weights differ from the epoch's end, and so does the loss.
    let first = &tested.history()[0];
    assert_ne!(first.iteration_tests[0].test.loss, first.test.loss);
}

/// The SWA run of `config(epochs)` collecting SWAG moments with `max_rank` deviation columns.
fn swag_config(epochs: usize, max_rank: usize) -> RunConfig {
    RunConfig {
        swag: Some(SwagCollection { max_rank }),
        ..config(epochs, 0.05)
    }
}

/// One parameter's moments on the host: name, mean, second moment, deviations oldest first.
type HostMoments = (String, Vec<f32>, Vec<f32>, Vec<Vec<f32>>);

/// Everything the moments hold, deviations oldest first (independent of where the ring starts).
fn swag_values(moments: &SwagMoments<CpuBackend>) -> Vec<HostMoments> {
    moments
        .names()
        .into_iter()
        .map(|name| {
            let host = |t: &swa_core::CpuTensor| t.iter().copied().collect::<Vec<f32>>();
            (
                name.to_owned(),
                moments.mean(name).map(host).unwrap_or_default(),
                moments.second_moment(name).map(host).unwrap_or_default(),
                moments
                    .deviations(name)
                    .unwrap_or_default()
                    .into_iter()
                    .map(host)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn a_swag_run_collects_its_snapshots_moments_and_resumes_them_bit_for_bit() {
    let backend = CpuBackend::with_threads(2);
    // Snapshots after epochs 2 to 6: five, into a ring of two columns, which wraps before and after the
    // interruption after epoch 4.
    let config = swag_config(6, 2);
    let dir = tempfile::tempdir().expect("temporary folder");
    let (mut whole, mut resumed) = whole_and_resumed(&backend, &config, 4, dir.path());
    let moments = whole.swag().expect("moments collected");
    assert_eq!((moments.count(), moments.rank()), (5, 2));

    // The first moment is the SWA average, bit for bit: both are the same running mean.
    let average = whole.average().expect("averaged");
    for (name, mean, _, _) in swag_values(moments) {
        let averaged: Vec<f32> = average
            .tensor(&name)
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default();
        assert_eq!(mean, averaged, "{name}");
    }
    // The newest deviation is the last snapshot (the final weights) minus the mean.
    let last_weights = weights(&mut whole);
    for (name, mean, _, deviations) in swag_values(whole.swag().expect("moments")) {
        let theta = &last_weights
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a parameter of the model")
            .1;
        let expected: Vec<f32> = theta.iter().zip(&mean).map(|(t, m)| t - m).collect();
        assert_eq!(deviations.last(), Some(&expected), "{name}");
    }

    // A resumed run ends with the same moments, and its last checkpoint holds them under the authors' keys.
    let whole_values = swag_values(whole.swag().expect("moments"));
    assert_eq!(swag_values(resumed.swag().expect("moments")), whole_values);
    assert_eq!(weights(&mut resumed), weights(&mut whole));
    let checkpoint = dir.path().join("epoch-0006");
    let stored = swa_models::checkpoint::StateDict::load(&checkpoint.join(SWAG_FILE))
        .expect("the moments' tensors");
    let (first, mean, _, _) = &whole_values[0];
    assert_eq!(
        stored
            .get(&format!("{first}_cov_mat_sqrt"))
            .map(|t| t.shape().to_vec()),
        Some(vec![2, mean.len()])
    );
    let loaded = load_swag_moments(&backend, &checkpoint)
        .expect("readable")
        .expect("moments in the checkpoint");
    assert_eq!(swag_values(&loaded), whole_values);
}

#[test]
fn swag_moments_need_a_run_that_averages_and_at_least_one_column() {
    let backend = CpuBackend::with_threads(1);
    let build = |config: RunConfig| {
        let arch: Architecture = "preresnet8".parse().expect("valid name");
        let model = arch.build(&backend, 2, 5).expect("network");
        let eval = arch.build(&backend, 2, 5).expect("network");
        Trainer::new(backend.clone(), config, model, eval).err()
    };
    let sgd = RunConfig {
        swag: Some(SwagCollection { max_rank: 20 }),
        snapshots: None,
        ..config(4, 0.05)
    };
    match build(sgd) {
        Some(TrainError::InvalidConfig(message)) => {
            assert!(message.contains("SWAG"), "{message}")
        }
        other => panic!("expected an invalid configuration, got {other:?}"),
    }
    match build(swag_config(4, 0)) {
        Some(TrainError::InvalidConfig(message)) => {
            assert!(message.contains("max_rank 0"), "{message}")
        }
        other => panic!("expected an invalid configuration, got {other:?}"),
    }
    // A rank whose K + 2 copies of the parameters exceed the host's memory is refused before training.
    let available = backend.memory_available().expect("/proc/meminfo");
    let huge_rank = usize::try_from(available / 4).expect("fits usize");
    match build(swag_config(4, huge_rank)) {
        Some(TrainError::Swag(SwagError::DoesNotFit { max_rank, .. })) => {
            assert_eq!(max_rank, huge_rank)
        }
        other => panic!("expected moments that do not fit, got {other:?}"),
    }
}

#[test]
fn a_swag_checkpoint_missing_a_key_or_with_a_wrong_shape_names_it() {
    let backend = CpuBackend::with_threads(2);
    let data = Toy::new();
    let dir = tempfile::tempdir().expect("temporary folder");
    let mut run = trainer(&backend, swag_config(3, 2));
    run.with_checkpoints(dir.path()).expect("empty folder");
    run.run(&data, &mut Silent).expect("run");
    let checkpoint = dir.path().join("epoch-0003");
    let path = checkpoint.join(SWAG_FILE);
    let original = swa_models::checkpoint::StateDict::load(&path).expect("moments");
    let key = original
        .iter()
        .map(|(k, _)| k.to_owned())
        .find(|k| k.ends_with("_sq_mean"))
        .expect("a second moment");

    let mut without = swa_models::checkpoint::StateDict::load(&path).expect("moments");
    without.remove(&key);
    without.save(&path).expect("write");
    let message = load_swag_moments(&backend, &checkpoint)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(message.contains(&key), "{message}");

    let mut reshaped = swa_models::checkpoint::StateDict::load(&path).expect("moments");
    reshaped.insert(
        key.clone(),
        swa_models::checkpoint::StoredTensor::F32 {
            shape: vec![1],
            values: vec![0.0],
        },
    );
    reshaped.save(&path).expect("write");
    let message = load_swag_moments(&backend, &checkpoint)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains(&key) && message.contains("[1]"),
        "{message}"
    );
}

/// SWA from pretrained weights (the paper's ImageNet protocol): the average starts from the weights the
/// run starts from, as Algorithm 1's `w_SWA ← ŵ` does, then takes the end of every one-epoch cycle,
/// where the learning rate is α2; starting it later is refused.
#[test]
fn swa_from_pretrained_weights_averages_the_start_and_every_cycle_end() {
    let backend = CpuBackend::with_threads(2);
    let data = Toy::new();
    let recipe = PretrainedSwa {
        epochs: 2,
        batch_size: 4,
        report_epochs: vec![1],
        // Large enough rates that one epoch moves the weights visibly.
        alpha1: 0.05,
        alpha2: 0.01,
        ..PretrainedSwa::paper("wrn10x1".parse().expect("valid name"))
    };
    let config = recipe.run_config(3).expect("valid recipe");
    let steps = data.train_batches_per_epoch();
    assert_eq!(
        config.schedule.lr(1, steps - 1, steps),
        0.01,
        "each epoch ends at α2"
    );
    let first = (1.0 - 1.0 / steps as f32) * 0.05 + 0.01 / steps as f32;
    assert!(
        (config.schedule.lr(1, 0, steps) - first).abs() < 1e-7,
        "and starts one step below α1 (eq. 1)"
    );
    let mut run = trainer(&backend, config);
    let start = weights(&mut run);
    run.average_current_weights()
        .expect("before the first epoch");
    assert!(
        run.average_current_weights().is_err(),
        "the average already holds the start"
    );
    run.run_epoch(&data, &mut Silent).expect("epoch 1");
    let first_cycle = weights(&mut run);
    let average = run.average().expect("averaged");
    assert_eq!(average.count(), 2, "the start and the first cycle's end");
    // Parameters are averaged; BatchNorm statistics are recomputed for the average instead.
    let mut compared = 0;
    for (index, (name, _)) in start.iter().enumerate() {
        let Some(tensor) = average.tensor(name) else {
            continue;
        };
        compared += 1;
        let averaged = backend.to_host(tensor).expect("values");
        assert_ne!(start[index].1, first_cycle[index].1, "{name} did not move");
        for (i, &value) in averaged.iter().enumerate() {
            let (a, b) = (start[index].1[i], first_cycle[index].1[i]);
            let mean = 0.5 * (a + b);
            assert!(
                (value - mean).abs() <= 1e-6 * (1.0 + mean.abs()),
                "{name}[{i}]: {value} is not the mean of {a} and {b}"
            );
        }
    }
    assert!(compared > 0, "no parameter was averaged");
    let evaluated: Vec<usize> = run
        .history()
        .iter()
        .filter(|r| r.swa_test.is_some())
        .map(|r| r.epoch)
        .collect();
    assert_eq!(evaluated, vec![1], "the average is reported after epoch 1");
    run.run_epoch(&data, &mut Silent).expect("epoch 2");
    assert_eq!(run.average().map(|a| a.count()), Some(3));
    assert!(run.history().last().is_some_and(|r| r.swa_test.is_some()));

    let late = PretrainedSwa {
        report_epochs: vec![3],
        ..recipe.clone()
    };
    assert!(late.run_config(3).is_err(), "a report after the last epoch");
    let mut sgd = trainer(&backend, sgd_config(1, 0.05));
    assert!(
        sgd.average_current_weights().is_err(),
        "an SGD run keeps no average"
    );
}
