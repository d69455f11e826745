//! Every reader (both data sets × both layouts × folder and archive) on synthetic files.

use std::path::Path;

use swa_data::synthetic::{self, SyntheticSpec};
use swa_data::{detect, load, load_kind, DatasetKind, Layout, Packaging, Split};

const FORMS: [(Layout, Packaging); 4] = [
    (Layout::Binary, Packaging::Folder),
    (Layout::Binary, Packaging::Archive),
    (Layout::Python, Packaging::Folder),
    (Layout::Python, Packaging::Archive),
];

fn spec(kind: DatasetKind, layout: Layout, packaging: Packaging) -> SyntheticSpec {
    SyntheticSpec {
        train_images: 23,
        test_images: 7,
        ..SyntheticSpec::new(kind, layout, packaging, 0, 11)
    }
}

#[test]
fn every_reader_returns_what_was_written() {
    for kind in DatasetKind::ALL {
        for (layout, packaging) in FORMS {
            let dir = tempfile::tempdir().expect("temporary folder");
            let spec = spec(kind, layout, packaging);
            let written = synthetic::write_spec(&spec, dir.path()).expect("write synthetic set");
            let expected = synthetic::generate(&spec).expect("generate");

            // From the folder or archive itself, and from the folder holding it.
            for path in [written.as_path(), dir.path()] {
                let source = detect(path).expect("detect");
                assert_eq!(
                    (source.kind, source.layout, source.packaging),
                    (kind, layout, packaging),
                    "detected form of {}",
                    path.display()
                );
                let loaded = load(path).expect("load");
                let context = format!("{kind:?} {layout:?} {packaging:?} from {}", path.display());
                assert_eq!(loaded.train.images(), expected.train.images(), "{context}");
                assert_eq!(loaded.train.labels(), expected.train.labels(), "{context}");
                assert_eq!(loaded.test.images(), expected.test.images(), "{context}");
                assert_eq!(loaded.test.labels(), expected.test.labels(), "{context}");
                assert_eq!(
                    loaded.train.class_names(),
                    expected.train.class_names(),
                    "{context}"
                );
                assert_eq!(loaded.train.len(), 23);
                assert_eq!(loaded.test.len(), 7);
                assert_eq!(loaded.train.split(), Split::Train);
                match kind {
                    DatasetKind::Cifar10 => {
                        assert_eq!(loaded.train.num_classes(), 10);
                        assert!(loaded.train.coarse_labels().is_none());
                    }
                    DatasetKind::Cifar100 => {
                        assert_eq!(loaded.train.num_classes(), 100);
                        assert_eq!(
                            loaded.train.coarse_class_names().map(<[String]>::len),
                            Some(20)
                        );
                        assert_eq!(
                            loaded.train.coarse_labels(),
                            expected.train.coarse_labels(),
                            "{context}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn cifar10_training_images_are_spread_over_five_files_in_order() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let spec = spec(DatasetKind::Cifar10, Layout::Binary, Packaging::Folder);
    let folder = synthetic::write_spec(&spec, dir.path()).expect("write");
    let record = 1 + 3072;
    let sizes: Vec<u64> = (1..=5)
        .map(|i| {
            std::fs::metadata(folder.join(format!("data_batch_{i}.bin")))
                .expect("batch file")
                .len()
        })
        .collect();
    // 23 images: 5, 5, 5, 4, 4.
    assert_eq!(sizes, [5, 5, 5, 4, 4].map(|n: u64| n * record));
    let expected = synthetic::generate(&spec).expect("generate");
    let second = std::fs::read(folder.join("data_batch_2.bin")).expect("read");
    // The first record of the second file is image 5: its label byte then its pixels.
    assert_eq!(u32::from(second[0]), expected.train.labels()[5]);
    assert_eq!(
        &second[1..record as usize],
        expected.train.image(5).expect("image 5")
    );
}

#[test]
fn binary_record_layout_is_label_then_red_green_blue_planes() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let folder = dir.path().join("cifar-100-binary");
    std::fs::create_dir_all(&folder).expect("mkdir");
    let mut record = vec![3u8, 42u8];
    record.extend((0..3072).map(|i| (i / 1024) as u8 * 100 + (i % 7) as u8));
    std::fs::write(folder.join("train.bin"), &record).expect("write");
    std::fs::write(folder.join("test.bin"), &record).expect("write");
    let fine: String = (0..100).map(|i| format!("fine{i}\n")).collect();
    let coarse: String = (0..20).map(|i| format!("coarse{i}\n")).collect();
    std::fs::write(folder.join("fine_label_names.txt"), fine).expect("write");
    std::fs::write(folder.join("coarse_label_names.txt"), coarse + "\n\n").expect("write");
    let data = load_kind(DatasetKind::Cifar100, &folder).expect("load");
    assert_eq!(data.train.labels(), &[42]);
    assert_eq!(data.train.coarse_labels(), Some(&[3u32][..]));
    assert_eq!(data.train.class_names()[42], "fine42");
    assert_eq!(
        data.train.coarse_class_names().map(<[String]>::len),
        Some(20)
    );
    let image = data.train.image(0).expect("image");
    assert_eq!(
        (image[0], image[1024], image[2048], image[2049]),
        (0, 100 + 2, 200 + 4, 200 + 5)
    );
    let means = data.train.channel_means();
    assert!(
        means[0] < 7.0 && (100.0..107.0).contains(&means[1]) && (200.0..207.0).contains(&means[2])
    );
}

#[test]
fn a_renamed_archive_is_recognised_by_its_top_folder() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let spec = spec(DatasetKind::Cifar100, Layout::Python, Packaging::Archive);
    let archive = synthetic::write_spec(&spec, dir.path()).expect("write");
    let renamed = dir.path().join("my-copy.tgz");
    std::fs::rename(&archive, &renamed).expect("rename");
    let source = detect(&renamed).expect("detect");
    assert_eq!(
        (source.kind, source.layout),
        (DatasetKind::Cifar100, Layout::Python)
    );
    assert_eq!(load(&renamed).expect("load").test.len(), 7);
}

#[test]
fn detection_failure_says_what_it_looked_for() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let error = load(dir.path()).expect_err("empty folder");
    let message = error.to_string();
    assert!(
        message.contains("cifar-10-batches-bin") && message.contains("cifar-100-python.tar.gz"),
        "{message}"
    );
    let error =
        load_kind(DatasetKind::Cifar10, Path::new("/nonexistent/cifar")).expect_err("missing path");
    assert!(error.to_string().contains("/nonexistent/cifar"), "{error}");
}

#[test]
fn synthetic_sets_with_chosen_class_counts_load() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let spec = SyntheticSpec {
        classes: 3,
        coarse_classes: 2,
        ..spec(DatasetKind::Cifar100, Layout::Binary, Packaging::Folder)
    };
    synthetic::write_spec(&spec, dir.path()).expect("write");
    let data = load(dir.path()).expect("load");
    assert_eq!(data.train.num_classes(), 3);
    assert_eq!(data.train.class_counts(), vec![8, 8, 7]);
    assert_eq!(data.test.class_counts(), vec![3, 2, 2]);
    assert!(data
        .train
        .coarse_labels()
        .expect("coarse")
        .iter()
        .all(|&c| c < 2));
}

#[test]
fn a_held_out_set_is_the_end_of_the_split_and_the_rest_is_its_start() {
    let spec = spec(DatasetKind::Cifar100, Layout::Binary, Packaging::Folder);
    let train = synthetic::generate(&spec).expect("generate").train;
    let (kept, held) = train.hold_out(5).expect("hold out 5 of 23");
    assert_eq!((kept.len(), held.len()), (18, 5));
    assert_eq!(kept.images(), &train.images()[..18 * 3072]);
    assert_eq!(held.images(), &train.images()[18 * 3072..]);
    assert_eq!(kept.labels(), &train.labels()[..18]);
    assert_eq!(held.labels(), &train.labels()[18..]);
    assert_eq!(
        held.coarse_labels().expect("coarse"),
        &train.coarse_labels().expect("coarse")[18..]
    );
    assert_eq!(held.class_names(), train.class_names());
    assert_eq!(held.split(), Split::Train);

    let (all, none) = train.hold_out(0).expect("nothing held out");
    assert_eq!((all.len(), none.len()), (23, 0));
    let error = train.hold_out(23).expect_err("nothing left to train on");
    assert!(
        error.to_string().contains("23 images") && error.to_string().contains("leaves nothing"),
        "{error}"
    );
}
