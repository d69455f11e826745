//! `cargo xtask data …`: checks of the CIFAR data sets.

use clap::Subcommand;

/// Data-set commands.
#[derive(Subcommand)]
pub enum DataCommand {
    /// Verify a data set: counts per split and class, checksums, channel means.
    Check,
}

/// Runs a data command.
pub fn run(command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Check => anyhow::bail!("data checks are not available yet"),
    }
}
