//! Batches: determinism, seeds, partial batches, augmentation properties, normalisation constants.

use std::sync::Arc;

use swa_data::synthetic::{self, SyntheticSpec};
use swa_data::{
    Augmentation, Batch, BatchConfig, Batches, Dataset, DatasetKind, Layout, Normalization,
    Packaging, CROP_PADDING,
};

fn dataset(images: usize) -> Arc<Dataset> {
    let spec = SyntheticSpec {
        train_images: images,
        test_images: 1,
        ..SyntheticSpec::new(
            DatasetKind::Cifar10,
            Layout::Binary,
            Packaging::Folder,
            0,
            99,
        )
    };
    Arc::new(synthetic::generate(&spec).expect("generate").train)
}

fn epoch(data: &Arc<Dataset>, config: BatchConfig, epoch: u64) -> Vec<Batch> {
    Batches::new(Arc::clone(data), config)
        .expect("config")
        .epoch(epoch)
        .collect()
}

fn bits(batches: &[Batch]) -> Vec<u32> {
    batches
        .iter()
        .flat_map(|b| b.images.iter().map(|v| v.to_bits()))
        .collect()
}

fn labels(batches: &[Batch]) -> Vec<u32> {
    batches
        .iter()
        .flat_map(|b| b.labels.iter().copied())
        .collect()
}

#[test]
fn same_seed_and_epoch_give_bit_identical_batches() {
    let data = dataset(50);
    let config = BatchConfig::train(16, Normalization::CifarStats, 7);
    let first = epoch(&data, config, 3);
    let again = epoch(&data, config, 3);
    assert_eq!(bits(&first), bits(&again));
    assert_eq!(labels(&first), labels(&again));
    // Built on demand instead of prefetched: the same.
    let inline = epoch(
        &data,
        BatchConfig {
            prefetch: 0,
            ..config
        },
        3,
    );
    assert_eq!(bits(&first), bits(&inline));
}

#[test]
fn batches_do_not_depend_on_the_thread_count() {
    let data = dataset(40);
    let batches = Batches::new(
        Arc::clone(&data),
        BatchConfig::train(40, Normalization::ImageNetStats, 5),
    )
    .expect("config");
    let order = batches.order(2);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| batches.make_batch(2, &order))
    };
    let one = run(1);
    let three = run(3);
    assert_eq!(
        one.images.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        three.images.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(one.labels, three.labels);
}

#[test]
fn another_seed_or_epoch_gives_another_order_covering_every_image_once() {
    let data = dataset(64);
    let config = BatchConfig::train(64, Normalization::CifarStats, 1);
    let batches = Batches::new(Arc::clone(&data), config).expect("config");
    let other_seed =
        Batches::new(Arc::clone(&data), BatchConfig { seed: 2, ..config }).expect("config");
    let a = batches.order(0);
    let b = other_seed.order(0);
    let c = batches.order(1);
    assert_ne!(a, b);
    assert_ne!(a, c);
    for order in [&a, &b, &c] {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..64).collect::<Vec<_>>());
    }
    // The labels of a batch follow the order.
    let batch = batches.epoch(0).next().expect("one batch");
    let expected: Vec<u32> = a.iter().map(|&i| data.labels()[i]).collect();
    assert_eq!(batch.labels, expected);
    // Augmentation differs between seeds too.
    let with_seed_2 = epoch(
        &data,
        BatchConfig {
            seed: 2,
            shuffle: false,
            ..config
        },
        0,
    );
    let with_seed_1 = epoch(
        &data,
        BatchConfig {
            shuffle: false,
            ..config
        },
        0,
    );
    assert_eq!(labels(&with_seed_1), labels(&with_seed_2));
    assert_ne!(bits(&with_seed_1), bits(&with_seed_2));
}

#[test]
fn last_partial_batch_is_kept_or_dropped() {
    let data = dataset(50);
    let kept = epoch(
        &data,
        BatchConfig::train(16, Normalization::CifarStats, 1),
        0,
    );
    assert_eq!(
        kept.iter().map(Batch::len).collect::<Vec<_>>(),
        vec![16, 16, 16, 2]
    );
    assert_eq!(kept[3].shape(), [2, 3, 32, 32]);
    assert_eq!(kept[3].images.len(), 2 * 3072);
    let config = BatchConfig {
        drop_last: true,
        ..BatchConfig::train(16, Normalization::CifarStats, 1)
    };
    let dropped = Batches::new(Arc::clone(&data), config).expect("config");
    assert_eq!(dropped.batches_per_epoch(), 3);
    let iter = dropped.epoch(0);
    assert_eq!(iter.len(), 3);
    assert_eq!(iter.map(|b| b.len()).collect::<Vec<_>>(), vec![16, 16, 16]);
}

#[test]
fn eval_batches_are_in_order_unaugmented_and_normalised() {
    let data = dataset(10);
    let batches = epoch(&data, BatchConfig::eval(4, Normalization::CifarStats), 9);
    assert_eq!(labels(&batches), data.labels());
    let values: Vec<f32> = batches
        .iter()
        .flat_map(|b| b.images.iter().copied())
        .collect();
    let mean = [0.4914f32, 0.4822, 0.4465];
    let std = [0.2023f32, 0.1994, 0.2010];
    for (i, (&value, &byte)) in values.iter().zip(data.images()).enumerate() {
        let channel = (i % 3072) / 1024;
        let expected = (f32::from(byte) / 255.0 - mean[channel]) / std[channel];
        assert_eq!(value, expected, "value {i}");
    }
}

#[test]
fn normalisation_constants_are_those_of_the_original_code() {
    assert_eq!(
        Normalization::CifarStats.mean_std(),
        ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
    );
    assert_eq!(
        Normalization::ImageNetStats.mean_std(),
        ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    );
    let data = dataset(1);
    let batch = &epoch(&data, BatchConfig::eval(1, Normalization::None), 0)[0];
    assert!(batch
        .images
        .iter()
        .zip(data.images())
        .all(|(&v, &b)| v == f32::from(b) / 255.0));
    let zero_std = Normalization::Custom {
        mean: [0.0; 3],
        std: [1.0, 0.0, 1.0],
    };
    assert!(Batches::new(Arc::clone(&data), BatchConfig::eval(1, zero_std)).is_err());
    assert!(Batches::new(data, BatchConfig::eval(0, Normalization::None)).is_err());
}

fn test_image() -> Vec<u8> {
    // Every pixel distinct within its plane and never 0, so padding is recognisable.
    (0..3072).map(|i| (1 + (i % 1024) % 255) as u8).collect()
}

#[test]
fn crop_stays_inside_the_padded_image_and_moves_pixels_by_the_offset() {
    let image = test_image();
    for crop_y in 0..=2 * CROP_PADDING {
        for crop_x in 0..=2 * CROP_PADDING {
            let aug = Augmentation {
                crop_x,
                crop_y,
                flip: false,
            };
            let out = aug.apply(&image).expect("valid augmentation");
            for channel in 0..3 {
                for row in 0..32 {
                    for col in 0..32 {
                        let value = out[channel * 1024 + row * 32 + col];
                        // Position in the 40×40 padded image.
                        let (py, px) = (row + crop_y, col + crop_x);
                        assert!(py < 40 && px < 40);
                        let inside = (4..36).contains(&py) && (4..36).contains(&px);
                        let expected = if inside {
                            image[channel * 1024 + (py - 4) * 32 + (px - 4)]
                        } else {
                            0
                        };
                        assert_eq!(
                            value, expected,
                            "crop ({crop_x},{crop_y}) c{channel} r{row} c{col}"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(
        Augmentation::IDENTITY.apply(&image).expect("identity"),
        image
    );
    assert!(Augmentation {
        crop_x: 9,
        crop_y: 0,
        flip: false
    }
    .apply(&image)
    .is_none());
    assert!(Augmentation::IDENTITY.apply(&image[..3071]).is_none());
}

#[test]
fn flip_is_a_mirror_of_the_crop() {
    let image = test_image();
    for crop_x in [0, 3, 8] {
        let plain = Augmentation {
            crop_x,
            crop_y: 2,
            flip: false,
        }
        .apply(&image)
        .expect("plain");
        let flipped = Augmentation {
            crop_x,
            crop_y: 2,
            flip: true,
        }
        .apply(&image)
        .expect("flipped");
        for row in 0..96 {
            let mirrored: Vec<u8> = plain[row * 32..row * 32 + 32]
                .iter()
                .rev()
                .copied()
                .collect();
            assert_eq!(&flipped[row * 32..row * 32 + 32], &mirrored[..]);
        }
    }
}

#[test]
fn drawn_augmentations_cover_all_offsets_and_flip_about_half_the_time() {
    let mut seen = [[false; 9]; 2];
    let mut flips = 0;
    for index in 0..2000 {
        let aug = Augmentation::draw(4, 0, index);
        seen[0][aug.crop_x] = true;
        seen[1][aug.crop_y] = true;
        flips += usize::from(aug.flip);
    }
    assert!(seen.iter().flatten().all(|&s| s), "{seen:?}");
    assert!((850..1150).contains(&flips), "{flips} flips in 2000");
}

#[test]
fn augmented_batches_apply_the_drawn_augmentation() {
    let data = dataset(12);
    let config = BatchConfig {
        shuffle: false,
        ..BatchConfig::train(12, Normalization::None, 21)
    };
    let batch = &epoch(&data, config, 5)[0];
    for index in 0..12 {
        let aug = Augmentation::draw(21, 5, index);
        let expected = aug.apply(data.image(index).expect("image")).expect("apply");
        let got = &batch.images[index * 3072..(index + 1) * 3072];
        assert!(
            got.iter()
                .zip(&expected)
                .all(|(&v, &b)| v == f32::from(b) / 255.0),
            "image {index}"
        );
    }
}

#[test]
fn dropping_an_epoch_early_stops_the_worker() {
    let data = dataset(200);
    let batches = Batches::new(
        data,
        BatchConfig {
            prefetch: 1,
            ..BatchConfig::train(2, Normalization::CifarStats, 0)
        },
    )
    .expect("config");
    let mut iter = batches.epoch(0);
    assert!(iter.next().is_some());
    drop(iter);
    // The next epoch still works.
    assert_eq!(batches.epoch(1).count(), 100);
}
