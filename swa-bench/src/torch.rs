//! The PyTorch reference: `torch/torch_ref.py` (the project's PyTorch versions of the paper's networks)
//! run by a Python interpreter the user names, with the same thread count as swa-rs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::memory::{last_lines, PeakRss};

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
    /// The script's output held no `start_rss_kib=N peak_rss_kib=N` line.
    #[error("`{command}` printed no \"start_rss_kib=N peak_rss_kib=N\" line; its output was: {output:?}")]
    NoMemoryFigure {
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
        let (command, stdout) = self.run(
            &self.script,
            &["train".into(), model.into(), batch.to_string()],
        )?;
        parse_images_per_second(&stdout).ok_or_else(|| TorchError::NoFigure {
            command,
            output: stdout.trim().to_string(),
        })
    }

    /// The resident memory of a process training `model` at `batch` for `steps` SGD steps (the first
    /// included): `PYTHON script peak MODEL BATCH STEPS`, which reads its resident set after importing
    /// PyTorch and its peak (`VmHWM`, not `ru_maxrss`: see [`crate::memory`]) after the steps. Run in a
    /// process of its own, so that nothing else's peak mixes in.
    pub fn train_peak_rss(
        &self,
        model: &str,
        batch: usize,
        steps: usize,
    ) -> Result<PeakRss, TorchError> {
        let (command, stdout) = self.run(
            &self.script,
            &[
                "peak".into(),
                model.into(),
                batch.to_string(),
                steps.to_string(),
            ],
        )?;
        PeakRss::parse(&stdout).ok_or_else(|| TorchError::NoMemoryFigure {
            command,
            output: stdout.trim().to_string(),
        })
    }

    /// Training images per second of `model` over `batches` batches of `batch` images of the CIFAR-10
    /// training split read from `data` (the binary-version folder), each batch shuffled, cropped, flipped
    /// and normalised by the script itself before its SGD step: `PYTHON script epoch MODEL DATA BATCHES
    /// BATCH SEED`. Reading the files and one warm-up step are not timed.
    pub fn epoch_images_per_second(
        &self,
        model: &str,
        data: &Path,
        batches: usize,
        batch: usize,
        seed: u64,
    ) -> Result<f64, TorchError> {
        let (command, stdout) = self.run(
            &self.script,
            &[
                "epoch".into(),
                model.into(),
                data.display().to_string(),
                batches.to_string(),
                batch.to_string(),
                seed.to_string(),
            ],
        )?;
        parse_images_per_second(&stdout).ok_or_else(|| TorchError::NoFigure {
            command,
            output: stdout.trim().to_string(),
        })
    }

    /// Images per second of torchvision's ImageFolder training pipeline on the folder `data`
    /// (`RandomResizedCrop(224)`, flip, `ToTensor`, `Normalize`) through a `DataLoader` of `workers`
    /// persistent worker processes at `batch`, one epoch after an untimed one: `PYTHON script folder DATA
    /// BATCH WORKERS`.
    pub fn folder_images_per_second(
        &self,
        data: &Path,
        batch: usize,
        workers: usize,
    ) -> Result<f64, TorchError> {
        let (command, stdout) = self.run(
            &self.script,
            &[
                "folder".into(),
                data.display().to_string(),
                batch.to_string(),
                workers.to_string(),
            ],
        )?;
        parse_images_per_second(&stdout).ok_or_else(|| TorchError::NoFigure {
            command,
            output: stdout.trim().to_string(),
        })
    }

    /// Evaluation and `update_bn` images per second of `model` on `batches` random batches of `batch`
    /// images, one figure per timed pass: `PYTHON torch/eval_probe.py SCRIPT MODEL BATCH BATCHES PASSES`,
    /// which imports the networks from this runner's script. `update_bn` is empty for a model without
    /// BatchNorm.
    pub fn evaluation_images_per_second(
        &self,
        model: &str,
        batch: usize,
        batches: usize,
        passes: usize,
    ) -> Result<EvaluationRates, TorchError> {
        let probe = evaluation_probe();
        let (command, stdout) = self.run(
            &probe,
            &[
                self.script.display().to_string(),
                model.into(),
                batch.to_string(),
                batches.to_string(),
                passes.to_string(),
            ],
        )?;
        let rates = EvaluationRates {
            eval: labelled_images_per_second(&stdout, "eval"),
            update_bn: labelled_images_per_second(&stdout, "update_bn"),
        };
        if rates.eval.is_empty() {
            return Err(TorchError::NoFigure {
                command,
                output: stdout.trim().to_string(),
            });
        }
        Ok(rates)
    }

    /// Runs `PYTHON script ARGS…` with this runner's threads; returns the command line (for errors) and
    /// the standard output, or an error with the end of the standard error when it fails.
    fn run(&self, script: &Path, args: &[String]) -> Result<(String, String), TorchError> {
        let command = format!(
            "THREADS={} {} {} {}",
            self.threads,
            self.python.display(),
            script.display(),
            args.join(" ")
        );
        let output = Command::new(&self.python)
            .arg(script)
            .args(args)
            .env("THREADS", self.threads.to_string())
            .env("OMP_NUM_THREADS", self.threads.to_string())
            .output()
            .map_err(|source| TorchError::Start {
                python: self.python.display().to_string(),
                script: script.display().to_string(),
                source,
            })?;
        if !output.status.success() {
            return Err(TorchError::Failed {
                command,
                status: output.status.to_string(),
                stderr: last_lines(&String::from_utf8_lossy(&output.stderr), 5),
            });
        }
        Ok((
            command,
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ))
    }
}

/// PyTorch's evaluation and BatchNorm-recomputation rates, one per timed pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvaluationRates {
    /// Images per second of `model.eval()` under `torch.no_grad()`, with the loss and predictions.
    pub eval: Vec<f64>,
    /// Images per second of `torch.optim.swa_utils.update_bn`.
    pub update_bn: Vec<f64>,
}

/// The evaluation probe kept in this crate, which imports the networks of a [`TorchRunner::script`].
pub fn evaluation_probe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("torch/eval_probe.py")
}

/// The figures of the lines `KIND …: R img/s` whose first word is `kind`, in order.
pub fn labelled_images_per_second(output: &str, kind: &str) -> Vec<f64> {
    output
        .lines()
        .filter(|line| line.split_whitespace().next() == Some(kind))
        .filter_map(parse_images_per_second)
        .collect()
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
    fn labelled_figures_are_read_by_their_first_word_in_order() {
        let output = "eval vgg16bn b128 x4: 391.8 img/s\n\
                      eval vgg16bn b128 x4: 371.4 img/s\n\
                      update_bn vgg16bn b128 x4: 299.4 img/s\n\
                      evaluation took long: 1.0 img/s\n";
        assert_eq!(
            labelled_images_per_second(output, "eval"),
            vec![391.8, 371.4]
        );
        assert_eq!(labelled_images_per_second(output, "update_bn"), vec![299.4]);
        assert!(labelled_images_per_second(output, "train").is_empty());
    }

    #[test]
    fn output_without_a_figure_gives_none() {
        assert_eq!(parse_images_per_second("Traceback: KeyError 'x'"), None);
        assert_eq!(parse_images_per_second("batch 128: fast img/s"), None);
        assert_eq!(parse_images_per_second(""), None);
    }
}
