//! `cargo xtask data …`: verification and download of the CIFAR data sets.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use swa_data::{DataError, DatasetKind};

/// Data-set commands.
#[derive(Subcommand)]
pub enum DataCommand {
    /// Verify a data set: counts per split and class, checksums, channel means. Exits non-zero
    /// on any defect.
    Check {
        /// Which data set.
        dataset: DatasetArg,
        /// The data: an official folder or archive, or a folder holding one. Default: the data
        /// folder ($SWA_DATA_DIR, else the platform cache folder).
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Find a data set in the data folder or download its official binary archive there.
    Download {
        /// Which data set.
        dataset: DatasetArg,
        /// The data folder. Default: $SWA_DATA_DIR, else the platform cache folder.
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

/// A data set on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatasetArg {
    /// CIFAR-10.
    Cifar10,
    /// CIFAR-100.
    Cifar100,
}

impl From<DatasetArg> for DatasetKind {
    fn from(arg: DatasetArg) -> Self {
        match arg {
            DatasetArg::Cifar10 => DatasetKind::Cifar10,
            DatasetArg::Cifar100 => DatasetKind::Cifar100,
        }
    }
}

/// Reads both splits of a data set from `data` (a folder or archive), or from the data folder, downloading
/// it there when it is missing.
pub fn load_splits(
    kind: DatasetKind,
    data: Option<&Path>,
) -> anyhow::Result<swa_data::CifarSplits> {
    let path = match data {
        Some(path) => path.to_path_buf(),
        None => swa_data::ensure_available(kind, None)?,
    };
    swa_data::load_kind(kind, &path)
        .with_context(|| format!("reading {} from {}", kind.display_name(), path.display()))
}

/// Runs a data command.
pub fn run(command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Check { dataset, data } => check(dataset.into(), data.as_deref()),
        DataCommand::Download { dataset, data } => {
            let path = swa_data::ensure_available(dataset.into(), data.as_deref())?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

fn check(kind: DatasetKind, data: Option<&Path>) -> anyhow::Result<()> {
    let path = match data {
        Some(path) => path.to_path_buf(),
        None => swa_data::default_data_dir()?,
    };
    let report = match swa_data::check(kind, &path) {
        Ok(report) => report,
        Err(error @ DataError::NotFound { .. }) if data.is_none() => {
            return Err(error).with_context(|| {
                format!(
                    "no {kind} in the data folder; download it with `cargo xtask data download {}`, \
                     or name it with --data PATH",
                    kind.cli_name()
                )
            })
        }
        Err(error) => return Err(error).with_context(|| format!("checking {kind} at {}", path.display())),
    };
    print!("{report}");
    if report.is_valid() {
        Ok(())
    } else {
        anyhow::bail!(
            "{kind} at {} is not the official data set: {} defect(s) listed above, the first: {}",
            report.source.path.display(),
            report.defects.len(),
            report.defects.first().map(String::as_str).unwrap_or("")
        )
    }
}
