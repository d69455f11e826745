//! Batches of an [`ImageFolder`]: images decoded and transformed in parallel worker threads, with
//! torchvision's ImageNet training or evaluation transform, into the same NCHW [`Batch`]es as the
//! CIFAR pipeline, prefetched into a bounded queue.
//!
//! The order of an epoch is drawn from `(seed, epoch)` as for CIFAR; the crop and flip of an image
//! from `(seed, epoch, image index)`, so an epoch's batches are bit-identical whatever the number
//! of threads, and a resumed run sees the batches the uninterrupted one saw.

use std::sync::{Arc, Mutex, PoisonError};

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::batch::{mix, Batch, BatchConfig, Normalization, Prefetched};
use crate::error::{DataError, Result};
use crate::folder::{decode_image, BadImages, ImageFolder, SkippedImage};
use crate::layout::CHANNELS;
use crate::transform::{resize_center_crop, resized_crop, RandomResizedCrop};

/// Output sizes and crop ranges of the ImageNet transforms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FolderTransform {
    /// Side of the square images of a batch (224 for ImageNet), training and evaluation.
    pub size: u32,
    /// Evaluation: the shorter side is resized to this before the central crop (256 for ImageNet);
    /// at least `size`.
    pub resize: u32,
    /// Training: the crop sampler (torchvision's ranges by default).
    pub crop: RandomResizedCrop,
    /// Training: mirror left–right with probability ½ after the crop.
    pub flip: bool,
}

impl FolderTransform {
    /// torchvision's ImageNet transforms: `RandomResizedCrop(224)` and `RandomHorizontalFlip()` for
    /// training; `Resize(256)` and `CenterCrop(224)` for evaluation.
    pub const IMAGENET: FolderTransform = FolderTransform {
        size: 224,
        resize: 256,
        crop: RandomResizedCrop::IMAGENET,
        flip: true,
    };

    /// The ImageNet transforms at another output side (e.g. 32 or 64 for tests and small runs),
    /// with the evaluation resize in ImageNet's proportion 256 : 224, rounded.
    pub fn with_size(size: u32) -> Self {
        let resize = (f64::from(size) * 256.0 / 224.0).round() as u32;
        FolderTransform {
            size,
            resize: resize.max(size),
            ..Self::IMAGENET
        }
    }

    fn validate(&self) -> Result<()> {
        if self.size == 0 || self.resize < self.size {
            return Err(DataError::InvalidConfig(format!(
                "image size {} with evaluation resize {}: expected 1 <= size <= resize",
                self.size, self.resize
            )));
        }
        self.crop.validate()
    }
}

/// How to cut an [`ImageFolder`] into batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FolderBatchConfig {
    /// Batch size, order, normalisation, seed and prefetch depth; `augment` selects the training
    /// transform (random resized crop and flip) over the evaluation one (resize, centre crop).
    pub batch: BatchConfig,
    /// Output sizes and crop ranges.
    pub transform: FolderTransform,
    /// Threads decoding and transforming images; `None` uses rayon's global pool (one per core).
    pub workers: Option<usize>,
    /// Fail on a bad image, or leave it out of its batch and report it.
    pub bad_images: BadImages,
}

impl FolderBatchConfig {
    /// torchvision's ImageNet training pipeline: shuffled, `RandomResizedCrop(224)`, flip,
    /// ImageNet normalisation, last partial batch kept.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        FolderBatchConfig {
            batch: BatchConfig::train(batch_size, Normalization::ImageNetStats, seed),
            transform: FolderTransform::IMAGENET,
            workers: None,
            bad_images: BadImages::Fail,
        }
    }

    /// torchvision's ImageNet evaluation pipeline: in order, `Resize(256)`, `CenterCrop(224)`,
    /// ImageNet normalisation.
    pub fn eval(batch_size: usize) -> Self {
        FolderBatchConfig {
            batch: BatchConfig::eval(batch_size, Normalization::ImageNetStats),
            transform: FolderTransform::IMAGENET,
            workers: None,
            bad_images: BadImages::Fail,
        }
    }
}

/// Cuts an [`ImageFolder`] into batches, epoch after epoch.
#[derive(Clone)]
pub struct FolderBatches {
    folder: Arc<ImageFolder>,
    config: FolderBatchConfig,
    tables: Arc<[[f32; 256]; CHANNELS]>,
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl std::fmt::Debug for FolderBatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FolderBatches")
            .field("root", &self.folder.root())
            .field("images", &self.folder.len())
            .field("config", &self.config)
            .finish()
    }
}

impl FolderBatches {
    /// Batches of `folder` under `config`; fails on a zero batch size, an unusable normalisation,
    /// sizes or crop ranges, zero workers, or worker threads that cannot start.
    pub fn new(folder: Arc<ImageFolder>, config: FolderBatchConfig) -> Result<Self> {
        let tables = Arc::new(config.batch.validated_tables()?);
        config.transform.validate()?;
        let pool = match config.workers {
            None => None,
            Some(0) => {
                return Err(DataError::InvalidConfig(
                    "workers is 0, expected at least 1 (or none for one per core)".into(),
                ))
            }
            Some(threads) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("swa-data-decode-{i}"))
                    .build()
                    .map_err(|source| DataError::ThreadPool { threads, source })?,
            )),
        };
        Ok(FolderBatches {
            folder,
            config,
            tables,
            pool,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FolderBatchConfig {
        &self.config
    }

    /// The image folder.
    pub fn folder(&self) -> &Arc<ImageFolder> {
        &self.folder
    }

    /// Batches per epoch (fewer when every image of a batch is skipped).
    pub fn batches_per_epoch(&self) -> usize {
        self.config.batch.batches_per_epoch(self.folder.len())
    }

    /// The order in which `epoch` visits the images.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        self.config.batch.order(self.folder.len(), epoch)
    }

    /// Decodes and transforms image `index` for `epoch` into RGB bytes `size × size` (HWC): the
    /// training transform drawn from `(seed, epoch, index)`, or the evaluation transform. Returns
    /// the image and whether the training transform flips it.
    pub fn transformed_image(&self, epoch: u64, index: usize) -> Result<(RgbImage, bool)> {
        let Some(sample) = self.folder.samples().get(index) else {
            return Err(DataError::InvalidConfig(format!(
                "image index {index} out of range, the folder has {} images",
                self.folder.len()
            )));
        };
        let image = decode_image(&sample.path)?;
        let (width, height) = image.dimensions();
        let transform = &self.config.transform;
        if self.config.batch.augment {
            let mut rng = image_rng(self.config.batch.seed, epoch, index);
            let crop = transform.crop.sample(width, height, &mut rng);
            let flip = transform.flip && rng.random_bool(0.5);
            Ok((resized_crop(&image, crop, transform.size), flip))
        } else {
            Ok((
                resize_center_crop(&image, transform.resize, transform.size),
                false,
            ))
        }
    }

    /// Builds the batch of the images at `indices` (folder indices) for `epoch`, decoding in
    /// parallel. Under [`BadImages::Skip`] a bad image is left out and pushed onto `skipped`;
    /// otherwise the first bad image (in batch order) is the error. Indices past the end are
    /// skipped.
    pub fn make_batch(
        &self,
        epoch: u64,
        indices: &[usize],
        skipped: &mut Vec<SkippedImage>,
    ) -> Result<Batch> {
        let side = self.config.transform.size as usize;
        let image_len = CHANNELS * side * side;
        let indices: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&i| i < self.folder.len())
            .collect();
        let mut images = vec![0f32; indices.len() * image_len];
        let build = |images: &mut Vec<f32>| -> Vec<Result<()>> {
            images
                .par_chunks_mut(image_len)
                .zip(indices.par_iter())
                .map(|(out, &index)| {
                    let (image, flip) = self.transformed_image(epoch, index)?;
                    write_normalised(&image, flip, &self.tables, out);
                    Ok(())
                })
                .collect()
        };
        let outcomes = match &self.pool {
            Some(pool) => pool.install(|| build(&mut images)),
            None => build(&mut images),
        };

        let mut labels = Vec::with_capacity(indices.len());
        let mut kept = 0;
        for (position, (outcome, &index)) in outcomes.into_iter().zip(&indices).enumerate() {
            match (outcome, self.config.bad_images) {
                (Ok(()), _) => {
                    if kept != position {
                        images.copy_within(
                            position * image_len..(position + 1) * image_len,
                            kept * image_len,
                        );
                    }
                    labels.push(self.folder.samples()[index].label);
                    kept += 1;
                }
                (Err(error), BadImages::Fail) => return Err(error),
                (Err(error), BadImages::Skip) => skipped.push(SkippedImage {
                    path: self.folder.samples()[index].path.clone(),
                    error,
                }),
            }
        }
        images.truncate(kept * image_len);
        Ok(Batch {
            images,
            labels,
            height: side,
            width: side,
        })
    }

    /// All batches of `epoch`, built ahead by a worker thread into a queue of
    /// [`BatchConfig::prefetch`] batches. Under [`BadImages::Fail`] a bad image ends the epoch with
    /// its error; under [`BadImages::Skip`] it is left out (a batch whose images are all left out is
    /// not yielded) and listed by [`FolderEpoch::take_skipped`]. Dropping the iterator early stops the
    /// worker.
    pub fn epoch(&self, epoch: u64) -> FolderEpoch {
        let skipped = Arc::new(Mutex::new(Vec::new()));
        let batches = self.clone();
        let worker_skipped = Arc::clone(&skipped);
        FolderEpoch {
            batches: Prefetched::new(
                self.order(epoch),
                self.config.batch.batch_size,
                self.batches_per_epoch(),
                self.config.batch.prefetch,
                move |chunk: &[usize]| {
                    let mut bad = Vec::new();
                    let batch = batches.make_batch(epoch, chunk, &mut bad);
                    lock(&worker_skipped).extend(bad);
                    batch
                },
            ),
            skipped,
        }
    }
}

/// The batches of one epoch of an [`ImageFolder`], in order.
pub struct FolderEpoch {
    batches: Prefetched<Result<Batch>>,
    skipped: Arc<Mutex<Vec<SkippedImage>>>,
}

impl FolderEpoch {
    /// Number of images left out so far this epoch (under [`BadImages::Skip`]).
    pub fn skipped_count(&self) -> usize {
        lock(&self.skipped).len()
    }

    /// Takes the images left out so far this epoch, with their errors, in the order met.
    pub fn take_skipped(&mut self) -> Vec<SkippedImage> {
        std::mem::take(&mut *lock(&self.skipped))
    }
}

impl Iterator for FolderEpoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        loop {
            match self.batches.next()? {
                Ok(batch) if batch.is_empty() => continue,
                item => return Some(item),
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, self.batches.size_hint().1)
    }
}

/// A poisoned lock only means another thread panicked while pushing; the list is still whole.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

const FOLDER_AUGMENT_STREAM: u64 = 0x666f_6c64_6572_2121;

/// The generator of image `index`'s crop and flip in `epoch`.
fn image_rng(seed: u64, epoch: u64, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(seed ^ FOLDER_AUGMENT_STREAM, epoch, index as u64))
}

/// `ToTensor` and `Normalize` of an HWC RGB image into CHW values, mirrored when `flip`.
fn write_normalised(
    image: &RgbImage,
    flip: bool,
    tables: &[[f32; 256]; CHANNELS],
    out: &mut [f32],
) {
    let width = image.width() as usize;
    let plane = width * image.height() as usize;
    for (row, pixels) in image.as_raw().chunks_exact(width * CHANNELS).enumerate() {
        for (col, pixel) in pixels.chunks_exact(CHANNELS).enumerate() {
            let col = if flip { width - 1 - col } else { col };
            for (channel, (&byte, table)) in pixel.iter().zip(tables).enumerate() {
                out[channel * plane + row * width + col] = table[usize::from(byte)];
            }
        }
    }
}
