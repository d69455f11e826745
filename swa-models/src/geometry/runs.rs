//! The weights the paper's figures need, found in the folder of one seed's runs as
//! [`crate::protocol::plan_seed`] lays it out: `sgd/`, `swa/` and `fge/`, each with its checkpoints and,
//! once finished, its final weights.

use std::path::{Path, PathBuf};

use crate::geometry::GeometryError;
use crate::protocol::{RunKind, FINAL_WEIGHTS_FILE, SWA_WEIGHTS_FILE};
use crate::train::{checkpoint_info, find_checkpoints, CheckpointInfo, RunConfig, MODEL_FILE};

/// One run's folder: its latest checkpoint's record and the checkpoints on disk.
#[derive(Clone, Debug)]
pub struct RunFolder {
    /// Which run.
    pub kind: RunKind,
    /// The run's folder.
    pub dir: PathBuf,
    /// What the latest checkpoint records.
    pub info: CheckpointInfo,
    /// The checkpoints on disk, (epochs done, folder), by epoch.
    pub checkpoints: Vec<(usize, PathBuf)>,
}

/// A weight file with what it is, for figures and error messages.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightsFile {
    /// What the weights are (`SGD`, `SWA`, `SWA run, epoch 13`).
    pub label: String,
    /// The safetensors file.
    pub path: PathBuf,
}

/// The runs of one seed.
#[derive(Clone, Debug)]
pub struct SeedRuns {
    /// The seed's folder.
    pub dir: PathBuf,
    /// The runs found, in [`RunKind::ALL`]'s order.
    pub runs: Vec<RunFolder>,
}

impl SeedRuns {
    /// Reads the runs in `dir`; a folder without any run's checkpoints is an error that says what a run
    /// folder holds.
    pub fn open(dir: &Path) -> Result<Self, GeometryError> {
        let mut runs = Vec::new();
        for kind in RunKind::ALL {
            let run_dir = dir.join(kind.name());
            let checkpoints = find_checkpoints(&run_dir.join("checkpoints"))?;
            let Some((_, latest)) = checkpoints.last() else {
                continue;
            };
            let info = checkpoint_info(latest)?;
            runs.push(RunFolder {
                kind,
                dir: run_dir,
                info,
                checkpoints,
            });
        }
        if runs.is_empty() {
            return Err(GeometryError::MissingRun {
                dir: dir.to_path_buf(),
                what:
                    "any run: expected sgd/, swa/ or fge/ with checkpoints/epoch-NNNN inside, as \
                       `cargo xtask reproduce` writes them"
                        .into(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            runs,
        })
    }

    /// The run of `kind`, or an error naming what it is needed for.
    pub fn run(&self, kind: RunKind, needed_for: &str) -> Result<&RunFolder, GeometryError> {
        self.runs
            .iter()
            .find(|r| r.kind == kind)
            .ok_or_else(|| GeometryError::MissingRun {
                dir: self.dir.clone(),
                what: format!("the {kind} run ({needed_for}): train it with `--runs {kind}`"),
            })
    }

    /// The SGD solution: the SGD run's weights after its last epoch.
    pub fn sgd_solution(&self) -> Result<WeightsFile, GeometryError> {
        let run = self.run(RunKind::Sgd, "the SGD solution")?;
        run.finished_file(FINAL_WEIGHTS_FILE, "SGD")
    }

    /// The SWA solution: the SWA run's average, after its last epoch.
    pub fn swa_solution(&self) -> Result<WeightsFile, GeometryError> {
        let run = self.run(RunKind::Swa, "the SWA solution")?;
        run.finished_file(SWA_WEIGHTS_FILE, "SWA")
    }

    /// The point from which the SWA run left the SGD run's trajectory: the SGD checkpoint of the epochs
    /// both trained identically.
    pub fn common_start(&self) -> Result<WeightsFile, GeometryError> {
        let swa = self.run(RunKind::Swa, "the common start of SGD and SWA")?;
        let epochs = swa.info.branched_epochs;
        if epochs == 0 {
            return Err(GeometryError::MissingRun {
                dir: swa.dir.clone(),
                what: "a common start: the SWA run trained all its epochs itself rather than \
                       continuing the SGD run's checkpoint"
                    .into(),
            });
        }
        let sgd = self.run(RunKind::Sgd, "the common start of SGD and SWA")?;
        let mut file = sgd.checkpoint_weights(epochs)?;
        file.label = format!("start (epoch {epochs})");
        Ok(file)
    }

    /// The first, middle and last snapshots of a run's trajectory (SWA: constant learning rate; FGE:
    /// cyclical), as [`crate::protocol::trajectory_epochs`] keeps them.
    pub fn trajectory(&self, kind: RunKind) -> Result<[WeightsFile; 3], GeometryError> {
        let run = self.run(kind, "the trajectory plane")?;
        let snapshots = run.info.config.snapshot_epochs();
        if snapshots.len() < 3 {
            return Err(run.too_few_snapshots(snapshots.len()));
        }
        let picked = [0, snapshots.len() / 2, snapshots.len() - 1].map(|i| snapshots[i]);
        let [a, b, c] = picked.map(|epoch| run.checkpoint_weights(epoch));
        Ok([a?, b?, c?])
    }

    /// The last three snapshots of the FGE run.
    pub fn fge_snapshots(&self) -> Result<[WeightsFile; 3], GeometryError> {
        let run = self.run(RunKind::Fge, "the plane through three FGE snapshots")?;
        let snapshots = run.info.config.snapshot_epochs();
        let n = snapshots.len();
        if n < 3 {
            return Err(run.too_few_snapshots(n));
        }
        let [a, b, c] = [n - 3, n - 2, n - 1].map(|i| run.checkpoint_weights(snapshots[i]));
        Ok([a?, b?, c?])
    }

    /// The training images the runs held out ([`RunConfig::holdout`]), which
    /// must agree between them: 0 when they trained on every image.
    pub fn holdout(&self) -> Result<usize, GeometryError> {
        self.agreed("runs that held out the same training images", |config| {
            config.holdout
        })
    }

    /// The weight decay of the runs (the L2 term of the train loss), which must agree between them.
    pub fn weight_decay(&self) -> Result<f32, GeometryError> {
        self.agreed("runs with one weight decay", |config| {
            config.sgd.weight_decay
        })
    }

    /// A setting every run must share, or an error saying what was needed (`what`) and listing each
    /// run's.
    fn agreed<T: Copy + PartialEq + std::fmt::Debug>(
        &self,
        what: &str,
        setting: impl Fn(&RunConfig) -> T,
    ) -> Result<T, GeometryError> {
        let values: Vec<T> = self.runs.iter().map(|r| setting(&r.info.config)).collect();
        match values.split_first() {
            Some((&first, rest)) if rest.iter().all(|&v| v == first) => Ok(first),
            _ => Err(GeometryError::MissingRun {
                dir: self.dir.clone(),
                what: format!("{what} (found {values:?})"),
            }),
        }
    }
}

impl RunFolder {
    fn finished_file(&self, name: &str, label: &str) -> Result<WeightsFile, GeometryError> {
        let path = self.dir.join(name);
        if self.info.epochs_done < self.info.config.epochs || !path.is_file() {
            return Err(GeometryError::MissingRun {
                dir: self.dir.clone(),
                what: format!(
                    "{name}, which the {} run writes when it finishes ({} of {} epochs done): \
                     finish it with `cargo xtask reproduce`",
                    self.kind, self.info.epochs_done, self.info.config.epochs
                ),
            });
        }
        Ok(WeightsFile {
            label: label.to_string(),
            path,
        })
    }

    /// The weights of the checkpoint after `epochs` epochs.
    pub fn checkpoint_weights(&self, epochs: usize) -> Result<WeightsFile, GeometryError> {
        match self.checkpoints.iter().find(|(e, _)| *e == epochs) {
            Some((_, dir)) => Ok(WeightsFile {
                label: format!("{} epoch {epochs}", self.kind),
                path: dir.join(MODEL_FILE),
            }),
            None => Err(GeometryError::MissingRun {
                dir: self.dir.join("checkpoints"),
                what: format!(
                    "epoch-{epochs:04} of the {} run (found {:?}); runs keep the checkpoints the \
                     figures need since they were planned with the trajectory checkpoints, so train \
                     this run again into a new folder",
                    self.kind,
                    self.checkpoints.iter().map(|c| c.0).collect::<Vec<_>>()
                ),
            }),
        }
    }

    fn too_few_snapshots(&self, found: usize) -> GeometryError {
        GeometryError::MissingRun {
            dir: self.dir.clone(),
            what: format!(
                "three snapshots of the {} run; its schedule takes {found} at epoch ends",
                self.kind
            ),
        }
    }
}
