//! `cargo xtask`: experiment orchestration for swa-rs. Thin: the work lives in the library crates.

mod calibrate;
mod charts;
mod data;
mod geometry;
mod models;
mod reproduce;

use clap::{Parser, Subcommand};

// Training frees and reallocates tens of megabytes of activations every step: the allocator that keeps
// them (`swa_core::allocator`, turned on first thing in `main`) saves a page fault per page per step.
#[global_allocator]
static ALLOCATOR: swa_core::allocator::MiMalloc = swa_core::allocator::MiMalloc;

/// Experiment orchestration for swa-rs.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accuracy, NLL and calibration error of SGD, SWA, SWA + temperature, SWAG and FGE for a seed's
    /// runs, with reliability diagrams.
    Calibrate(calibrate::CalibrateArgs),
    /// Inspect and verify the CIFAR data sets.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// The paper's flatness figures for a seed's runs: random rays, the SGD-SWA line, planes (resumable).
    Geometry(geometry::GeometryArgs),
    /// Print each network with its class count and parameter count.
    Models,
    /// Reproduce the paper: SGD vs SWA vs FGE on CIFAR, with tables and plots (resumable).
    Reproduce(reproduce::ReproduceArgs),
}

fn main() -> anyhow::Result<()> {
    swa_core::allocator::keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::Calibrate(args) => calibrate::run(args),
        Command::Data(command) => data::run(command),
        Command::Reproduce(args) => reproduce::run(args),
        Command::Geometry(args) => geometry::run(args),
        Command::Models => models::run(),
    }
}
