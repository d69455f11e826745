//! The one error type of this crate: every variant names the file (or URL) and what was expected.

use std::path::PathBuf;

use crate::layout::{DatasetKind, Layout, OfficialFiles};
use crate::pickle::PickleError;

/// Everything that can go wrong while finding, downloading, reading or batching CIFAR data or an
/// ImageFolder.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("reading", "creating", …).
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A binary file ends inside a record.
    #[error(
        "{file}: truncated: record {record} starts at byte offset {offset} but only {available} of \
         its {record_len} bytes are present (file is {file_len} bytes; expected a multiple of {record_len})"
    )]
    Truncated {
        /// The file.
        file: PathBuf,
        /// Index of the incomplete record.
        record: usize,
        /// Byte offset of the incomplete record.
        offset: u64,
        /// Bytes of that record present.
        available: usize,
        /// Bytes a record must have.
        record_len: usize,
        /// Size of the file.
        file_len: u64,
    },

    /// A file has a size other than the one its layout requires.
    #[error("{file}: wrong size: {actual} bytes, expected {expected}")]
    WrongSize {
        /// The file.
        file: PathBuf,
        /// The size the layout requires.
        expected: String,
        /// The size found.
        actual: u64,
    },

    /// A label is not below the number of class names.
    #[error(
        "{file}: record {record} (byte offset {offset}): {which} label {label} out of range, expected 0..{classes}"
    )]
    LabelOutOfRange {
        /// The file.
        file: PathBuf,
        /// Index of the record (image).
        record: usize,
        /// Byte offset of the label within the file (for pickles: of the label list's owner, 0).
        offset: u64,
        /// "fine", "coarse" or "class".
        which: &'static str,
        /// The label found.
        label: i64,
        /// Number of classes.
        classes: usize,
    },

    /// A file's MD5 differs from the known one.
    #[error("{file}: MD5 checksum mismatch: got {actual}, expected {expected}")]
    ChecksumMismatch {
        /// The file.
        file: PathBuf,
        /// The known MD5 (hex).
        expected: String,
        /// The MD5 computed (hex).
        actual: String,
    },

    /// A pickle stream could not be decoded.
    #[error("{file}: {source}")]
    Pickle {
        /// The file.
        file: PathBuf,
        /// What went wrong, with its byte offset.
        #[source]
        source: PickleError,
    },

    /// A pickle decoded but does not have the structure of a CIFAR batch.
    #[error("{file}: field '{field}': expected {expected}, found {found}")]
    PickleStructure {
        /// The file.
        file: PathBuf,
        /// The dictionary key concerned.
        field: String,
        /// What the CIFAR layout requires.
        expected: String,
        /// What the file holds.
        found: String,
    },

    /// Two parts of one split disagree in length (e.g. images and labels).
    #[error("{file}: {what}: {actual}, expected {expected}")]
    CountMismatch {
        /// The file.
        file: PathBuf,
        /// What was counted.
        what: String,
        /// The count required.
        expected: usize,
        /// The count found.
        actual: usize,
    },

    /// A class-name list is unusable.
    #[error("{file}: class names: {message}")]
    ClassNames {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A `.tar.gz` archive is corrupt.
    #[error("{archive}: corrupt archive: {message}")]
    Archive {
        /// The archive.
        archive: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A `.tar.gz` archive lacks a member the layout requires.
    #[error("{archive}: missing member '{member}'")]
    MissingMember {
        /// The archive.
        archive: PathBuf,
        /// The member's path inside the archive.
        member: String,
    },

    /// No CIFAR data set was recognised at a path.
    #[error("{path}: no CIFAR data found: {expected}")]
    NotFound {
        /// The path searched.
        path: PathBuf,
        /// What would have been recognised.
        expected: String,
    },

    /// A download failed; nothing partial was left behind.
    #[error("downloading {url}: {message}")]
    Download {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },

    /// The data are not present locally and could not be downloaded.
    #[error("{0}")]
    Unavailable(Box<Unavailable>),

    /// No cache folder: neither `$SWA_DATA_DIR` nor a platform cache folder exists.
    #[error("no data folder: set SWA_DATA_DIR (no platform cache folder is known on this system)")]
    NoDataDir,

    /// A batch configuration is unusable.
    #[error("batch configuration: {0}")]
    InvalidConfig(String),

    /// A folder does not have the ImageFolder layout (one sub-folder of images per class).
    #[error("{path}: not an ImageFolder: {problem}; expected one sub-folder per class holding image files")]
    NotImageFolder {
        /// The folder.
        path: PathBuf,
        /// What was found instead.
        problem: String,
    },

    /// A class folder of an ImageFolder holds no image file.
    #[error(
        "{folder}: class '{class}' holds no image file (searched recursively for names ending in {extensions})"
    )]
    EmptyClass {
        /// The class folder.
        folder: PathBuf,
        /// The class name (the folder's name).
        class: String,
        /// The extensions searched for, comma-separated.
        extensions: String,
    },

    /// An image file could not be decoded (corrupt, truncated, or neither JPEG nor PNG).
    #[error("{file}: cannot decode image (expected a complete JPEG or PNG file): {source}")]
    Image {
        /// The file.
        file: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },

    /// An image could not be encoded (writing a synthetic ImageFolder).
    #[error("{file}: cannot encode image: {source}")]
    ImageEncode {
        /// The file being written.
        file: PathBuf,
        /// The encoder's error.
        #[source]
        source: image::ImageError,
    },

    /// The worker threads decoding images could not be started.
    #[error("starting {threads} image decoding threads: {source}")]
    ThreadPool {
        /// Threads requested.
        threads: usize,
        /// Why they could not be started.
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
}

impl DataError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// This crate's result type.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Details of [`DataError::Unavailable`]: where the data were looked for and how to provide them.
#[derive(Debug)]
pub struct Unavailable {
    /// The data set.
    pub kind: DatasetKind,
    /// The folder searched and downloaded into.
    pub dir: PathBuf,
    /// The URL tried.
    pub url: String,
    /// Why the download failed.
    pub reason: String,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files = OfficialFiles::new(self.kind, Layout::Binary);
        let dir = self.dir.display();
        write!(
            f,
            "{} is not in {dir} and could not be downloaded from {} ({}). Put the official archive {} \
             (or its extracted folder {}) into {dir}, then verify it with \
             `cargo xtask data check {} --data {dir}`",
            self.kind.display_name(),
            self.url,
            self.reason,
            files.archive(),
            files.folder(),
            self.kind.cli_name(),
        )
    }
}
