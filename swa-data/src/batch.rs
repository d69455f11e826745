//! Training and evaluation batches: seeded shuffling, the SWA paper's augmentation, normalisation,
//! and a prefetching worker so batches are ready before the trainer asks.
//!
//! Every random choice is drawn from a generator seeded by `(seed, epoch)` (the order) or
//! `(seed, epoch, image index)` (crop offset and flip), never from a shared stream, so the
//! batches of an epoch are bit-identical whatever the number of threads.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::layout::{CHANNELS, IMAGE_BYTES, IMAGE_SIDE};

/// Zero padding on each side before the random 32×32 crop.
pub const CROP_PADDING: usize = 4;

/// Per-channel mean and standard deviation subtracted and divided after scaling pixels to [0, 1].
///
/// The two constant sets are those of the original SWA code (github.com/timgaripov/swa):
/// `models/preresnet.py` and `models/wide_resnet.py` use
/// `transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))`, and `models/vgg.py`
/// uses `transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalization {
    /// CIFAR statistics, as the original PreResNet and WideResNet transforms use:
    /// mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010).
    CifarStats,
    /// ImageNet statistics, as the original VGG transforms use:
    /// mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
    ImageNetStats,
    /// Pixels scaled to [0, 1] only.
    None,
    /// Any other per-channel mean and std (std must be non-zero).
    Custom {
        /// Mean of red, green, blue on the [0, 1] scale.
        mean: [f32; CHANNELS],
        /// Standard deviation of red, green, blue on the [0, 1] scale.
        std: [f32; CHANNELS],
    },
}

impl Normalization {
    /// `(mean, std)` per channel on the [0, 1] scale.
    pub fn mean_std(&self) -> ([f32; CHANNELS], [f32; CHANNELS]) {
        match *self {
            Normalization::CifarStats => ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
            Normalization::ImageNetStats => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            Normalization::None => ([0.0; CHANNELS], [1.0; CHANNELS]),
            Normalization::Custom { mean, std } => (mean, std),
        }
    }

    /// A 256-entry table per channel: byte value → normalised value, computed as
    /// `(byte / 255 - mean) / std` in f32 like torchvision's `ToTensor` then `Normalize`.
    pub(crate) fn tables(&self) -> [[f32; 256]; CHANNELS] {
        let (mean, std) = self.mean_std();
        let mut tables = [[0f32; 256]; CHANNELS];
        for (channel, table) in tables.iter_mut().enumerate() {
            for (byte, value) in table.iter_mut().enumerate() {
                *value = (byte as f32 / 255.0 - mean[channel]) / std[channel];
            }
        }
        tables
    }
}

/// How to cut a data set into batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchConfig {
    /// Images per batch (≥ 1).
    pub batch_size: usize,
    /// Random crop with zero padding and random horizontal flip.
    pub augment: bool,
    /// A new seeded order each epoch (otherwise the stored order).
    pub shuffle: bool,
    /// Drop the last batch when it has fewer than `batch_size` images.
    pub drop_last: bool,
    /// Per-channel normalisation.
    pub normalization: Normalization,
    /// Seed of the order and the augmentation.
    pub seed: u64,
    /// Batches prepared ahead by the worker thread; 0 builds each batch when asked.
    pub prefetch: usize,
}

impl BatchConfig {
    /// Training batches as in the original SWA code: shuffled, augmented, last partial batch kept
    /// (PyTorch's `DataLoader` default).
    pub fn train(batch_size: usize, normalization: Normalization, seed: u64) -> Self {
        BatchConfig {
            batch_size,
            augment: true,
            shuffle: true,
            drop_last: false,
            normalization,
            seed,
            prefetch: 4,
        }
    }

    /// Evaluation batches: in order, not augmented, all images.
    pub fn eval(batch_size: usize, normalization: Normalization) -> Self {
        BatchConfig {
            batch_size,
            augment: false,
            shuffle: false,
            drop_last: false,
            normalization,
            seed: 0,
            prefetch: 2,
        }
    }
}

impl BatchConfig {
    /// Checks the batch size and the normalisation; returns the normalisation's byte tables.
    pub(crate) fn validated_tables(&self) -> Result<[[f32; 256]; CHANNELS]> {
        if self.batch_size == 0 {
            return Err(DataError::InvalidConfig(
                "batch_size is 0, expected at least 1".into(),
            ));
        }
        let (mean, std) = self.normalization.mean_std();
        if std.iter().chain(&mean).any(|v| !v.is_finite()) || std.contains(&0.0) {
            return Err(DataError::InvalidConfig(format!(
                "normalisation mean {mean:?} std {std:?}: expected finite values and non-zero std"
            )));
        }
        Ok(self.normalization.tables())
    }

    /// Batches per epoch of a data set of `len` images.
    pub(crate) fn batches_per_epoch(&self, len: usize) -> usize {
        if self.drop_last {
            len / self.batch_size
        } else {
            len.div_ceil(self.batch_size)
        }
    }

    /// The order in which `epoch` visits the `len` images of a data set.
    pub(crate) fn order(&self, len: usize, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..len).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(self.seed ^ SHUFFLE_STREAM, epoch, 0));
            order.shuffle(&mut rng);
        }
        order
    }
}

/// One batch: images `[n, 3, height, width]` (NCHW, f32, normalised) and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `n × 3 × height × width` values, image after image, each channel plane row-major.
    pub images: Vec<f32>,
    /// `n` class indices.
    pub labels: Vec<u32>,
    /// Rows of every image (32 for CIFAR).
    pub height: usize,
    /// Columns of every image (32 for CIFAR).
    pub width: usize,
}

impl Batch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `[n, 3, height, width]`.
    pub fn shape(&self) -> [usize; 4] {
        [self.len(), CHANNELS, self.height, self.width]
    }
}

/// The random choices for one image: crop offset in the padded 40×40 image, and flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augmentation {
    /// Column of the crop's left edge in the padded image, 0..=8.
    pub crop_x: usize,
    /// Row of the crop's top edge in the padded image, 0..=8.
    pub crop_y: usize,
    /// Mirror left–right after cropping.
    pub flip: bool,
}

impl Augmentation {
    /// No change: the centre crop, unflipped.
    pub const IDENTITY: Augmentation = Augmentation {
        crop_x: CROP_PADDING,
        crop_y: CROP_PADDING,
        flip: false,
    };

    /// The choices for image `index` of the data set in `epoch` under `seed`.
    pub fn draw(seed: u64, epoch: u64, index: usize) -> Augmentation {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ AUGMENT_STREAM, epoch, index as u64));
        Augmentation {
            crop_x: rng.random_range(0..=2 * CROP_PADDING),
            crop_y: rng.random_range(0..=2 * CROP_PADDING),
            flip: rng.random_bool(0.5),
        }
    }

    /// Applies the crop and flip to one CHW image of 3,072 bytes; padded pixels are 0.
    /// Returns `None` when `image` is not 3,072 bytes or the offsets exceed the padding.
    pub fn apply(&self, image: &[u8]) -> Option<Vec<u8>> {
        if image.len() != IMAGE_BYTES
            || self.crop_x > 2 * CROP_PADDING
            || self.crop_y > 2 * CROP_PADDING
        {
            return None;
        }
        let mut out = vec![0u8; IMAGE_BYTES];
        for (index, value) in out.iter_mut().enumerate() {
            *value = self.source_index(index).map_or(0, |source| image[source]);
        }
        Some(out)
    }

    /// Crops, flips and normalises `image` (3,072 bytes) into `out` (3,072 values) row by row;
    /// the same mapping as [`Augmentation::apply`], without per-value index arithmetic.
    fn write_normalised(&self, image: &[u8], tables: &[[f32; 256]; CHANNELS], out: &mut [f32]) {
        let plane = IMAGE_SIDE * IMAGE_SIDE;
        let shifted = |position: usize, offset: usize| {
            (position + offset)
                .checked_sub(CROP_PADDING)
                .filter(|&p| p < IMAGE_SIDE)
        };
        for (channel, table) in tables.iter().enumerate() {
            let source_plane = &image[channel * plane..(channel + 1) * plane];
            let out_plane = &mut out[channel * plane..(channel + 1) * plane];
            for (row, out_row) in out_plane.chunks_exact_mut(IMAGE_SIDE).enumerate() {
                let Some(source_row) = shifted(row, self.crop_y) else {
                    out_row.fill(table[0]);
                    continue;
                };
                let source_row =
                    &source_plane[source_row * IMAGE_SIDE..(source_row + 1) * IMAGE_SIDE];
                for (col, value) in out_row.iter_mut().enumerate() {
                    let col = if self.flip { IMAGE_SIDE - 1 - col } else { col };
                    let byte = shifted(col, self.crop_x).map_or(0, |c| source_row[c]);
                    *value = table[usize::from(byte)];
                }
            }
        }
    }

    /// Index in the source image of output value `index`, or `None` for padding.
    fn source_index(&self, index: usize) -> Option<usize> {
        let plane = IMAGE_SIDE * IMAGE_SIDE;
        let channel = index / plane;
        let row = (index % plane) / IMAGE_SIDE;
        let col = index % IMAGE_SIDE;
        let col = if self.flip { IMAGE_SIDE - 1 - col } else { col };
        let source_row = (row + self.crop_y).checked_sub(CROP_PADDING)?;
        let source_col = (col + self.crop_x).checked_sub(CROP_PADDING)?;
        (source_row < IMAGE_SIDE && source_col < IMAGE_SIDE)
            .then_some(channel * plane + source_row * IMAGE_SIDE + source_col)
    }
}

const AUGMENT_STREAM: u64 = 0x6175_676d_656e_7421;
const SHUFFLE_STREAM: u64 = 0x7368_7566_666c_6521;

/// Two counters folded into a stream's seed: distinct inputs give unrelated seeds.
pub(crate) fn mix(a: u64, b: u64, c: u64) -> u64 {
    swa_core::seed::fold_words(a, &[b, c])
}

/// Cuts a data set into batches, epoch after epoch.
#[derive(Debug, Clone)]
pub struct Batches {
    dataset: Arc<Dataset>,
    config: BatchConfig,
    tables: Arc<[[f32; 256]; CHANNELS]>,
}

impl Batches {
    /// Batches of `dataset` under `config`; fails on a zero batch size or a zero/non-finite std.
    pub fn new(dataset: Arc<Dataset>, config: BatchConfig) -> Result<Self> {
        let tables = Arc::new(config.validated_tables()?);
        Ok(Batches {
            dataset,
            config,
            tables,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// The data set.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.config.batches_per_epoch(self.dataset.len())
    }

    /// The order in which `epoch` visits the images.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        self.config.order(self.dataset.len(), epoch)
    }

    /// Builds the batch of the images at `indices` (data-set indices) for `epoch`, in parallel
    /// over images. Indices past the end are skipped.
    pub fn make_batch(&self, epoch: u64, indices: &[usize]) -> Batch {
        let indices: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&i| i < self.dataset.len())
            .collect();
        let mut images = vec![0f32; indices.len() * IMAGE_BYTES];
        let labels = indices.iter().map(|&i| self.dataset.labels()[i]).collect();
        images
            .par_chunks_mut(IMAGE_BYTES)
            .zip(indices.par_iter())
            .for_each(|(out, &index)| {
                let start = index * IMAGE_BYTES;
                let image = &self.dataset.images()[start..start + IMAGE_BYTES];
                let augmentation = if self.config.augment {
                    Augmentation::draw(self.config.seed, epoch, index)
                } else {
                    Augmentation::IDENTITY
                };
                augmentation.write_normalised(image, &self.tables, out);
            });
        Batch {
            images,
            labels,
            height: IMAGE_SIDE,
            width: IMAGE_SIDE,
        }
    }

    /// All batches of `epoch`, built ahead by a worker thread (see [`BatchConfig::prefetch`]).
    /// Dropping the iterator early stops the worker.
    pub fn epoch(&self, epoch: u64) -> EpochBatches {
        let batches = self.clone();
        EpochBatches {
            batches: Prefetched::new(
                self.order(epoch),
                self.config.batch_size,
                self.batches_per_epoch(),
                self.config.prefetch,
                move |chunk: &[usize]| batches.make_batch(epoch, chunk),
            ),
        }
    }
}

/// The batches of one epoch, in order.
pub struct EpochBatches {
    batches: Prefetched<Batch>,
}

impl Iterator for EpochBatches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        self.batches.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.batches.size_hint()
    }
}

impl ExactSizeIterator for EpochBatches {}

/// What one chunk of an epoch's order is built into: a [`Batch`], or for a source that can fail
/// (image files) a `Result`, whose error ends the epoch.
pub(crate) trait Outcome {
    /// Whether no further batch should be built after this one.
    fn ends_epoch(&self) -> bool;
}

impl Outcome for Batch {
    fn ends_epoch(&self) -> bool {
        false
    }
}

impl<T> Outcome for Result<T> {
    fn ends_epoch(&self) -> bool {
        self.is_err()
    }
}

/// The items built from consecutive chunks of an epoch's order: ahead on a worker thread into a
/// bounded queue of `prefetch` items, or on demand when `prefetch` is 0 or no thread can start.
/// An item whose [`Outcome::ends_epoch`] is true is the last one. Dropping it stops the worker.
pub(crate) struct Prefetched<T> {
    source: Source<T>,
    remaining: usize,
}

/// Builds the item of one chunk of indices.
type MakeItem<T> = Box<dyn FnMut(&[usize]) -> T + Send>;

enum Source<T> {
    Prefetch {
        receiver: Option<Receiver<T>>,
        worker: Option<JoinHandle<()>>,
    },
    Inline {
        make: MakeItem<T>,
        order: Vec<usize>,
        batch_size: usize,
        next: usize,
    },
}

impl<T: Outcome + Send + 'static> Prefetched<T> {
    /// The first `count` chunks of `batch_size` indices of `order`, each made into an item.
    pub(crate) fn new(
        order: Vec<usize>,
        batch_size: usize,
        count: usize,
        prefetch: usize,
        make: impl FnMut(&[usize]) -> T + Send + Clone + 'static,
    ) -> Self {
        if prefetch > 0 {
            let (sender, receiver) = sync_channel(prefetch);
            let worker_order = order.clone();
            let mut worker_make = make.clone();
            let spawned = std::thread::Builder::new()
                .name("swa-data-batches".into())
                .spawn(move || {
                    for chunk in worker_order.chunks(batch_size).take(count) {
                        let item = worker_make(chunk);
                        let last = item.ends_epoch();
                        if sender.send(item).is_err() || last {
                            return;
                        }
                    }
                });
            if let Ok(worker) = spawned {
                return Prefetched {
                    source: Source::Prefetch {
                        receiver: Some(receiver),
                        worker: Some(worker),
                    },
                    remaining: count,
                };
            }
        }
        // Without a worker thread the items are built on demand.
        Prefetched {
            source: Source::Inline {
                make: Box::new(make),
                order,
                batch_size,
                next: 0,
            },
            remaining: count,
        }
    }
}

impl<T: Outcome> Iterator for Prefetched<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        if self.remaining == 0 {
            return None;
        }
        let item = match &mut self.source {
            Source::Prefetch { receiver, .. } => receiver.as_ref()?.recv().ok()?,
            Source::Inline {
                make,
                order,
                batch_size,
                next,
            } => {
                let end = (*next + *batch_size).min(order.len());
                let item = make(&order[*next..end]);
                *next = end;
                item
            }
        };
        self.remaining = if item.ends_epoch() {
            0
        } else {
            self.remaining - 1
        };
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<T> Drop for Prefetched<T> {
    fn drop(&mut self) {
        if let Source::Prefetch { receiver, worker } = &mut self.source {
            // Closing the channel first makes the worker's next send fail, so it stops.
            drop(receiver.take());
            if let Some(worker) = worker.take() {
                let _ = worker.join();
            }
        }
    }
}
