//! The PyTorch reference: `torch/torch_ref.py` (the project's PyTorch versions of the paper's networks)
//! run by a Python interpreter the user names, with the same thread count as swa-rs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors running the PyTorch reference script.
#[derive(Debug, thiserror::Error)]
pub enum TorchError {
    /// The interpreter could not be started.
    #[error("running `{python} {script}`: {source}")]
    Start {
        /// The interpreter.
        python: String,
        /// The script.
        script: String,
        /// Why it did not start.
        source: std::io::Error,
    },
    /// The script exited with an error.
    #[error("`{command}` exited with {status}: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// The script's output held no `… X img/s` figure.
    #[error("`{command}` printed no \"<number> img/s\" figure; its output was: {output:?}")]
    NoFigure {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
}

/// Runs the reference script.
#[derive(Clone, Debug)]
pub struct TorchRunner {
    /// The Python interpreter (one with PyTorch installed).
    pub python: PathBuf,
    /// The script, by default the copy kept in this crate.
    pub script: PathBuf,
    /// The value of `THREADS` (the script's `torch.set_num_threads`) and of `OMP_NUM_THREADS`.
    pub threads: usize,
}

/// The reference script kept in this crate.
pub fn default_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("torch/torch_ref.py")
}

impl TorchRunner {
    /// Training images per second of `model` (a name the script knows: `preresnet20`, `vgg16`, …) at
    /// batch `batch`: `PYTHON script train MODEL BATCH`, which times a few SGD steps after a warm-up one.
    pub fn train_images_per_second(&self, model: &str, batch: usize) -> Result<f64, TorchError> {
        let command = format!(
            "THREADS={} {} {} train {model} {batch}",
            self.threads,
            self.python.display(),
            self.script.display()
        );
        let output = Command::new(&self.python)
            .arg(&self.script)
            .args(["train", model, &batch.to_string()])
            .env("THREADS", self.threads.to_string())
            .env("OMP_NUM_THREADS", self.threads.to_string())
            .output()
            .map_err(|source| TorchError::Start {
                python: self.python.display().to_string(),
                script: self.script.display().to_string(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: String = stderr
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(TorchError::Failed {
                command,
                status: output.status.to_string(),
                stderr: tail,
            });
        }
        parse_images_per_second(&stdout).ok_or_else(|| TorchError::NoFigure {
            command,
            output: stdout.trim().to_string(),
        })
    }
}

/// The number before the last `img/s` in the script's output (`preresnet20 batch 128: 95.3 img/s`).
pub fn parse_images_per_second(output: &str) -> Option<f64> {
    output.lines().rev().find_map(|line| {
        let before = line
            .split("img/s")
            .next()
            .filter(|_| line.contains("img/s"))?;
        before.split_whitespace().last()?.parse::<f64>().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_figure_the_script_prints() {
        assert_eq!(
            parse_images_per_second("preresnet20 batch 128: 95.3 img/s\n"),
            Some(95.3)
        );
        assert_eq!(
            parse_images_per_second("warning: something\nvgg16 batch 128: 12.0 img/s"),
            Some(12.0)
        );
    }

    #[test]
    fn output_without_a_figure_gives_none() {
        assert_eq!(parse_images_per_second("Traceback: KeyError 'x'"), None);
        assert_eq!(parse_images_per_second("batch 128: fast img/s"), None);
        assert_eq!(parse_images_per_second(""), None);
    }
}
