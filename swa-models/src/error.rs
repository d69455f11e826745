//! Errors of training, evaluation and checkpointing.

use std::path::PathBuf;

use swa_core::averaging::AveragingError;
use swa_core::backend::BackendError;
use swa_core::swag::SwagError;

use crate::checkpoint::CheckpointError;

/// What can go wrong while training or evaluating a network.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A backend operation failed; `context` says what the trainer was doing.
    #[error("{context}: {source}")]
    Backend {
        /// What was being done.
        context: String,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// The loss became NaN or infinite; training stops and the last good checkpoint is kept.
    #[error("the training loss is {loss} at epoch {epoch}, step {step} (learning rate {lr}); the last good checkpoint is kept")]
    NonFiniteLoss {
        /// 0-based epoch.
        epoch: usize,
        /// 0-based step within the epoch.
        step: usize,
        /// The loss value.
        loss: f32,
        /// The learning rate of that step.
        lr: f32,
    },
    /// Saved state does not fit the model or run it is loaded into.
    #[error("saved state does not fit: {0}")]
    StateMismatch(String),
    /// A training setting is out of its range (a schedule, the SWA policy, SGD's hyper-parameters).
    #[error("invalid training configuration: {0}")]
    InvalidConfig(String),
    /// A batch whose shape does not fit the model or the data set.
    #[error("bad batch: {0}")]
    BadBatch(String),
    /// The data source could not make a batch: a corrupt or unreadable image, a vanished file (the
    /// source's error, which names the file; shown in this error's message, so not repeated as its
    /// source).
    #[error("reading data: {0}")]
    Data(Box<dyn std::error::Error + Send + Sync>),
    /// A network could not be built for the run.
    #[error("building the network: {0}")]
    Model(#[from] crate::nets::ModelError),
    /// Weight averaging failed.
    #[error("weight averaging: {0}")]
    Averaging(#[from] AveragingError),
    /// Collecting or sampling SWAG moments failed.
    #[error("SWAG moments: {0}")]
    Swag(#[from] SwagError),
    /// Reading or writing a safetensors file of a checkpoint failed (the error names the file).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint's metadata could not be written or read as JSON.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A collective operation between the ranks of a data-parallel run failed.
    #[error(transparent)]
    Distributed(#[from] crate::distributed::DistributedError),
    /// A checkpoint written in a layout this version does not read.
    #[error(
        "{path}: the checkpoint is in {}, which this version does not read; it reads format \
         {expected}, which keeps the momentum buffers and the average in safetensors files beside \
         state.json. Finish the run with the version that wrote it, or train again into an empty folder",
        describe_format(*.found)
    )]
    CheckpointFormat {
        /// The checkpoint's `state.json`.
        path: PathBuf,
        /// The format it records; `None` for the unversioned layout that kept every tensor inside
        /// `state.json`.
        found: Option<u32>,
        /// The format this version reads and writes.
        expected: u32,
    },
}

fn describe_format(found: Option<u32>) -> String {
    match found {
        None => "the old format that keeps its tensors inside state.json".to_owned(),
        Some(format) => format!("format {format}"),
    }
}

impl TrainError {
    /// Wraps a backend error with what the trainer was doing.
    pub fn backend(context: impl Into<String>) -> impl FnOnce(BackendError) -> TrainError {
        let context = context.into();
        move |source| TrainError::Backend { context, source }
    }
}
