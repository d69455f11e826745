//! # swa-core
//!
//! The mathematics of Stochastic Weight Averaging (Izmailov et al., UAI 2018), independent of any network or
//! device:
//!
//! - [`backend`]: the tensor [`Backend`] trait that every network is written against, and
//!   its reference implementation on the CPU over `ndarray`;
//! - [`averaging`]: weight averages over named tensors: the SWA running mean, EMA, and the count-weighted
//!   merge of two averages;
//! - [`schedule`]: learning-rate schedules as pure functions of (epoch, step);
//! - [`policy`]: the SWA policy that tells a training loop the learning rate now and whether to average now;
//! - [`seed`]: SplitMix64, from which every random stream of a run is seeded by counters;
//! - `allocator` (feature `mimalloc`): the allocator CPU training binaries install, set to keep the
//!   memory a step frees for the next step;
//! - [`swag`]: SWA-Gaussian (Maddox et al., NeurIPS 2019): the first and second moments and the last `K`
//!   deviations of the snapshots SWA averages, [`swag::SwagMoments`], and samples from the Gaussian
//!   posterior they define, with a diagonal or a low-rank-plus-diagonal covariance.
//!
//! swa-core does not depend on a GPU API: a user who wants only the maths depends on this crate alone.
//! The CPU backend is the default feature `cpu`; without it (`default-features = false`) the crate
//! builds without the GEMM and thread-pool stack, for a program that brings its own backend.
//!
//! For users of PyTorch's `torch.optim.swa_utils`: `AveragedModel` is [`WeightAverage`] behind the
//! [`WeightAveraging`] trait, its `avg_fn` the [`WeightRule`] (equal weights, EMA or custom), `n_averaged` is [`WeightAveraging::count`] and is saved in the
//! [`AverageState`] of a checkpoint, `use_buffers` is the explicit [`BufferPolicy`], and `SWALR` is
//! [`Schedule::SwaAnneal`] (with [`SwaPolicy::swalr`] for the whole recipe). `update_bn` needs a network
//! and data, so it is not here.

#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "mimalloc")]
#[cfg_attr(docsrs, doc(cfg(feature = "mimalloc")))]
pub mod allocator;
pub mod averaging;
pub mod backend;
pub mod params;
pub mod policy;
pub mod schedule;
pub mod seed;
pub mod swag;

#[cfg(feature = "cpu")]
pub use backend::cpu::{CpuBackend, CpuTensor};
pub use backend::{Backend, BackendError, BackendResult, HasShape};
pub use params::{LayoutEntry, LayoutError, NamedTensors, RoleFilter, TensorLayout, TensorRole};

pub use averaging::{
    AverageState, AveragingError, BufferPolicy, CustomRule, WeightAverage, WeightAveraging,
    WeightRule,
};
pub use policy::SwaPolicy;
pub use schedule::{AnnealStrategy, LrSchedule, Period, Schedule, ScheduleError};
