//! CIFAR batches from swa-data as the trainer's [`BatchSource`].

use std::sync::Arc;

use anyhow::Result;
use swa_data::{BatchConfig, Batches, Dataset};
use swa_models::batch::{BatchResult, BatchSource, HostBatch};

use super::presets::{normalization_of, Recipe};

/// Training and test batches of one recipe and seed.
pub struct CifarSource {
    train: Batches,
    test: Batches,
    train_images: usize,
    test_images: usize,
}

impl CifarSource {
    /// Batches for `recipe` (its batch size, normalisation and subset), the training order seeded by `seed`:
    /// the training images without the `recipe.holdout` held out at the split's end, of which the first
    /// `recipe.train_limit`.
    pub fn new(
        train: &Arc<Dataset>,
        test: &Arc<Dataset>,
        recipe: &Recipe,
        seed: u64,
    ) -> Result<Self> {
        let trained = match recipe.holdout {
            0 => Arc::clone(train),
            held_out => Arc::new(train.hold_out(held_out)?.0),
        };
        let train = limit(&trained, recipe.train_limit);
        let test = limit(test, recipe.test_limit);
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

/// The first `limit` images of a split (all when `None` or larger than the split), shared rather than
/// copied when nothing is cut.
fn limit(dataset: &Arc<Dataset>, limit: Option<usize>) -> Arc<Dataset> {
    match limit {
        Some(n) if n < dataset.len() => Arc::new(dataset.head(n)),
        _ => Arc::clone(dataset),
    }
}

/// swa-data's batch as the trainer's, moving its values.
pub(super) fn host(batch: swa_data::Batch) -> HostBatch {
    let shape = batch.shape();
    HostBatch {
        images: batch.images,
        shape,
        labels: batch.labels,
    }
}

impl BatchSource for CifarSource {
    fn train_epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        // CIFAR batches are cut from arrays already in memory and checked: they cannot fail.
        Box::new(self.train.epoch(epoch as u64).map(host).map(Ok))
    }

    fn train_batches_per_epoch(&self) -> usize {
        self.train.batches_per_epoch()
    }

    fn test(&self) -> Box<dyn Iterator<Item = BatchResult> + '_> {
        Box::new(self.test.epoch(0).map(host).map(Ok))
    }

    fn test_len(&self) -> usize {
        self.test_images
    }
}
