//! The trainer's view of data: batches of images on the host, from any source.
//!
//! swa-models does not read data sets itself; a [`BatchSource`] adapts any loader (swa-data's CIFAR batches,
//! or a user's own) to the training loop.

use crate::error::TrainError;

/// A batch of images and labels on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostBatch {
    /// `[n, channels, height, width]` values, row-major.
    pub images: Vec<f32>,
    /// The images' shape `[n, channels, height, width]`.
    pub shape: [usize; 4],
    /// One class index per image.
    pub labels: Vec<u32>,
}

impl HostBatch {
    /// The number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Checks that the values, shape and labels agree.
    pub fn validate(&self) -> Result<(), TrainError> {
        let expected: usize = self.shape.iter().product();
        if self.images.len() != expected || self.shape[0] != self.labels.len() {
            return Err(TrainError::BadBatch(format!(
                "{} values and {} labels for shape {:?} (expected {expected} values and {} labels)",
                self.images.len(),
                self.labels.len(),
                self.shape,
                self.shape[0]
            )));
        }
        Ok(())
    }
}

/// One batch from a [`BatchSource`], or why the source could not make it (a corrupt or unreadable image,
/// a file that vanished): the trainer stops the run with that error before the epoch's snapshot or
/// checkpoint, so a short epoch never passes for a whole one.
pub type BatchResult = Result<HostBatch, TrainError>;

/// Where the trainer gets its batches.
pub trait BatchSource {
    /// The training batches of `epoch` (0-based), shuffled and augmented as training wants; the same epoch
    /// must give the same batches, so that a resumed run equals an uninterrupted one.
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = BatchResult> + '_>;
    /// The number of training batches per epoch.
    fn train_batches_per_epoch(&self) -> usize;
    /// The test batches, in a fixed order, without augmentation.
    fn test(&self) -> Box<dyn Iterator<Item = BatchResult> + '_>;
    /// The number of test images.
    fn test_len(&self) -> usize;
}

/// Hands the batches of `batches` to `consume` as a plain iterator that ends at the first error, and
/// returns that error instead of `consume`'s result when there was one: the functions that take any
/// iterator of batches ([`crate::evaluate::evaluate`], [`crate::bn::update_bn`]) then work on a fallible
/// source without knowing it.
pub fn until_error<T>(
    batches: impl Iterator<Item = BatchResult>,
    consume: impl FnOnce(&mut dyn Iterator<Item = HostBatch>) -> Result<T, TrainError>,
) -> Result<T, TrainError> {
    let mut failure = None;
    let outcome = {
        let mut plain = batches.map_while(|batch| match batch {
            Ok(batch) => Some(batch),
            Err(error) => {
                failure = Some(error);
                None
            }
        });
        consume(&mut plain)
    };
    match failure {
        Some(error) => Err(error),
        None => outcome,
    }
}
