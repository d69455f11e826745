//! Synthetic data sets written in the exact official layouts, for tests and for checking a
//! pipeline without the real files.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::archive;
use crate::binary;
use crate::dataset::{CifarSplits, Dataset, DatasetParts};
use crate::error::{DataError, Result};
use crate::layout::{DatasetKind, Layout, OfficialFiles, Packaging, Split, IMAGE_BYTES};
use crate::pickle::{PickleWriter, WriteValue};

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticSpec {
    /// Data set (decides file names and record layout).
    pub kind: DatasetKind,
    /// Binary records or python pickles.
    pub layout: Layout,
    /// Extracted folder or `.tar.gz` archive.
    pub packaging: Packaging,
    /// Training images (spread over five files for CIFAR-10).
    pub train_images: usize,
    /// Test images.
    pub test_images: usize,
    /// Number of (fine) classes, 1–256.
    pub classes: usize,
    /// Number of coarse classes for CIFAR-100, 1–256 (ignored for CIFAR-10).
    pub coarse_classes: usize,
    /// Seed of the pixels.
    pub seed: u64,
}

impl SyntheticSpec {
    /// `images_per_split` training and test images with the official class counts.
    pub fn new(
        kind: DatasetKind,
        layout: Layout,
        packaging: Packaging,
        images_per_split: usize,
        seed: u64,
    ) -> Self {
        SyntheticSpec {
            kind,
            layout,
            packaging,
            train_images: images_per_split,
            test_images: images_per_split,
            classes: kind.official_classes(),
            coarse_classes: kind.official_coarse_classes().unwrap_or(1),
            seed,
        }
    }
}

/// Writes a synthetic data set with the official class counts into `dir`; returns the folder or
/// archive written (`dir/cifar-10-batches-bin`, `dir/cifar-100-python.tar.gz`, …).
pub fn write(
    kind: DatasetKind,
    layout: Layout,
    packaging: Packaging,
    dir: &Path,
    images_per_split: usize,
    seed: u64,
) -> Result<PathBuf> {
    write_spec(
        &SyntheticSpec::new(kind, layout, packaging, images_per_split, seed),
        dir,
    )
}

/// The data [`write_spec`] writes for `spec`: image `i` of a split has class `i % classes`
/// (coarse class `class % coarse_classes`) and seeded random pixels.
pub fn generate(spec: &SyntheticSpec) -> Result<CifarSplits> {
    let bad = |message: String| DataError::InvalidConfig(format!("synthetic data set: {message}"));
    if !(1..=256).contains(&spec.classes) {
        return Err(bad(format!("{} classes, expected 1 to 256", spec.classes)));
    }
    if spec.kind == DatasetKind::Cifar100 && !(1..=256).contains(&spec.coarse_classes) {
        return Err(bad(format!(
            "{} coarse classes, expected 1 to 256",
            spec.coarse_classes
        )));
    }
    let class_names: Vec<String> = (0..spec.classes).map(|c| format!("class_{c}")).collect();
    let coarse_names: Option<Vec<String>> = (spec.kind == DatasetKind::Cifar100).then(|| {
        (0..spec.coarse_classes)
            .map(|c| format!("superclass_{c}"))
            .collect()
    });
    let split = |split: Split, count: usize, stream: u64| -> Result<Dataset> {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        rng.set_stream(stream);
        let mut images = vec![0u8; count * IMAGE_BYTES];
        rng.fill(images.as_mut_slice());
        let labels: Vec<u32> = (0..count).map(|i| (i % spec.classes) as u32).collect();
        let coarse_labels = coarse_names.as_ref().map(|_| {
            labels
                .iter()
                .map(|&l| l % spec.coarse_classes as u32)
                .collect()
        });
        Dataset::new(
            spec.kind,
            split,
            DatasetParts {
                images,
                labels,
                coarse_labels,
                class_names: class_names.clone(),
                coarse_class_names: coarse_names.clone(),
            },
            PathBuf::from("<synthetic>"),
        )
    };
    Ok(CifarSplits {
        train: split(Split::Train, spec.train_images, 1)?,
        test: split(Split::Test, spec.test_images, 2)?,
    })
}

/// Writes the data set described by `spec` into `dir`; returns the folder or archive written.
pub fn write_spec(spec: &SyntheticSpec, dir: &Path) -> Result<PathBuf> {
    let splits = generate(spec)?;
    let files = encode(spec, &splits);
    let official = OfficialFiles::new(spec.kind, spec.layout);
    std::fs::create_dir_all(dir).map_err(|e| DataError::io("creating", dir, e))?;
    match spec.packaging {
        Packaging::Folder => {
            let folder = dir.join(official.folder());
            std::fs::create_dir_all(&folder).map_err(|e| DataError::io("creating", &folder, e))?;
            for (name, bytes) in &files {
                let path = folder.join(name);
                std::fs::write(&path, bytes).map_err(|e| DataError::io("writing", &path, e))?;
            }
            Ok(folder)
        }
        Packaging::Archive => {
            let members: Vec<(String, Vec<u8>)> = files
                .into_iter()
                .map(|(name, bytes)| (format!("{}/{name}", official.folder()), bytes))
                .collect();
            archive::write_archive(&dir.join(official.archive()), &members)
        }
    }
}

/// The official files (name, bytes) holding `splits` in `spec`'s layout.
pub fn encode(spec: &SyntheticSpec, splits: &CifarSplits) -> Vec<(&'static str, Vec<u8>)> {
    let official = OfficialFiles::new(spec.kind, spec.layout);
    let mut files = Vec::new();
    for dataset in [&splits.train, &splits.test] {
        let names = official.split_files(dataset.split());
        let total = dataset.len();
        let mut start = 0;
        for (part, name) in names.iter().enumerate() {
            // Earlier files take the remainder, like an even split of the official 50,000.
            let count = total / names.len() + usize::from(part < total % names.len());
            let range = start..start + count;
            start += count;
            let images = &dataset.images()[range.start * IMAGE_BYTES..range.end * IMAGE_BYTES];
            let labels = &dataset.labels()[range.clone()];
            let coarse = dataset.coarse_labels().map(|c| &c[range.clone()]);
            let bytes = match spec.layout {
                Layout::Binary => binary::encode_records(images, labels, coarse),
                Layout::Python => {
                    let batch_label = match dataset.split() {
                        Split::Train if names.len() > 1 => {
                            format!("training batch {} of {}", part + 1, names.len())
                        }
                        Split::Train => "training".to_owned(),
                        Split::Test => "testing batch 1 of 1".to_owned(),
                    };
                    let file_names: Vec<Vec<u8>> = range
                        .clone()
                        .map(|i| format!("synthetic_{}_{i:05}.png", dataset.split()).into_bytes())
                        .collect();
                    let data = WriteValue::U8Matrix {
                        rows: count,
                        cols: IMAGE_BYTES,
                        data: images,
                    };
                    match coarse {
                        None => PickleWriter::dict(&[
                            ("batch_label", WriteValue::Bytes(batch_label.as_bytes())),
                            ("labels", WriteValue::IntList(labels)),
                            ("data", data),
                            ("filenames", WriteValue::BytesList(&file_names)),
                        ]),
                        Some(coarse) => PickleWriter::dict(&[
                            ("filenames", WriteValue::BytesList(&file_names)),
                            ("batch_label", WriteValue::Bytes(batch_label.as_bytes())),
                            ("fine_labels", WriteValue::IntList(labels)),
                            ("coarse_labels", WriteValue::IntList(coarse)),
                            ("data", data),
                        ]),
                    }
                }
            };
            files.push((*name, bytes));
        }
    }
    let text = |names: &[String]| {
        let mut text = names.join("\n");
        text.push('\n');
        text.into_bytes()
    };
    let to_bytes = |names: &[String]| -> Vec<Vec<u8>> {
        names.iter().map(|n| n.clone().into_bytes()).collect()
    };
    let meta = official.meta_files();
    let names = splits.train.class_names();
    match (spec.layout, splits.train.coarse_class_names()) {
        (Layout::Binary, None) => files.push((meta[0], text(names))),
        (Layout::Binary, Some(coarse)) => {
            files.push((meta[0], text(names)));
            if let Some(coarse_file) = meta.get(1) {
                files.push((*coarse_file, text(coarse)));
            }
        }
        (Layout::Python, None) => {
            let per_batch = splits.train.len() / official.split_files(Split::Train).len().max(1);
            files.push((
                meta[0],
                PickleWriter::dict(&[
                    ("num_cases_per_batch", WriteValue::Int(per_batch as u32)),
                    ("label_names", WriteValue::BytesList(&to_bytes(names))),
                    ("num_vis", WriteValue::Int(IMAGE_BYTES as u32)),
                ]),
            ));
        }
        (Layout::Python, Some(coarse)) => files.push((
            meta[0],
            PickleWriter::dict(&[
                ("fine_label_names", WriteValue::BytesList(&to_bytes(names))),
                (
                    "coarse_label_names",
                    WriteValue::BytesList(&to_bytes(coarse)),
                ),
            ]),
        )),
    }
    files
}
