//! # swa-bench
//!
//! Benchmarks that say how fast swa-rs is and how close to the machine's limits.
