//! One split of a data set in memory: images as bytes, labels, class names.

use std::path::PathBuf;

use crate::error::{DataError, Result};
use crate::layout::{DatasetKind, Split, CHANNELS, IMAGE_BYTES, IMAGE_SIDE};

/// One split (train or test) of CIFAR-10 or CIFAR-100.
///
/// Images are stored as the official files hold them: `len() × 3072` bytes, each image its red,
/// green and blue 32×32 planes (CHW), rows in order. Labels are the (fine) class indices.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    kind: DatasetKind,
    split: Split,
    images: Vec<u8>,
    labels: Vec<u32>,
    coarse_labels: Option<Vec<u32>>,
    class_names: Vec<String>,
    coarse_class_names: Option<Vec<String>>,
}

/// The parts of a [`Dataset`], for [`Dataset::new`].
#[derive(Debug, Clone, Default)]
pub struct DatasetParts {
    /// `n × 3072` pixel bytes, CHW per image.
    pub images: Vec<u8>,
    /// `n` class indices (fine classes for CIFAR-100).
    pub labels: Vec<u32>,
    /// `n` coarse class indices (CIFAR-100).
    pub coarse_labels: Option<Vec<u32>>,
    /// Class names in label order.
    pub class_names: Vec<String>,
    /// Coarse class names in label order (CIFAR-100).
    pub coarse_class_names: Option<Vec<String>>,
}

impl Dataset {
    /// Builds a split after checking that sizes agree and every label names a class.
    ///
    /// `origin` names the files the parts came from, for error messages.
    pub fn new(
        kind: DatasetKind,
        split: Split,
        parts: DatasetParts,
        origin: PathBuf,
    ) -> Result<Self> {
        let DatasetParts {
            images,
            labels,
            coarse_labels,
            class_names,
            coarse_class_names,
        } = parts;
        if images.len() != labels.len() * IMAGE_BYTES {
            return Err(DataError::CountMismatch {
                file: origin,
                what: format!("pixel bytes for {} labels", labels.len()),
                expected: labels.len() * IMAGE_BYTES,
                actual: images.len(),
            });
        }
        check_labels(&origin, &labels, class_names.len(), "class")?;
        match (&coarse_labels, &coarse_class_names) {
            (Some(coarse), Some(names)) => {
                if coarse.len() != labels.len() {
                    return Err(DataError::CountMismatch {
                        file: origin,
                        what: "coarse labels".into(),
                        expected: labels.len(),
                        actual: coarse.len(),
                    });
                }
                check_labels(&origin, coarse, names.len(), "coarse")?;
            }
            (None, None) => {}
            _ => {
                return Err(DataError::ClassNames {
                    file: origin,
                    message: "coarse labels and coarse class names must come together".into(),
                })
            }
        }
        Ok(Dataset {
            kind,
            split,
            images,
            labels,
            coarse_labels,
            class_names,
            coarse_class_names,
        })
    }

    /// Which data set.
    pub fn kind(&self) -> DatasetKind {
        self.kind
    }

    /// Which split.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// All pixel bytes, `len() × 3072`.
    pub fn images(&self) -> &[u8] {
        &self.images
    }

    /// The 3,072 bytes of image `index` (CHW), or `None` past the end.
    pub fn image(&self, index: usize) -> Option<&[u8]> {
        let start = index.checked_mul(IMAGE_BYTES)?;
        self.images.get(start..start.checked_add(IMAGE_BYTES)?)
    }

    /// Class index of every image (fine class for CIFAR-100).
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Coarse class index of every image (CIFAR-100 only).
    pub fn coarse_labels(&self) -> Option<&[u32]> {
        self.coarse_labels.as_deref()
    }

    /// Class names in label order.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Coarse class names in label order (CIFAR-100 only).
    pub fn coarse_class_names(&self) -> Option<&[String]> {
        self.coarse_class_names.as_deref()
    }

    /// Number of (fine) classes.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Images per class, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for &label in &self.labels {
            if let Some(count) = counts.get_mut(label as usize) {
                *count += 1;
            }
        }
        counts
    }

    /// The first `n` images with their labels and the same class names; all of them when `n` is at
    /// least [`len`](Self::len), none when it is 0.
    pub fn head(&self, n: usize) -> Dataset {
        self.part(0..n.min(self.len()))
    }

    /// Splits off the last `n` images as a held-out set: `(the first len − n, the last n)`, both with the
    /// same class names. The SWAG authors hold out the end of CIFAR's training split this way to fit a
    /// temperature on images the network never trained on. `n = 0` holds out nothing; an `n` that would
    /// leave no image to train on is refused.
    pub fn hold_out(&self, n: usize) -> Result<(Dataset, Dataset)> {
        if n >= self.len() && n > 0 {
            return Err(DataError::InvalidConfig(format!(
                "a held-out set of {n} images leaves nothing to train on: the {} split has {} images",
                self.split,
                self.len()
            )));
        }
        let keep = self.len() - n;
        Ok((self.part(0..keep), self.part(keep..self.len())))
    }

    /// The images of `range` (within the split) with their labels and the same class names.
    fn part(&self, range: std::ops::Range<usize>) -> Dataset {
        Dataset {
            kind: self.kind,
            split: self.split,
            images: self.images[range.start * IMAGE_BYTES..range.end * IMAGE_BYTES].to_vec(),
            labels: self.labels[range.clone()].to_vec(),
            coarse_labels: self
                .coarse_labels
                .as_ref()
                .map(|c| c[range.clone()].to_vec()),
            class_names: self.class_names.clone(),
            coarse_class_names: self.coarse_class_names.clone(),
        }
    }

    /// Mean of each colour channel over all images, on the 0–255 scale.
    pub fn channel_means(&self) -> [f64; CHANNELS] {
        let plane = IMAGE_SIDE * IMAGE_SIDE;
        let mut sums = [0u64; CHANNELS];
        for image in self.images.chunks_exact(IMAGE_BYTES) {
            for (channel, sum) in sums.iter_mut().enumerate() {
                *sum += image[channel * plane..(channel + 1) * plane]
                    .iter()
                    .map(|&b| u64::from(b))
                    .sum::<u64>();
            }
        }
        let count = (self.len() * plane).max(1) as f64;
        sums.map(|sum| sum as f64 / count)
    }
}

fn check_labels(
    origin: &std::path::Path,
    labels: &[u32],
    classes: usize,
    which: &'static str,
) -> Result<()> {
    match labels.iter().position(|&label| label as usize >= classes) {
        Some(record) => Err(DataError::LabelOutOfRange {
            file: origin.to_path_buf(),
            record,
            offset: 0,
            which,
            label: i64::from(labels[record]),
            classes,
        }),
        None => Ok(()),
    }
}

/// Both splits of a data set.
#[derive(Debug, Clone, PartialEq)]
pub struct CifarSplits {
    /// The training split.
    pub train: Dataset,
    /// The test split.
    pub test: Dataset,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_images() -> Dataset {
        Dataset::new(
            DatasetKind::Cifar100,
            Split::Train,
            DatasetParts {
                images: (0..3 * IMAGE_BYTES)
                    .map(|i| (i / IMAGE_BYTES) as u8)
                    .collect(),
                labels: vec![2, 0, 1],
                coarse_labels: Some(vec![1, 0, 1]),
                class_names: vec!["a".into(), "b".into(), "c".into()],
                coarse_class_names: Some(vec!["x".into(), "y".into()]),
            },
            PathBuf::from("<test>"),
        )
        .expect("valid parts")
    }

    #[test]
    fn head_keeps_the_first_images_and_all_class_names() {
        let full = three_images();
        let head = full.head(2);
        assert_eq!(head.len(), 2);
        assert_eq!(head.images(), &full.images()[..2 * IMAGE_BYTES]);
        assert_eq!(head.image(1), full.image(1));
        assert_eq!(head.labels(), &[2, 0]);
        assert_eq!(head.coarse_labels(), Some(&[1, 0][..]));
        assert_eq!(head.class_names(), full.class_names());
        assert_eq!(head.coarse_class_names(), full.coarse_class_names());
        assert_eq!((head.kind(), head.split()), (full.kind(), full.split()));
    }

    #[test]
    fn head_past_the_end_is_everything_and_head_zero_is_empty() {
        let full = three_images();
        assert_eq!(full.head(3), full);
        assert_eq!(full.head(usize::MAX), full);
        let empty = full.head(0);
        assert!(empty.is_empty() && empty.images().is_empty());
        assert_eq!(empty.num_classes(), 3);
    }
}
