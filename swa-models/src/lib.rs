//! # swa-models
//!
//! The networks of the SWA paper, written once over swa-core's `Backend`, and how they are trained.
//!
//! - [`layers`]: convolution, BatchNorm, linear, pooling, ReLU, dropout, sequential containers and residual
//!   blocks, each a [`Module`] with PyTorch's tensor names;
//! - [`nets`]: VGG-16 (with and without BatchNorm), PreResNet and WideResNet, built as the original SWA
//!   code builds them, by name ([`Architecture`]) or configuration ([`NetworkConfig`]);
//! - [`protocol`]: the paper's runs (SGD, SWA, FGE) from a network's recipe, and the plan by which a seed's
//!   runs share the epochs they train identically;
//! - [`checkpoint`]: weights in safetensors files that PyTorch loads strictly;
//! - [`train`]: the training loop for SGD, SWA and FGE runs, with per-epoch checkpoints and resume;
//!   [`step`] (the one training step, which benchmarks and estimates time too), [`optim`] (SGD), [`bn`] (`update_bn`: BatchNorm recomputation for averaged weights) and [`evaluate`]
//!   (accuracy, NLL, ensembles) are its parts, usable on their own;
//! - [`swag`] and [`calibration`]: Bayesian model averaging over networks drawn from the SWAG posterior of
//!   an SWA run (moments collected by the trainer), and the accuracy, NLL, calibration error, reliability
//!   diagrams and temperature scaling that compare it with SGD, SWA and FGE;
//! - [`distributed`]: data-parallel training over several processes (MPI behind the feature `mpi`): the
//!   ranks' shards of each batch, gradients all-reduced in the one training step, BatchNorm per rank or
//!   synchronised over the ranks, BatchNorm recomputed, evaluation and ensembles over all ranks' data,
//!   and the scaling model;
//! - [`geometry`]: the loss surface around trained weights (random rays, the SGD–SWA line, planes through
//!   three points), the paper's flatness figures as numbers.
//!
//! ```
//! use swa_core::CpuBackend;
//! use swa_models::{module::parameter_count, Architecture};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = CpuBackend::with_threads(1);
//! let architecture: Architecture = "preresnet20".parse()?;
//! let net = architecture.build(&backend, 10, 0)?;
//! assert_eq!(parameter_count(net.as_ref()), 272_282);
//! # Ok(())
//! # }
//! ```

pub mod batch;
pub mod bn;
pub mod calibration;
pub mod checkpoint;
pub mod distributed;
pub mod error;
pub mod evaluate;
pub mod geometry;
pub mod layers;
pub mod module;
pub mod nets;
pub mod optim;
pub mod protocol;
pub mod step;
pub mod swag;
pub mod train;

pub use batch::{BatchSource, HostBatch};
pub use bn::update_bn;
pub use error::TrainError;
pub use module::{ForwardMode, Module, Param};
pub use nets::{Architecture, ModelError, Network, NetworkConfig};
pub use step::{sgd_step, sgd_step_synchronized, LocalStep, StepSync};
pub use train::{IterationTest, RunConfig, SnapshotUse, Snapshots, SwagCollection, Trainer};

/// The README's example, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExample;
