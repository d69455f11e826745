//! Peak resident memory of training, each side measured in a process of its own.
//!
//! A process's peak resident set (Linux's `VmHWM`) only ever grows, so two trainings measured in one
//! process would report the larger of the two, and swa-rs measured inside the benchmark would carry the
//! benchmark's own buffers. Each measurement therefore runs in a fresh child: swa-bench re-executes
//! itself ([`std::env::current_exe`]) with the hidden [`PROBE_COMMAND`], which builds the network, trains
//! a few steps through [`TrainingStep`] (swa-models' own `sgd_step`, the trainer's step) and prints its
//! resident set before building the network and its peak ([`PeakRss::line`]); PyTorch's side is
//! `torch_ref.py peak`, which prints the same line from its own `/proc/self/status` after the same steps.
//!
//! Both sides read `VmHWM`, the peak of the process's own address space, which starts afresh at `exec`.
//! `getrusage`'s `ru_maxrss` would not do: Linux carries the peak of the address space an `exec`
//! replaces into it, so a child spawned by this process (whose peak includes the networks it trained)
//! would report the benchmark's peak rather than its own.

use std::path::PathBuf;
use std::process::Command;

use swa_core::CpuBackend;
use swa_models::Architecture;

use crate::workload::{image_side, random_batch_of_side, TrainingStep};
use crate::{BenchError, CLASSES};

/// The hidden subcommand under which swa-bench measures its own training's peak memory in a child.
pub const PROBE_COMMAND: &str = "peak-memory-probe";

/// The key of the resident set before the network is built, in a probe's output (KiB).
const START_KEY: &str = "start_rss_kib";
/// The key of the peak resident set, in a probe's output (KiB).
const PEAK_KEY: &str = "peak_rss_kib";

/// Errors measuring peak memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `/proc/self/status` could not be read (peak memory is measured on Linux only).
    #[error("reading /proc/self/status (peak memory is measured on Linux only): {0}")]
    Status(std::io::Error),
    /// `/proc/self/status` held no such field.
    #[error("/proc/self/status has no {0} field")]
    MissingField(&'static str),
    /// The path of the running executable, which the probe re-executes, is unknown.
    #[error("finding swa-bench's own executable to measure its memory in a child: {0}")]
    OwnExecutable(std::io::Error),
    /// The child could not be started.
    #[error("starting `{command}`: {source}")]
    Start {
        /// The command line.
        command: String,
        /// Why it did not start.
        source: std::io::Error,
    },
    /// The child exited with an error.
    #[error("`{command}` exited with {status}: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
    /// The child's output held no `start_rss_kib=… peak_rss_kib=…` line.
    #[error(
        "`{command}` printed no \"{START_KEY}=N {PEAK_KEY}=N\" line; its output was: {output:?}"
    )]
    NoFigure {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
}

/// A training process's resident memory, in KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeakRss {
    /// The resident set before the network was built: the runtime, its libraries and the allocator.
    pub start_kib: u64,
    /// The peak resident set over the whole process, training included.
    pub peak_kib: u64,
}

impl PeakRss {
    /// The line a probe prints, which [`PeakRss::parse`] reads back.
    pub fn line(&self) -> String {
        format!(
            "{START_KEY}={} {PEAK_KEY}={}",
            self.start_kib, self.peak_kib
        )
    }

    /// The figures of the last line of `output` that holds both keys (`start_rss_kib=N peak_rss_kib=N`,
    /// other words around them allowed), so that warnings printed before it do not matter.
    pub fn parse(output: &str) -> Option<PeakRss> {
        output.lines().rev().find_map(|line| {
            let value = |key: &str| {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            Some(PeakRss {
                start_kib: value(START_KEY)?,
                peak_kib: value(PEAK_KEY)?,
            })
        })
    }

    /// The peak in MiB.
    pub fn peak_mib(&self) -> f64 {
        kib_to_mib(self.peak_kib)
    }

    /// What training added to the resident set before the network was built, in MiB.
    pub fn growth_mib(&self) -> f64 {
        kib_to_mib(self.peak_kib.saturating_sub(self.start_kib))
    }
}

/// KiB to MiB.
pub fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The value in KiB of the field `name` (`VmHWM`, `VmRSS`) of a `/proc/<pid>/status` text, whose lines
/// read `VmHWM:     123456 kB`.
pub fn status_field_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let (key, rest) = line.split_once(':')?;
        if key.trim() != name {
            return None;
        }
        let mut words = rest.split_whitespace();
        let value = words.next()?.parse::<u64>().ok()?;
        // The kernel prints these fields in kB (meaning KiB); refuse any other unit rather than misread.
        (words.next() == Some("kB")).then_some(value)
    })
}

/// This process's current (`VmRSS`) or peak (`VmHWM`) resident set in KiB.
fn own_status_kib(field: &'static str) -> Result<u64, MemoryError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(MemoryError::Status)?;
    status_field_kib(&status, field).ok_or(MemoryError::MissingField(field))
}

/// What a probe trains: the network, the batch and the steps (the first included, which allocates the
/// optimiser's momentum), with the threads of the measuring run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeRequest {
    /// The network, built for [`CLASSES`] classes.
    pub network: Architecture,
    /// Images per batch.
    pub batch: usize,
    /// Training steps.
    pub steps: usize,
    /// Backend threads.
    pub threads: usize,
}

impl ProbeRequest {
    /// The arguments after the executable that make swa-bench run this probe
    /// (`peak-memory-probe --network N --batch B --steps S --threads T`).
    pub fn args(&self) -> Vec<String> {
        vec![
            PROBE_COMMAND.into(),
            "--network".into(),
            self.network.to_string(),
            "--batch".into(),
            self.batch.to_string(),
            "--steps".into(),
            self.steps.to_string(),
            "--threads".into(),
            self.threads.to_string(),
        ]
    }
}

/// Runs a probe in this process (the child's side): reads the resident set, builds the network, trains
/// `request.steps` steps on one random batch through [`TrainingStep`] and reads the peak. The caller
/// prints [`PeakRss::line`].
pub fn probe_this_process(request: &ProbeRequest) -> Result<PeakRss, BenchError> {
    let start_kib = own_status_kib("VmRSS")?;
    let backend = CpuBackend::with_threads(request.threads.max(1));
    let mut trainer = TrainingStep::new(request.network.build(&backend, CLASSES, 0)?);
    let batch = random_batch_of_side(request.batch, image_side(request.network), CLASSES, 11);
    for _ in 0..request.steps.max(1) {
        trainer.run(&backend, &batch)?;
    }
    let peak_kib = own_status_kib("VmHWM")?;
    Ok(PeakRss {
        start_kib,
        peak_kib,
    })
}

/// Measures swa-rs's training memory in children of this executable, one per [`SelfProbe::measure`].
#[derive(Clone, Debug)]
pub struct SelfProbe {
    /// The executable to re-execute: this one.
    pub executable: PathBuf,
    /// Training steps per probe.
    pub steps: usize,
    /// Backend threads of the probe.
    pub threads: usize,
}

impl SelfProbe {
    /// A probe re-executing the running swa-bench.
    pub fn current(steps: usize, threads: usize) -> Result<Self, MemoryError> {
        Ok(SelfProbe {
            executable: std::env::current_exe().map_err(MemoryError::OwnExecutable)?,
            steps,
            threads,
        })
    }

    /// The resident memory of a child training `network` at `batch`.
    pub fn measure(&self, network: Architecture, batch: usize) -> Result<PeakRss, MemoryError> {
        let args = ProbeRequest {
            network,
            batch,
            steps: self.steps,
            threads: self.threads,
        }
        .args();
        let command = format!("{} {}", self.executable.display(), args.join(" "));
        let output = Command::new(&self.executable)
            .args(&args)
            .output()
            .map_err(|source| MemoryError::Start {
                command: command.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(MemoryError::Failed {
                command,
                status: output.status.to_string(),
                stderr: last_lines(&String::from_utf8_lossy(&output.stderr), 5),
            });
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        PeakRss::parse(&stdout).ok_or_else(|| MemoryError::NoFigure {
            command,
            output: stdout.trim().to_string(),
        })
    }
}

/// The last `n` lines of `text`, joined by newlines.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tswa-bench\nVmPeak:\t 1234567 kB\nVmSize:\t  999999 kB\n\
                          VmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t3\n";

    #[test]
    fn status_fields_are_read_by_their_exact_name() {
        assert_eq!(status_field_kib(STATUS, "VmHWM"), Some(204_800));
        assert_eq!(status_field_kib(STATUS, "VmRSS"), Some(102_400));
        // VmPeak is the peak of the address space, not of the resident set: not to be confused.
        assert_eq!(status_field_kib(STATUS, "VmPeak"), Some(1_234_567));
        assert_eq!(status_field_kib(STATUS, "VmSwap"), None);
        // A field without the kB unit (a count) is not a memory figure.
        assert_eq!(status_field_kib(STATUS, "Threads"), None);
    }

    #[test]
    fn a_probe_line_reads_back_whatever_surrounds_it() {
        let rss = PeakRss {
            start_kib: 5_120,
            peak_kib: 307_200,
        };
        assert_eq!(PeakRss::parse(&rss.line()), Some(rss));
        let torch = "UserWarning: something\n\
                     preresnet20 batch 128 x3: start_rss_kib=400000 peak_rss_kib=650000\n";
        assert_eq!(
            PeakRss::parse(torch),
            Some(PeakRss {
                start_kib: 400_000,
                peak_kib: 650_000
            })
        );
        assert_eq!(PeakRss::parse("peak_rss_kib=10\n"), None);
        assert_eq!(PeakRss::parse("start_rss_kib=1 peak_rss_kib=lots"), None);
        assert_eq!(PeakRss::parse(""), None);
    }

    #[test]
    fn peaks_convert_to_mib_and_growth_never_goes_negative() {
        let rss = PeakRss {
            start_kib: 1024,
            peak_kib: 3 * 1024 + 512,
        };
        assert_eq!(rss.peak_mib(), 3.5);
        assert_eq!(rss.growth_mib(), 2.5);
        let odd = PeakRss {
            start_kib: 10,
            peak_kib: 5,
        };
        assert_eq!(odd.growth_mib(), 0.0);
    }

    #[test]
    fn probe_arguments_name_the_hidden_command_first() {
        let args = ProbeRequest {
            network: Architecture::PreResNet { depth: 20 },
            batch: 64,
            steps: 3,
            threads: 2,
        }
        .args();
        assert_eq!(
            args,
            [
                "peak-memory-probe",
                "--network",
                "preresnet20",
                "--batch",
                "64",
                "--steps",
                "3",
                "--threads",
                "2"
            ]
        );
    }

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
        assert_eq!(last_lines("", 3), "");
    }

    #[test]
    fn this_process_reports_a_peak_at_least_its_current_set() -> Result<(), MemoryError> {
        if !std::path::Path::new("/proc/self/status").exists() {
            return Ok(());
        }
        let now = own_status_kib("VmRSS")?;
        let peak = own_status_kib("VmHWM")?;
        assert!(now > 0);
        assert!(peak >= now);
        Ok(())
    }
}
