//! Images per second decoded and transformed by the ImageFolder pipeline: torchvision's ImageNet
//! training transform (RandomResizedCrop 224, flip, normalisation) and evaluation transform
//! (Resize 256, CenterCrop 224) on synthetic 500×375 JPEGs (ImageNet's most common size), on one
//! worker thread (per core) and on all cores.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use swa_data::synthetic::{write_image_folder, ImageFolderSpec};
use swa_data::{FolderBatchConfig, FolderBatches, ImageFolder};

const CLASSES: usize = 4;
const IMAGES_PER_CLASS: usize = 16;
const BATCH: usize = 32;

fn image_folder(c: &mut Criterion) {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(error) => panic!("temporary folder: {error}"),
    };
    let spec = ImageFolderSpec::jpeg(CLASSES, IMAGES_PER_CLASS, 500, 375);
    if let Err(error) = write_image_folder(&spec, dir.path()) {
        panic!("synthetic ImageFolder: {error}");
    }
    let folder = match ImageFolder::open(dir.path()) {
        Ok(folder) => Arc::new(folder),
        Err(error) => panic!("{error}"),
    };
    let images = folder.len();
    let mut group = c.benchmark_group("image_folder");
    group.throughput(Throughput::Elements(images as u64));
    group.sample_size(10);
    for (name, config) in [
        ("train", FolderBatchConfig::train(BATCH, 1)),
        ("eval", FolderBatchConfig::eval(BATCH)),
    ] {
        for workers in [Some(1), None] {
            let config = FolderBatchConfig { workers, ..config };
            let batches = match FolderBatches::new(Arc::clone(&folder), config) {
                Ok(batches) => batches,
                Err(error) => panic!("batch configuration: {error}"),
            };
            let threads = workers.map_or("all".to_owned(), |n| n.to_string());
            let mut epoch = 0;
            group.bench_function(format!("{name}_500x375_jpeg_workers_{threads}"), |b| {
                b.iter(|| {
                    epoch += 1;
                    batches
                        .epoch(epoch)
                        .map(|batch| match batch {
                            Ok(batch) => batch.len(),
                            Err(error) => panic!("{error}"),
                        })
                        .sum::<usize>()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, image_folder);
criterion_main!(benches);
