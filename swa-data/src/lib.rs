//! # swa-data
//!
//! CIFAR-10 and CIFAR-100 from their official files, and image folders in torchvision's ImageFolder
//! layout, for Stochastic Weight Averaging experiments:
//!
//! - **Readers** for both official layouts — binary records (`cifar-10-batches-bin`,
//!   `cifar-100-binary`) and python pickles (`cifar-10-batches-py`, `cifar-100-python`) — from the
//!   extracted folder or straight from the official `.tar.gz`, recognised automatically
//!   ([`load`], [`detect`]). Pickles are decoded by the `serde-pickle` crate, which never executes
//!   what a stream names; only numpy's array state is decoded here ([`pickle`]).
//! - **Download** of the official archives into a cache folder, MD5-checked and written
//!   atomically ([`ensure_available`]).
//! - **Verification** against the official data set: checksums, counts, channel means ([`mod@check`]).
//! - **Batches** for training and evaluation: seeded shuffling, the random crop and flip of the
//!   original SWA code, normalisation, prefetched on a worker thread ([`Batches`]).
//! - **ImageFolder data sets** (torchvision's layout: one sub-folder per class) of JPEG and PNG
//!   files ([`ImageFolder`]), decoded and transformed with torchvision's ImageNet training and
//!   evaluation transforms in parallel worker threads into the same batches ([`FolderBatches`],
//!   [`transform`]).
//! - **Synthetic data sets** written in the official layouts, and synthetic ImageFolders
//!   ([`synthetic`]).
//!
//! It knows nothing of models or tensors: batches are plain `Vec<f32>` in NCHW order. Bad input
//! gives a [`DataError`] naming the file, the record or offset, and what was expected.
//!
//! ```
//! use std::sync::Arc;
//! use swa_data::{synthetic, BatchConfig, Batches, DatasetKind, Layout, Normalization, Packaging};
//!
//! # fn main() -> Result<(), swa_data::DataError> {
//! let dir = tempfile::tempdir().map_err(|e| swa_data::DataError::InvalidConfig(e.to_string()))?;
//! // A small CIFAR-10 in the official binary archive layout.
//! synthetic::write(DatasetKind::Cifar10, Layout::Binary, Packaging::Archive, dir.path(), 20, 7)?;
//!
//! let data = swa_data::load(dir.path())?;
//! assert_eq!(data.train.len(), 20);
//! assert_eq!(data.train.num_classes(), 10);
//!
//! let batches = Batches::new(
//!     Arc::new(data.train),
//!     BatchConfig::train(8, Normalization::CifarStats, 1),
//! )?;
//! let shapes: Vec<[usize; 4]> = batches.epoch(0).map(|batch| batch.shape()).collect();
//! assert_eq!(shapes, vec![[8, 3, 32, 32], [8, 3, 32, 32], [4, 3, 32, 32]]);
//! # Ok(())
//! # }
//! ```

pub mod archive;
pub mod batch;
pub mod binary;
pub mod check;
pub mod dataset;
pub mod download;
pub mod error;
pub mod folder;
pub mod folder_batches;
pub mod layout;
pub mod pickle;
pub mod python;
pub mod source;
pub mod synthetic;
pub mod transform;

pub use batch::{
    Augmentation, Batch, BatchConfig, Batches, EpochBatches, Normalization, CROP_PADDING,
};
pub use check::{check, CheckReport, ChecksumStatus};
pub use dataset::{CifarSplits, Dataset, DatasetParts};
pub use download::{
    base_url, default_data_dir, download, download_file, ensure_available, ensure_available_from,
    md5_file, md5_hex, BASE_URL_ENV, DATA_DIR_ENV, DEFAULT_BASE_URL,
};
pub use error::{DataError, Result};
pub use folder::{decode_image, BadImages, ImageFolder, Sample, SkippedImage, IMAGE_EXTENSIONS};
pub use folder_batches::{FolderBatchConfig, FolderBatches, FolderEpoch, FolderTransform};
pub use layout::{
    known_file_md5, DatasetKind, Layout, OfficialFiles, Packaging, Split, CHANNELS, IMAGE_BYTES,
    IMAGE_SIDE,
};
pub use source::{detect, detect_kind, load, load_kind, DataSource};
pub use transform::{CropBox, RandomResizedCrop};
