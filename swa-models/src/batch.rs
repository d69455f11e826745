//! The trainer's view of data: batches of images on the host, from any source.
//!
//! swa-models does not read data sets itself; a [`BatchSource`] adapts any loader (swa-data's CIFAR batches,
//! or a user's own) to the training loop.

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
    pub fn validate(&self) -> Result<(), crate::error::TrainError> {
        let expected: usize = self.shape.iter().product();
        if self.images.len() != expected || self.shape[0] != self.labels.len() {
            return Err(crate::error::TrainError::BadBatch(format!(
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

/// Where the trainer gets its batches.
pub trait BatchSource {
    /// The training batches of `epoch` (0-based), shuffled and augmented as training wants; the same epoch
    /// must give the same batches, so that a resumed run equals an uninterrupted one.
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = HostBatch> + '_>;
    /// The number of training batches per epoch.
    fn train_batches_per_epoch(&self) -> usize;
    /// The test batches, in a fixed order, without augmentation.
    fn test(&self) -> Box<dyn Iterator<Item = HostBatch> + '_>;
    /// The number of test images.
    fn test_len(&self) -> usize;
}
