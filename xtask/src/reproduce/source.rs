//! CIFAR batches from swa-data as the trainer's [`BatchSource`].

use std::sync::Arc;

use anyhow::Result;
use swa_data::{BatchConfig, Batches, Dataset, DatasetParts, IMAGE_BYTES};
use swa_models::batch::{BatchSource, HostBatch};

use super::presets::{normalization_of, Recipe};

/// Training and test batches of one recipe and seed.
pub struct CifarSource {
    train: Batches,
    test: Batches,
    train_images: usize,
    test_images: usize,
}

impl CifarSource {
    /// Batches for `recipe` (its batch size, normalisation and subset), the training order seeded by `seed`.
    pub fn new(
        train: &Arc<Dataset>,
        test: &Arc<Dataset>,
        recipe: &Recipe,
        seed: u64,
    ) -> Result<Self> {
        let train = limit(train, recipe.train_limit)?;
        let test = limit(test, recipe.test_limit)?;
        let (train_images, test_images) = (train.len(), test.len());
        let normalization = normalization_of(recipe.architecture);
        Ok(Self {
            train: Batches::new(
                train,
                BatchConfig::train(recipe.batch_size, normalization, seed),
            )?,
            test: Batches::new(
                test,
                BatchConfig::eval(recipe.batch_size.max(256), normalization),
            )?,
            train_images,
            test_images,
        })
    }

    /// Optimiser steps per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.train.batches_per_epoch()
    }

    /// Training images per epoch.
    pub fn train_images(&self) -> usize {
        self.train_images
    }
}

/// The first `limit` images of a split (all when `None` or larger than the split).
fn limit(dataset: &Arc<Dataset>, limit: Option<usize>) -> Result<Arc<Dataset>> {
    match limit {
        Some(n) if n < dataset.len() => {
            let parts = DatasetParts {
                images: dataset.images()[..n * IMAGE_BYTES].to_vec(),
                labels: dataset.labels()[..n].to_vec(),
                coarse_labels: dataset.coarse_labels().map(|c| c[..n].to_vec()),
                class_names: dataset.class_names().to_vec(),
                coarse_class_names: dataset.coarse_class_names().map(<[String]>::to_vec),
            };
            let origin = std::path::PathBuf::from(format!(
                "first {n} images of the {:?} split",
                dataset.split()
            ));
            Ok(Arc::new(Dataset::new(
                dataset.kind(),
                dataset.split(),
                parts,
                origin,
            )?))
        }
        _ => Ok(Arc::clone(dataset)),
    }
}

fn host(batch: swa_data::Batch) -> HostBatch {
    let shape = batch.shape();
    HostBatch {
        images: batch.images,
        shape,
        labels: batch.labels,
    }
}

impl BatchSource for CifarSource {
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = HostBatch> + '_> {
        Box::new(self.train.epoch(epoch as u64).map(host))
    }

    fn train_batches_per_epoch(&self) -> usize {
        self.train.batches_per_epoch()
    }

    fn test(&self) -> Box<dyn Iterator<Item = HostBatch> + '_> {
        Box::new(self.test.epoch(0).map(host))
    }

    fn test_len(&self) -> usize {
        self.test_images
    }
}
