//! Augmented training batches per second at batch size 128, on a synthetic CIFAR-10 training split.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use swa_data::{synthetic, BatchConfig, Batches, DatasetKind, Layout, Normalization, Packaging};

const IMAGES: usize = 128 * 40;

fn augmented_batches(c: &mut Criterion) {
    let spec = synthetic::SyntheticSpec {
        train_images: IMAGES,
        test_images: 1,
        ..synthetic::SyntheticSpec::new(
            DatasetKind::Cifar10,
            Layout::Binary,
            Packaging::Folder,
            1,
            3,
        )
    };
    let data = match synthetic::generate(&spec) {
        Ok(data) => data,
        Err(error) => panic!("synthetic data: {error}"),
    };
    let dataset = Arc::new(data.train);
    let mut group = c.benchmark_group("batches");
    group.throughput(Throughput::Elements((IMAGES / 128) as u64));
    group.sample_size(10);
    for prefetch in [0usize, 4] {
        let config = BatchConfig {
            prefetch,
            ..BatchConfig::train(128, Normalization::CifarStats, 1)
        };
        let batches = match Batches::new(Arc::clone(&dataset), config) {
            Ok(batches) => batches,
            Err(error) => panic!("batch configuration: {error}"),
        };
        let mut epoch = 0;
        group.bench_function(
            format!("augmented_train_epoch_b128_prefetch{prefetch}"),
            |b| {
                b.iter(|| {
                    epoch += 1;
                    batches.epoch(epoch).map(|batch| batch.len()).sum::<usize>()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, augmented_batches);
criterion_main!(benches);
