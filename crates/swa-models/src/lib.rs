//! # swa-models
//!
//! The networks of the SWA paper, written once over swa-core's `Backend`, and how they are trained.

pub mod module;

pub use module::{ForwardMode, Module, Param};
