//! The two data sets, their two official layouts and the names of their files.

use std::fmt;

/// Side of an image in pixels.
pub const IMAGE_SIDE: usize = 32;
/// Colour channels per image.
pub const CHANNELS: usize = 3;
/// Bytes per image: three 32×32 planes (red, green, blue), each row-major.
pub const IMAGE_BYTES: usize = CHANNELS * IMAGE_SIDE * IMAGE_SIDE;

/// Which data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    /// CIFAR-10: 10 classes.
    Cifar10,
    /// CIFAR-100: 100 fine classes grouped into 20 coarse ones.
    Cifar100,
}

impl DatasetKind {
    /// Both data sets.
    pub const ALL: [DatasetKind; 2] = [DatasetKind::Cifar10, DatasetKind::Cifar100];

    /// The name people use ("CIFAR-10").
    pub fn display_name(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => "CIFAR-10",
            DatasetKind::Cifar100 => "CIFAR-100",
        }
    }

    /// The name on the command line ("cifar10").
    pub fn cli_name(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
        }
    }

    /// Number of (fine) classes of the official set.
    pub fn official_classes(self) -> usize {
        match self {
            DatasetKind::Cifar10 => 10,
            DatasetKind::Cifar100 => 100,
        }
    }

    /// Number of coarse classes of the official set (CIFAR-100 only).
    pub fn official_coarse_classes(self) -> Option<usize> {
        match self {
            DatasetKind::Cifar10 => None,
            DatasetKind::Cifar100 => Some(20),
        }
    }

    /// Images of the official set in a split.
    pub fn official_split_len(self, split: Split) -> usize {
        match split {
            Split::Train => 50_000,
            Split::Test => 10_000,
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.display_name())
    }
}

/// Which of the two official file layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Fixed-size binary records (`*.bin`) plus class names as text.
    Binary,
    /// Python-pickled dictionaries holding numpy arrays.
    Python,
}

/// How the files are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Packaging {
    /// The extracted folder (`cifar-10-batches-bin`, …).
    Folder,
    /// The official `.tar.gz` archive.
    Archive,
}

/// Training or test images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training split (50,000 images in the official sets).
    Train,
    /// The test split (10,000 images in the official sets).
    Test,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

/// The official file names of one data set in one layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfficialFiles {
    /// Data set.
    pub kind: DatasetKind,
    /// Layout.
    pub layout: Layout,
}

impl OfficialFiles {
    /// The files of `kind` in `layout`.
    pub fn new(kind: DatasetKind, layout: Layout) -> Self {
        OfficialFiles { kind, layout }
    }

    /// Name of the extracted folder, which is also the archive's top-level folder.
    pub fn folder(&self) -> &'static str {
        match (self.kind, self.layout) {
            (DatasetKind::Cifar10, Layout::Binary) => "cifar-10-batches-bin",
            (DatasetKind::Cifar10, Layout::Python) => "cifar-10-batches-py",
            (DatasetKind::Cifar100, Layout::Binary) => "cifar-100-binary",
            (DatasetKind::Cifar100, Layout::Python) => "cifar-100-python",
        }
    }

    /// File name of the official archive.
    pub fn archive(&self) -> &'static str {
        match (self.kind, self.layout) {
            (DatasetKind::Cifar10, Layout::Binary) => "cifar-10-binary.tar.gz",
            (DatasetKind::Cifar10, Layout::Python) => "cifar-10-python.tar.gz",
            (DatasetKind::Cifar100, Layout::Binary) => "cifar-100-binary.tar.gz",
            (DatasetKind::Cifar100, Layout::Python) => "cifar-100-python.tar.gz",
        }
    }

    /// MD5 (hex) of the official archive.
    pub fn archive_md5(&self) -> &'static str {
        match (self.kind, self.layout) {
            (DatasetKind::Cifar10, Layout::Binary) => "c32a1d4ab5d03f1284b67883e8d87530",
            (DatasetKind::Cifar10, Layout::Python) => "c58f30108f718f92721af3b95e74349a",
            (DatasetKind::Cifar100, Layout::Binary) => "03b5dce01913d631647c71ecec9e9cb8",
            (DatasetKind::Cifar100, Layout::Python) => "eb9058c3a382ffc7106e4002c42a8d85",
        }
    }

    /// Files holding the images of a split, in order.
    pub fn split_files(&self, split: Split) -> &'static [&'static str] {
        match (self.kind, self.layout, split) {
            (DatasetKind::Cifar10, Layout::Binary, Split::Train) => &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            (DatasetKind::Cifar10, Layout::Binary, Split::Test) => &["test_batch.bin"],
            (DatasetKind::Cifar10, Layout::Python, Split::Train) => &[
                "data_batch_1",
                "data_batch_2",
                "data_batch_3",
                "data_batch_4",
                "data_batch_5",
            ],
            (DatasetKind::Cifar10, Layout::Python, Split::Test) => &["test_batch"],
            (DatasetKind::Cifar100, Layout::Binary, Split::Train) => &["train.bin"],
            (DatasetKind::Cifar100, Layout::Binary, Split::Test) => &["test.bin"],
            (DatasetKind::Cifar100, Layout::Python, Split::Train) => &["train"],
            (DatasetKind::Cifar100, Layout::Python, Split::Test) => &["test"],
        }
    }

    /// Files holding class names: for the binary layout the fine (or only) names file first, then
    /// the coarse one; for the python layout the single metadata pickle.
    pub fn meta_files(&self) -> &'static [&'static str] {
        match (self.kind, self.layout) {
            (DatasetKind::Cifar10, Layout::Binary) => &["batches.meta.txt"],
            (DatasetKind::Cifar10, Layout::Python) => &["batches.meta"],
            (DatasetKind::Cifar100, Layout::Binary) => {
                &["fine_label_names.txt", "coarse_label_names.txt"]
            }
            (DatasetKind::Cifar100, Layout::Python) => &["meta"],
        }
    }

    /// Every file the layout needs.
    pub fn all_files(&self) -> Vec<&'static str> {
        let mut files: Vec<&'static str> = self.split_files(Split::Train).to_vec();
        files.extend_from_slice(self.split_files(Split::Test));
        files.extend_from_slice(self.meta_files());
        files
    }

    /// Bytes per record in the binary layout (labels then pixels).
    pub fn record_len(&self) -> usize {
        self.label_bytes() + IMAGE_BYTES
    }

    /// Label bytes at the start of each binary record (1 for CIFAR-10, coarse then fine for CIFAR-100).
    pub fn label_bytes(&self) -> usize {
        match self.kind {
            DatasetKind::Cifar10 => 1,
            DatasetKind::Cifar100 => 2,
        }
    }
}

/// The official MD5 (hex) of a file of the extracted CIFAR-10 binary folder, where known.
///
/// These are the digests of the members of the official `cifar-10-binary.tar.gz`.
pub fn known_file_md5(kind: DatasetKind, layout: Layout, file_name: &str) -> Option<&'static str> {
    match (kind, layout, file_name) {
        (DatasetKind::Cifar10, Layout::Binary, "data_batch_1.bin") => {
            Some("5dd7e06a14cb22eb9f671a540d1b7c25")
        }
        (DatasetKind::Cifar10, Layout::Binary, "data_batch_2.bin") => {
            Some("5ea93a67294ea407fff1d09f752e9692")
        }
        (DatasetKind::Cifar10, Layout::Binary, "data_batch_3.bin") => {
            Some("942cd6a4bcdd0dd3c604fbe906cb4421")
        }
        (DatasetKind::Cifar10, Layout::Binary, "data_batch_4.bin") => {
            Some("ae636b3ba5c66a11e91e8cb52e771fcb")
        }
        (DatasetKind::Cifar10, Layout::Binary, "data_batch_5.bin") => {
            Some("53f37980c15c3d472c316c40844f3f0d")
        }
        (DatasetKind::Cifar10, Layout::Binary, "test_batch.bin") => {
            Some("803d5f7f4d78ea53de84dbe85f74fb6d")
        }
        _ => None,
    }
}
