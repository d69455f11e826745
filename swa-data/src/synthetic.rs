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
use crate::pickle::{self, U8Matrix, Value};

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
    let files = encode(spec, &splits)?;
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
pub fn encode(spec: &SyntheticSpec, splits: &CifarSplits) -> Result<Vec<(&'static str, Vec<u8>)>> {
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
                    let file_names = range
                        .clone()
                        .map(|i| format!("synthetic_{}_{i:05}.png", dataset.split()))
                        .collect::<Vec<_>>();
                    let mut entries = vec![
                        ("batch_label", Value::Bytes(batch_label.into_bytes())),
                        ("filenames", byte_strings(&file_names)),
                    ];
                    match coarse {
                        None => entries.push(("labels", ints(labels))),
                        Some(coarse) => entries.extend([
                            ("fine_labels", ints(labels)),
                            ("coarse_labels", ints(coarse)),
                        ]),
                    }
                    let data = U8Matrix {
                        rows: count,
                        cols: IMAGE_BYTES,
                        data: images,
                    };
                    pickle::write_dict(entries, Some(("data", data))).map_err(|source| {
                        DataError::Pickle {
                            file: PathBuf::from(name),
                            source,
                        }
                    })?
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
        (Layout::Python, coarse) => {
            let per_batch = splits.train.len() / official.split_files(Split::Train).len().max(1);
            let entries = match coarse {
                None => vec![
                    ("num_cases_per_batch", Value::I64(per_batch as i64)),
                    ("label_names", byte_strings(names)),
                    ("num_vis", Value::I64(IMAGE_BYTES as i64)),
                ],
                Some(coarse) => vec![
                    ("fine_label_names", byte_strings(names)),
                    ("coarse_label_names", byte_strings(coarse)),
                ],
            };
            let bytes = pickle::write_dict(entries, None).map_err(|source| DataError::Pickle {
                file: PathBuf::from(meta[0]),
                source,
            })?;
            files.push((meta[0], bytes));
        }
    }
    Ok(files)
}

/// A pickled list of ints.
fn ints(values: &[u32]) -> Value {
    Value::List(values.iter().map(|&v| Value::I64(i64::from(v))).collect())
}

/// A pickled list of byte strings, as Python 2 wrote names.
fn byte_strings(names: &[String]) -> Value {
    Value::List(
        names
            .iter()
            .map(|name| Value::Bytes(name.as_bytes().to_vec()))
            .collect(),
    )
}

/// File format of the images of a synthetic ImageFolder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFileFormat {
    /// Every image a `.jpg` (baseline JPEG, quality 90).
    Jpeg,
    /// Every image a `.png`.
    Png,
    /// JPEG and PNG alternately, starting with JPEG.
    Mixed,
}

/// What [`write_image_folder`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageFolderSpec {
    /// Number of classes (sub-folders `class_000`, `class_001`, …), at least 1.
    pub classes: usize,
    /// Images per class.
    pub images_per_class: usize,
    /// Width of every image in pixels, at least 1.
    pub width: u32,
    /// Height of every image in pixels, at least 1.
    pub height: u32,
    /// File format.
    pub format: ImageFileFormat,
    /// Seed of the pixels.
    pub seed: u64,
}

impl ImageFolderSpec {
    /// `classes` × `images_per_class` JPEGs of `width × height`.
    pub fn jpeg(classes: usize, images_per_class: usize, width: u32, height: u32) -> Self {
        ImageFolderSpec {
            classes,
            images_per_class,
            width,
            height,
            format: ImageFileFormat::Jpeg,
            seed: 0,
        }
    }
}

/// Writes a synthetic ImageFolder into `dir` (created if needed): `dir/class_NNN/image_NNNN.jpg`
/// (or `.png`). Each class has its own colour and stripe direction under seeded noise, so a
/// network can tell the classes apart. Returns the paths written, class by class.
pub fn write_image_folder(spec: &ImageFolderSpec, dir: &Path) -> Result<Vec<PathBuf>> {
    if spec.classes == 0 || spec.width == 0 || spec.height == 0 {
        return Err(DataError::InvalidConfig(format!(
            "synthetic ImageFolder: {} classes of {}×{} images, expected at least 1 class and 1×1",
            spec.classes, spec.width, spec.height
        )));
    }
    let mut written = Vec::with_capacity(spec.classes * spec.images_per_class);
    for class in 0..spec.classes {
        let folder = dir.join(format!("class_{class:03}"));
        std::fs::create_dir_all(&folder).map_err(|e| DataError::io("creating", &folder, e))?;
        // A colour per class spread around the hue circle, and a stripe orientation.
        let hue = class as f32 / spec.classes as f32;
        let base = [
            0.5 + 0.4 * (std::f32::consts::TAU * hue).cos(),
            0.5 + 0.4 * (std::f32::consts::TAU * (hue + 1.0 / 3.0)).cos(),
            0.5 + 0.4 * (std::f32::consts::TAU * (hue + 2.0 / 3.0)).cos(),
        ];
        let vertical = class % 2 == 0;
        for index in 0..spec.images_per_class {
            let mut rng = ChaCha8Rng::seed_from_u64(swa_core::seed::fold_words(
                spec.seed,
                &[class as u64, index as u64],
            ));
            let period = rng.random_range(4.0f32..12.0);
            let image = image::RgbImage::from_fn(spec.width, spec.height, |x, y| {
                let along = if vertical { x } else { y } as f32;
                let stripe = 0.15 * (std::f32::consts::TAU * along / period).sin();
                image::Rgb(base.map(|c| {
                    let noise = rng.random_range(-0.1f32..0.1);
                    ((c + stripe + noise).clamp(0.0, 1.0) * 255.0).round() as u8
                }))
            });
            let (format, extension) = match (spec.format, index % 2) {
                (ImageFileFormat::Jpeg, _) | (ImageFileFormat::Mixed, 0) => {
                    (image::ImageFormat::Jpeg, "jpg")
                }
                (ImageFileFormat::Png, _) | (ImageFileFormat::Mixed, _) => {
                    (image::ImageFormat::Png, "png")
                }
            };
            let path = folder.join(format!("image_{index:04}.{extension}"));
            let mut bytes = std::io::Cursor::new(Vec::new());
            let encoded = match format {
                image::ImageFormat::Jpeg => {
                    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY)
                        .encode_image(&image)
                }
                _ => image.write_to(&mut bytes, format),
            };
            encoded.map_err(|source| DataError::ImageEncode {
                file: path.clone(),
                source,
            })?;
            std::fs::write(&path, bytes.into_inner())
                .map_err(|e| DataError::io("writing", &path, e))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Quality of synthetic JPEGs: ImageNet's files are mostly of quality 90 or more.
const JPEG_QUALITY: u8 = 90;
