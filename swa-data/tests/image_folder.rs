//! ImageFolder data sets: the scan, decoding, torchvision's transforms, deterministic batches and
//! bad input.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{Rgb, RgbImage};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use swa_data::synthetic::{write_image_folder, ImageFileFormat, ImageFolderSpec};
use swa_data::transform::{center_crop_box, resize_center_crop, resized_crop, shorter_side_size};
use swa_data::{
    decode_image, BadImages, BatchConfig, CropBox, DataError, FolderBatchConfig, FolderBatches,
    FolderTransform, ImageFolder, Normalization, RandomResizedCrop,
};

fn tempdir() -> tempfile::TempDir {
    match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(error) => panic!("temporary folder: {error}"),
    }
}

fn ok<T>(result: swa_data::Result<T>) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{error}"),
    }
}

fn touch(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{}: {e}", parent.display()));
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn png_bytes(image: &RgbImage) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, image::ImageFormat::Png)
        .unwrap_or_else(|e| panic!("encoding a PNG: {e}"));
    bytes.into_inner()
}

/// A small data set: 3 classes × 4 images of 40×30, JPEG and PNG.
fn synthetic_folder(dir: &Path) -> Vec<PathBuf> {
    let spec = ImageFolderSpec {
        format: ImageFileFormat::Mixed,
        seed: 5,
        ..ImageFolderSpec::jpeg(3, 4, 40, 30)
    };
    ok(write_image_folder(&spec, dir))
}

fn small_config(train: bool) -> FolderBatchConfig {
    let base = if train {
        FolderBatchConfig::train(5, 11)
    } else {
        FolderBatchConfig::eval(5)
    };
    FolderBatchConfig {
        transform: FolderTransform::with_size(16),
        ..base
    }
}

fn batch_bytes(batches: &FolderBatches, epoch: u64) -> Vec<(Vec<u32>, Vec<u32>)> {
    batches
        .epoch(epoch)
        .map(|batch| {
            let batch = ok(batch);
            (
                batch.images.iter().map(|v| v.to_bits()).collect(),
                batch.labels,
            )
        })
        .collect()
}

#[test]
fn the_scan_sorts_classes_and_walks_nested_folders_in_torchvisions_order() {
    let dir = tempdir();
    let root = dir.path();
    let png = png_bytes(&RgbImage::new(2, 2));
    // Created out of order; names chosen so that byte order differs from creation order.
    for file in [
        "zebra/b.png",
        "zebra/a.PNG",
        "zebra/sub b/c.jpeg",
        "zebra/sub/d.png",
        "zebra/notes.txt",
        "Apple/x.png",
        "apple/y.webp",
        "apple/z.png",
    ] {
        touch(&root.join(file), &png);
    }
    touch(&root.join("stray.png"), &png);
    let folder = ok(ImageFolder::open(root));
    assert_eq!(folder.classes(), ["Apple", "apple", "zebra"]);
    let listed: Vec<(String, u32)> = folder
        .samples()
        .iter()
        .map(|sample| {
            let relative = sample.path.strip_prefix(root).unwrap_or(&sample.path);
            (relative.to_string_lossy().into_owned(), sample.label)
        })
        .collect();
    // os.walk's folders sorted by path ("zebra" < "zebra/sub" < "zebra/sub b"), files by name;
    // `.txt` is not an image extension, `.webp` and upper case `.PNG` are.
    let expected = [
        ("Apple/x.png", 0),
        ("apple/y.webp", 1),
        ("apple/z.png", 1),
        ("zebra/a.PNG", 2),
        ("zebra/b.png", 2),
        ("zebra/sub/d.png", 2),
        ("zebra/sub b/c.jpeg", 2),
    ];
    let expected: Vec<(String, u32)> = expected
        .iter()
        .map(|(path, label)| (path.to_string(), *label))
        .collect();
    assert_eq!(listed, expected);
    assert!(folder.skipped().is_empty());
}

#[test]
fn a_folder_that_is_not_an_image_folder_is_refused_by_name() {
    let dir = tempdir();
    let file = dir.path().join("file.png");
    touch(&file, b"x");
    for (path, problem) in [
        (dir.path().join("missing"), "reading"),
        (file.clone(), "not a folder"),
    ] {
        let message = match ImageFolder::open(&path) {
            Ok(_) => panic!("{} accepted as an ImageFolder", path.display()),
            Err(error) => error.to_string(),
        };
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(problem), "{message}");
    }
    // Only loose files, no class folder.
    match ImageFolder::open(dir.path()) {
        Err(DataError::NotImageFolder { path, problem }) => {
            assert_eq!(path, dir.path());
            assert!(problem.contains("no sub-folder"), "{problem}");
        }
        other => panic!("expected NotImageFolder, got {other:?}"),
    }
}

#[test]
fn an_empty_class_folder_is_an_error_naming_it_or_a_reported_skip() {
    let dir = tempdir();
    synthetic_folder(dir.path());
    let empty = dir.path().join("class_001b");
    touch(&empty.join("readme.txt"), b"no images here");
    match ImageFolder::open(dir.path()) {
        Err(DataError::EmptyClass { folder, class, .. }) => {
            assert_eq!(folder, empty);
            assert_eq!(class, "class_001b");
        }
        other => panic!("expected EmptyClass, got {other:?}"),
    }
    let folder = ok(ImageFolder::open_with(dir.path(), BadImages::Skip));
    // The empty class keeps its place in the label order, as with torchvision's allow_empty.
    assert_eq!(
        folder.classes(),
        ["class_000", "class_001", "class_001b", "class_002"]
    );
    assert_eq!(folder.len(), 12);
    assert_eq!(folder.samples()[11].label, 3);
    assert_eq!(folder.skipped().len(), 1);
    assert_eq!(folder.skipped()[0].path, empty);
    assert!(matches!(
        folder.skipped()[0].error,
        DataError::EmptyClass { .. }
    ));
}

#[test]
fn generated_png_decodes_exactly_and_jpeg_closely() {
    let dir = tempdir();
    let image = RgbImage::from_fn(7, 5, |x, y| Rgb([(x * 30) as u8, (y * 50) as u8, 200]));
    let png = dir.path().join("exact.png");
    touch(&png, &png_bytes(&image));
    assert_eq!(ok(decode_image(&png)), image);

    // A grey PNG becomes RGB with the grey level on every channel, as PIL's convert("RGB").
    let grey = image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(x * 40 + y) as u8]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    grey.write_to(&mut bytes, image::ImageFormat::Png)
        .unwrap_or_else(|e| panic!("encoding a grey PNG: {e}"));
    let grey_path = dir.path().join("grey.png");
    touch(&grey_path, &bytes.into_inner());
    let decoded = ok(decode_image(&grey_path));
    assert_eq!(decoded.get_pixel(2, 1), &Rgb([81, 81, 81]));

    let written = synthetic_folder(dir.path());
    let folder = ok(ImageFolder::open(dir.path()));
    assert_eq!(folder.len(), 12);
    for (index, path) in written.iter().enumerate() {
        assert_eq!(&folder.samples()[index].path, path);
        let decoded = ok(decode_image(path));
        assert_eq!(decoded.dimensions(), (40, 30), "{}", path.display());
    }
    // A flat-colour JPEG decodes to (nearly) that colour.
    let flat = RgbImage::from_pixel(16, 16, Rgb([200, 40, 90]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95)
        .encode_image(&flat)
        .unwrap_or_else(|e| panic!("encoding a JPEG: {e}"));
    let jpeg = dir.path().join("flat.jpg");
    touch(&jpeg, &bytes.into_inner());
    let decoded = ok(decode_image(&jpeg));
    for pixel in decoded.pixels() {
        for (got, want) in pixel.0.iter().zip([200u8, 40, 90]) {
            assert!(got.abs_diff(want) <= 3, "{:?}", pixel.0);
        }
    }
}

/// A deterministic test pattern, also computable outside Rust.
fn pattern(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([0, 1, 2].map(|c| ((x * 37 + y * 91 + c * 53 + (x * y) % 29 * 7) % 256) as u8))
    })
}

/// FNV-1a (64-bit) of the bytes.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn resampling_gives_pillows_bytes() {
    // Expected hashes of the bytes torchvision gives for `pattern(157, 93)` as a PIL image:
    // `F.resized_crop(img, top, left, h, w, [s, s])` and `CenterCrop(c)(Resize(r)(img))`
    // (torchvision 0.29, Pillow 13), hashed with FNV-1a.
    let image = pattern(157, 93);
    let crop = |top, left, height, width| CropBox {
        top,
        left,
        height,
        width,
    };
    assert_eq!(
        fnv1a(resized_crop(&image, crop(5, 11, 40, 77), 32).as_raw()),
        0x4568_ded5_6cf0_b744
    );
    assert_eq!(
        fnv1a(resized_crop(&image, crop(3, 2, 20, 10), 64).as_raw()),
        0xe952_581f_952b_2700
    );
    assert_eq!(
        fnv1a(resize_center_crop(&image, 37, 32).as_raw()),
        0x9872_5d0d_229f_eeb3
    );
    assert_eq!(
        fnv1a(resize_center_crop(&image, 50, 33).as_raw()),
        0x11f1_e68e_7e74_1556
    );
}

#[test]
fn the_eval_transform_matches_a_hand_computed_case() {
    // 6×4: red rises along columns, green along rows, blue is flat.
    let image = RgbImage::from_fn(6, 4, |x, y| Rgb([(14 * x) as u8, (70 * y) as u8, 128]));
    // Shorter side 4 → 2, longer int(2 · 6 / 4) = 3; centre crop 2 starts at round(0.5) = 0.
    assert_eq!(shorter_side_size(6, 4, 2), (3, 2));
    assert_eq!(center_crop_box(3, 2, 2).left, 0);
    // Halving: the triangle filter of support 2 gives output 0 the weights 3/7, 3/7, 1/7 over
    // source 0..3, output 1 (of 3 columns) 1/8, 3/8, 3/8, 1/8 over 1..5:
    // red 14·3/7 + 28/7 = 10 and (14 + 3·28 + 3·42 + 56)/8 = 35;
    // green (of 4 rows → 2) 70·3/7 + 140/7 = 50 and 70/7 + 3·140/7 + 3·210/7 = 160.
    let out = resize_center_crop(&image, 2, 2);
    let expected = RgbImage::from_fn(2, 2, |x, y| {
        Rgb([[10, 35][x as usize], [50, 160][y as usize], 128])
    });
    assert_eq!(out, expected);

    // The same through the batches: ToTensor and ImageNet's Normalize, CHW.
    let dir = tempdir();
    touch(&dir.path().join("only/image.png"), &png_bytes(&image));
    let folder = Arc::new(ok(ImageFolder::open(dir.path())));
    let config = FolderBatchConfig {
        transform: FolderTransform {
            size: 2,
            resize: 2,
            ..FolderTransform::IMAGENET
        },
        ..FolderBatchConfig::eval(4)
    };
    let batches = ok(FolderBatches::new(folder, config));
    let batch = ok(batches
        .epoch(0)
        .next()
        .unwrap_or_else(|| panic!("no batch")));
    assert_eq!(batch.shape(), [1, 3, 2, 2]);
    let (mean, std) = Normalization::ImageNetStats.mean_std();
    let normalise = |byte: u8, channel: usize| (byte as f32 / 255.0 - mean[channel]) / std[channel];
    let expected: Vec<f32> = [
        (0, [10u8, 35, 10, 35]),
        (1, [50, 50, 160, 160]),
        (2, [128, 128, 128, 128]),
    ]
    .iter()
    .flat_map(|&(channel, bytes)| bytes.map(|b| normalise(b, channel)))
    .collect();
    assert_eq!(batch.images, expected);
    assert_eq!(batch.labels, [0]);
}

#[test]
fn the_crop_falls_back_to_the_central_crop_when_no_draw_fits() {
    // A 1000×10 strip: every drawn area of at least half the image needs rows the strip lacks.
    let sampler = RandomResizedCrop {
        scale: (0.5, 1.0),
        ..RandomResizedCrop::IMAGENET
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let expected = CropBox {
        top: 0,
        left: (1000 - 13) / 2,
        height: 10,
        width: 13, // round(10 · 4/3)
    };
    for _ in 0..20 {
        assert_eq!(sampler.sample(1000, 10, &mut rng), expected);
    }
    // A tall strip is cut to the lower ratio bound; an image within the ratios is kept whole.
    assert_eq!(
        sampler.fallback(10, 1000),
        CropBox {
            top: (1000 - 13) / 2,
            left: 0,
            height: 13, // round(10 / (3/4))
            width: 10,
        }
    );
    assert_eq!(sampler.fallback(50, 40), CropBox::full(50, 40));
}

#[test]
fn crop_draws_follow_torchvisions_distributions() {
    // On a large square image with areas up to half, every first draw fits, so areas are uniform
    // in the scale range, log ratios uniform in the log ratio range, positions uniform.
    let sampler = RandomResizedCrop {
        scale: (0.08, 0.5),
        ..RandomResizedCrop::IMAGENET
    };
    let side = 10_000u32;
    let area = f64::from(side) * f64::from(side);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let n = 20_000;
    let (mut area_sum, mut log_ratio_sum, mut position_sum) = (0.0, 0.0, 0.0);
    let (mut min_log_ratio, mut max_log_ratio) = (f64::MAX, f64::MIN);
    for _ in 0..n {
        let crop = sampler.sample(side, side, &mut rng);
        let (w, h) = (f64::from(crop.width), f64::from(crop.height));
        area_sum += w * h / area;
        let log_ratio = (w / h).ln();
        log_ratio_sum += log_ratio;
        min_log_ratio = min_log_ratio.min(log_ratio);
        max_log_ratio = max_log_ratio.max(log_ratio);
        position_sum += f64::from(crop.left) / (f64::from(side) - w);
    }
    let n = f64::from(n);
    assert!(
        (area_sum / n - 0.29).abs() < 0.005,
        "mean area {}",
        area_sum / n
    );
    assert!(
        (log_ratio_sum / n).abs() < 0.005,
        "mean log ratio {}",
        log_ratio_sum / n
    );
    let bound = (4.0f64 / 3.0).ln();
    assert!(min_log_ratio < -0.99 * bound && min_log_ratio > -1.001 * bound);
    assert!(max_log_ratio > 0.99 * bound && max_log_ratio < 1.001 * bound);
    assert!(
        (position_sum / n - 0.5).abs() < 0.01,
        "mean position {}",
        position_sum / n
    );
}

proptest! {
    #[test]
    fn every_crop_lies_inside_the_image_within_torchvisions_ranges(
        width in 1u32..3000,
        height in 1u32..3000,
        seed in any::<u64>(),
    ) {
        let sampler = RandomResizedCrop::IMAGENET;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let crop = sampler.sample(width, height, &mut rng);
        prop_assert!(crop.fits_in(width, height), "{crop:?} in {width}×{height}");
        if crop != sampler.fallback(width, height) {
            // The sides are rounded from √(area · ratio) and √(area / ratio): undo the rounding
            // by half a pixel either way and the drawn area and ratio must be in range.
            let (w, h) = (f64::from(crop.width), f64::from(crop.height));
            let area = f64::from(width) * f64::from(height);
            let (s0, s1) = sampler.scale;
            let (r0, r1) = sampler.ratio;
            prop_assert!((w + 0.5) * (h + 0.5) >= s0 * area, "{crop:?} too small");
            prop_assert!((w - 0.5) * (h - 0.5) <= s1 * area, "{crop:?} too large");
            prop_assert!((w + 0.5) / (h - 0.5).max(0.5) >= r0, "{crop:?} too tall");
            prop_assert!((w - 0.5) / (h + 0.5) <= r1, "{crop:?} too wide");
        }
    }
}

#[test]
fn batches_are_determined_by_seed_and_epoch_whatever_the_threads() {
    let dir = tempdir();
    synthetic_folder(dir.path());
    let folder = Arc::new(ok(ImageFolder::open(dir.path())));
    let config = small_config(true);
    let batches = ok(FolderBatches::new(Arc::clone(&folder), config));
    let first = batch_bytes(&batches, 0);
    assert_eq!(first.len(), 3);
    assert_eq!(first.iter().map(|(_, l)| l.len()).sum::<usize>(), 12);
    assert_eq!(first[0].0.len(), 5 * 3 * 16 * 16);
    assert_eq!(batch_bytes(&batches, 0), first);

    let single_thread_inline = FolderBatchConfig {
        workers: Some(1),
        batch: BatchConfig {
            prefetch: 0,
            ..config.batch
        },
        ..config
    };
    let other = ok(FolderBatches::new(
        Arc::clone(&folder),
        single_thread_inline,
    ));
    assert_eq!(batch_bytes(&other, 0), first);

    assert_ne!(batch_bytes(&batches, 1), first);
    let reseeded = FolderBatchConfig {
        batch: BatchConfig {
            seed: 12,
            ..config.batch
        },
        ..config
    };
    let reseeded = ok(FolderBatches::new(Arc::clone(&folder), reseeded));
    assert_ne!(batch_bytes(&reseeded, 0), first);

    // Evaluation batches are in order and the same every epoch.
    let eval = ok(FolderBatches::new(folder, small_config(false)));
    let eval_first = batch_bytes(&eval, 0);
    assert_eq!(batch_bytes(&eval, 3), eval_first);
    let labels: Vec<u32> = eval_first.iter().flat_map(|(_, l)| l.clone()).collect();
    assert_eq!(labels, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
}

/// A folder of 3 × 4 good images plus a truncated JPEG, a file that is no image, a truncated PNG
/// and a broken
/// link named like an image; returns the bad paths in scan order.
fn folder_with_bad_files(dir: &Path) -> Vec<PathBuf> {
    let written = synthetic_folder(dir);
    let jpeg = std::fs::read(&written[0]).unwrap_or_else(|e| panic!("{e}"));
    let truncated = dir.join("class_000/image_0000_truncated.jpg");
    touch(&truncated, &jpeg[..jpeg.len() / 2]);
    let garbage = dir.join("class_001/image_0000_garbage.png");
    touch(&garbage, b"this is not a PNG");
    let png = std::fs::read(&written[1]).unwrap_or_else(|e| panic!("{e}"));
    let truncated_png = dir.join("class_001/image_0001_truncated.png");
    touch(&truncated_png, &png[..png.len() * 2 / 3]);
    let unreadable = dir.join("class_002/image_9999.jpg");
    std::os::unix::fs::symlink(dir.join("nowhere.jpg"), &unreadable)
        .unwrap_or_else(|e| panic!("{e}"));
    vec![truncated, garbage, truncated_png, unreadable]
}

#[test]
fn bad_files_are_errors_naming_them() {
    let dir = tempdir();
    let bad = folder_with_bad_files(dir.path());
    let folder = ok(ImageFolder::open(dir.path()));
    assert_eq!(folder.len(), 16);
    for path in &bad {
        let index = folder
            .samples()
            .iter()
            .position(|s| &s.path == path)
            .unwrap_or_else(|| panic!("{} not scanned", path.display()));
        let error = match folder.decode(index) {
            Some(Err(error)) => error,
            other => panic!("{}: expected an error, got {other:?}", path.display()),
        };
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        match error {
            DataError::Image { file, .. } => {
                assert_eq!(&file, path);
                assert!(
                    message.contains("expected a complete JPEG or PNG"),
                    "{message}"
                );
            }
            DataError::Io { path: file, .. } => assert_eq!(&file, &bad[3]),
            other => panic!("unexpected error {other:?}"),
        }
    }

    // Evaluation batches in order stop at the first bad image with its error.
    let batches = ok(FolderBatches::new(
        Arc::new(folder),
        FolderBatchConfig {
            batch: BatchConfig {
                batch_size: 4,
                ..small_config(false).batch
            },
            ..small_config(false)
        },
    ));
    let mut epoch = batches.epoch(0);
    // Class 0's five files sort as image_0000, image_0000_truncated, …: the first batch fails.
    match epoch.next() {
        Some(Err(DataError::Image { file, .. })) => assert_eq!(file, bad[0]),
        other => panic!("expected the truncated file's error, got {other:?}"),
    }
    assert!(epoch.next().is_none(), "the epoch goes on after an error");
}

#[test]
fn bad_files_are_skipped_and_reported_when_asked() {
    let dir = tempdir();
    let bad = folder_with_bad_files(dir.path());
    let folder = Arc::new(ok(ImageFolder::open_with(dir.path(), BadImages::Skip)));
    for train in [false, true] {
        let config = FolderBatchConfig {
            bad_images: BadImages::Skip,
            ..small_config(train)
        };
        let batches = ok(FolderBatches::new(Arc::clone(&folder), config));
        let mut epoch = batches.epoch(0);
        let mut images = 0;
        for batch in epoch.by_ref() {
            let batch = ok(batch);
            assert_eq!(batch.images.len(), batch.len() * 3 * 16 * 16);
            images += batch.len();
        }
        assert_eq!(images, 12);
        assert_eq!(epoch.skipped_count(), 4);
        let mut skipped: Vec<PathBuf> = epoch.take_skipped().into_iter().map(|s| s.path).collect();
        skipped.sort();
        let mut expected = bad.clone();
        expected.sort();
        assert_eq!(skipped, expected);
        assert_eq!(epoch.skipped_count(), 0);
    }
}

#[test]
fn unusable_configurations_are_refused() {
    let dir = tempdir();
    synthetic_folder(dir.path());
    let folder = Arc::new(ok(ImageFolder::open(dir.path())));
    let bad_configs = [
        FolderBatchConfig {
            workers: Some(0),
            ..small_config(true)
        },
        FolderBatchConfig {
            transform: FolderTransform {
                size: 32,
                resize: 16,
                ..FolderTransform::IMAGENET
            },
            ..small_config(false)
        },
        FolderBatchConfig {
            transform: FolderTransform {
                crop: RandomResizedCrop {
                    scale: (0.5, 0.1),
                    ..RandomResizedCrop::IMAGENET
                },
                ..FolderTransform::IMAGENET
            },
            ..small_config(true)
        },
    ];
    for config in bad_configs {
        assert!(matches!(
            FolderBatches::new(Arc::clone(&folder), config),
            Err(DataError::InvalidConfig(_))
        ));
    }
}
