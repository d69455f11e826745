//! The benchmark suites. Each measures its figures and their references in the same run and hands them
//! to a [`Recorder`](crate::Recorder).
//!
//! The averaging, kernel and training suites are generic over [`TimedBackend`](crate::timing::TimedBackend)
//! so that the gpu suite measures the same figures on the wgpu backend.

pub mod averaging;
pub mod data;
pub mod epoch;
pub mod evaluation;
pub mod folder;
pub mod geometry;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod kernels;
pub mod layers;
pub mod overhead;
pub mod training;
