//! Verification of a data set against the official one: files, checksums, counts, channel means.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::download::{md5_file, md5_hex};
use crate::error::{DataError, Result};
use crate::layout::{known_file_md5, DatasetKind, Layout, Packaging, Split, CHANNELS};
use crate::source::{self, DataSource};

/// How a file's MD5 compares with the official one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChecksumStatus {
    /// Equal to the official MD5.
    Match,
    /// Different from the official MD5 (hex).
    Mismatch {
        /// The official MD5.
        expected: String,
    },
    /// No official MD5 is known for this file.
    Unknown,
}

/// One file examined.
#[derive(Debug, Clone)]
pub struct FileCheck {
    /// Its path (for archive members: `ARCHIVE/member`).
    pub path: PathBuf,
    /// Size in bytes.
    pub bytes: u64,
    /// Its MD5 (hex).
    pub md5: String,
    /// Comparison with the official MD5.
    pub checksum: ChecksumStatus,
}

/// Counts and means of one split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSummary {
    /// Which split.
    pub split: Split,
    /// Images read without error.
    pub images: usize,
    /// Images per class.
    pub class_counts: Vec<usize>,
    /// Mean of red, green, blue on the 0–255 scale.
    pub channel_means: [f64; CHANNELS],
}

/// Everything `cargo xtask data check` reports.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Where the data were found.
    pub source: DataSource,
    /// Every file examined (the archive itself first when reading one).
    pub files: Vec<FileCheck>,
    /// Class names.
    pub class_names: Vec<String>,
    /// Per-split counts and means.
    pub splits: Vec<SplitSummary>,
    /// What differs from the official data set, each naming its file; empty when valid.
    pub defects: Vec<String>,
}

impl CheckReport {
    /// Whether no defect was found.
    pub fn is_valid(&self) -> bool {
        self.defects.is_empty()
    }
}

/// Examines the `kind` data set at `path` (any form [`source::detect_kind`] recognises).
///
/// Problems that stop the reading of the whole set (no data found, an archive member or class
/// name file missing) are errors; problems of single files are listed in
/// [`CheckReport::defects`].
pub fn check(kind: DatasetKind, path: &Path) -> Result<CheckReport> {
    let source = source::detect_kind(kind, path)?;
    let files_of_layout = source.files();
    let mut files = Vec::new();
    let mut defects = Vec::new();
    let mut checksum = |path: PathBuf, bytes: u64, md5: String, expected: Option<&str>| {
        let status = match expected {
            Some(expected) if expected == md5 => ChecksumStatus::Match,
            Some(expected) => {
                defects.push(format!(
                    "{}: MD5 {md5} differs from the official {expected}",
                    path.display()
                ));
                ChecksumStatus::Mismatch {
                    expected: expected.to_owned(),
                }
            }
            None => ChecksumStatus::Unknown,
        };
        files.push(FileCheck {
            path,
            bytes,
            md5,
            checksum: status,
        });
    };
    if source.packaging == Packaging::Archive {
        let bytes = std::fs::metadata(&source.path)
            .map(|m| m.len())
            .unwrap_or(0);
        let md5 = md5_file(&source.path)?;
        checksum(
            source.path.clone(),
            bytes,
            md5,
            Some(files_of_layout.archive_md5()),
        );
    }
    let raw = source.read_raw()?;
    for file in &raw {
        checksum(
            file.path.clone(),
            file.bytes.len() as u64,
            md5_hex(&file.bytes),
            known_file_md5(kind, source.layout, file.name),
        );
    }
    let (names, coarse_names) = source::names_from_raw(&source, &raw)?;
    if names.len() != kind.official_classes() {
        defects.push(format!(
            "{}: {} class names, expected {}",
            source.path.join(files_of_layout.meta_files()[0]).display(),
            names.len(),
            kind.official_classes()
        ));
    }
    let coarse_classes = coarse_names.as_ref().map(Vec::len);
    let mut splits = Vec::new();
    for split in [Split::Train, Split::Test] {
        let mut summary = SplitSummary {
            split,
            images: 0,
            class_counts: vec![0; names.len()],
            channel_means: [0.0; CHANNELS],
        };
        let mut sums = [0u64; CHANNELS];
        for name in files_of_layout.split_files(split) {
            let Some(file) = raw.iter().find(|f| f.name == *name) else {
                continue;
            };
            if source.layout == Layout::Binary {
                let records =
                    kind.official_split_len(split) / files_of_layout.split_files(split).len();
                let expected = (records * files_of_layout.record_len()) as u64;
                if file.bytes.len() as u64 != expected {
                    let error = DataError::WrongSize {
                        file: file.path.clone(),
                        expected: format!(
                            "{expected} ({records} records of {} bytes)",
                            files_of_layout.record_len()
                        ),
                        actual: file.bytes.len() as u64,
                    };
                    defects.push(error.to_string());
                }
            }
            match source::parse_file(&source, file, names.len(), coarse_classes) {
                Ok(records) => {
                    summary.images += records.labels.len();
                    for &label in &records.labels {
                        if let Some(count) = summary.class_counts.get_mut(label as usize) {
                            *count += 1;
                        }
                    }
                    for image in records.images.chunks_exact(crate::IMAGE_BYTES) {
                        for (channel, plane) in image.chunks_exact(1024).enumerate() {
                            sums[channel] += plane.iter().map(|&b| u64::from(b)).sum::<u64>();
                        }
                    }
                }
                Err(error) => defects.push(error.to_string()),
            }
        }
        let pixels = (summary.images * 1024).max(1) as f64;
        summary.channel_means = sums.map(|s| s as f64 / pixels);
        let expected = kind.official_split_len(split);
        if summary.images != expected {
            defects.push(format!(
                "{} split: {} images read, expected {expected}",
                split, summary.images
            ));
        }
        let per_class = expected / kind.official_classes();
        let off: Vec<String> = summary
            .class_counts
            .iter()
            .enumerate()
            .filter(|(_, &count)| count != per_class)
            .map(|(class, count)| format!("class {class}: {count}"))
            .collect();
        if !off.is_empty() && names.len() == kind.official_classes() {
            defects.push(format!(
                "{split} split: images per class differ from the official {per_class}: {}",
                off.join(", ")
            ));
        }
        splits.push(summary);
    }
    Ok(CheckReport {
        source,
        files,
        class_names: names,
        splits,
        defects,
    })
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layout = match self.source.layout {
            Layout::Binary => "binary",
            Layout::Python => "python",
        };
        let packaging = match self.source.packaging {
            Packaging::Folder => "folder",
            Packaging::Archive => "archive",
        };
        writeln!(
            f,
            "{} ({layout} layout, {packaging}) at {}",
            self.source.kind,
            self.source.path.display()
        )?;
        writeln!(f, "files:")?;
        for file in &self.files {
            let status = match &file.checksum {
                ChecksumStatus::Match => "MD5 ok (official)".to_owned(),
                ChecksumStatus::Mismatch { expected } => {
                    format!("MD5 MISMATCH (official {expected})")
                }
                ChecksumStatus::Unknown => "MD5 not published".to_owned(),
            };
            writeln!(
                f,
                "  {:<60} {:>11} bytes  {}  {status}",
                file.path.display(),
                file.bytes,
                file.md5
            )?;
        }
        for split in &self.splits {
            writeln!(f, "{} split: {} images", split.split, split.images)?;
            let means = split.channel_means;
            writeln!(
                f,
                "  channel means (0-255): R {:.3}  G {:.3}  B {:.3}",
                means[0], means[1], means[2]
            )?;
            write!(f, "  per class:")?;
            for (class, count) in split.class_counts.iter().enumerate() {
                if class % 5 == 0 {
                    write!(f, "\n   ")?;
                }
                let name = self
                    .class_names
                    .get(class)
                    .map(String::as_str)
                    .unwrap_or("?");
                write!(f, " {class:>3} {name:<14} {count:>6}")?;
            }
            writeln!(f)?;
        }
        if self.defects.is_empty() {
            writeln!(f, "result: valid, no defect found")
        } else {
            writeln!(f, "result: INVALID, {} defect(s):", self.defects.len())?;
            for defect in &self.defects {
                writeln!(f, "  - {defect}")?;
            }
            Ok(())
        }
    }
}
