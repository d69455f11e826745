//! `cargo xtask`: experiment orchestration for swa-rs.

use clap::{Parser, Subcommand};

/// Experiment orchestration for swa-rs.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print each network with its class count and parameter count.
    Models,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Models => anyhow::bail!("the networks are not available yet"),
    }
}
