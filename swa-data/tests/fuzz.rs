//! Random and mutated bytes into every parser: each returns `Ok` or a typed error, never panics.

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use swa_data::synthetic::{self, SyntheticSpec};
use swa_data::{archive, binary, pickle, python, DatasetKind, Layout, Packaging};

/// A valid file: its data set, layout, official name and bytes.
type SeedFile = (DatasetKind, Layout, &'static str, Vec<u8>);

/// Valid files to mutate, of small synthetic sets in every layout.
fn seeds() -> &'static Vec<SeedFile> {
    static SEEDS: OnceLock<Vec<SeedFile>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut seeds = Vec::new();
        for kind in DatasetKind::ALL {
            for layout in [Layout::Binary, Layout::Python] {
                let spec = SyntheticSpec {
                    train_images: 3,
                    test_images: 2,
                    ..SyntheticSpec::new(kind, layout, Packaging::Folder, 0, 1)
                };
                let splits = synthetic::generate(&spec).expect("generate");
                for (name, bytes) in synthetic::encode(&spec, &splits).expect("encode") {
                    seeds.push((kind, layout, name, bytes));
                }
            }
        }
        seeds
    })
}

/// Pickles Python wrote (`tests/fixtures/make_fixtures.py`), in protocols 2 to 5.
const PYTHON_PICKLES: [&[u8]; 5] = [
    include_bytes!("fixtures/cifar100_train_2_images"),
    include_bytes!("fixtures/cifar10_batch_protocol_2"),
    include_bytes!("fixtures/cifar10_batch_protocol_3"),
    include_bytes!("fixtures/cifar10_batch_protocol_4"),
    include_bytes!("fixtures/cifar10_batch_protocol_5"),
];

fn archive_seed() -> &'static Vec<u8> {
    static ARCHIVE: OnceLock<Vec<u8>> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary folder");
        let spec = SyntheticSpec {
            train_images: 2,
            test_images: 1,
            ..SyntheticSpec::new(
                DatasetKind::Cifar10,
                Layout::Binary,
                Packaging::Archive,
                0,
                2,
            )
        };
        let path = synthetic::write_spec(&spec, dir.path()).expect("write");
        std::fs::read(path).expect("read archive")
    })
}

fn parse_everything(kind: DatasetKind, bytes: &[u8]) {
    let file = Path::new("fuzzed");
    let _ = binary::parse_records(kind, bytes, file, 10, Some(20));
    let _ = binary::parse_names(bytes, file);
    let _ = pickle::parse(bytes);
    let _ = python::parse_batch(kind, bytes, file, 100, Some(20));
    let _ = python::parse_meta(kind, bytes, file);
}

/// A mutation: overwrite, insert or delete bytes, or truncate.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for mutation in mutations {
        let len = bytes.len().max(1);
        match *mutation {
            Mutation::Set(i, b) => {
                if let Some(slot) = bytes.get_mut(i % len) {
                    *slot = b;
                }
            }
            Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
            Mutation::Delete(i) => {
                if !bytes.is_empty() {
                    bytes.remove(i % len);
                }
            }
            Mutation::Truncate(i) => bytes.truncate(i % len),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..8000)) {
        for kind in DatasetKind::ALL {
            parse_everything(kind, &bytes);
        }
        let _ = archive::read_members(Path::new("fuzzed.tar.gz"), bytes.as_slice(), &["a/b".to_owned()]);
    }

    #[test]
    fn random_opcode_streams_never_panic(body in proptest::collection::vec(
        prop_oneof![
            Just(b'('), Just(b']'), Just(b')'), Just(b'}'), Just(b'a'), Just(b'e'), Just(b'u'),
            Just(b's'), Just(b't'), Just(b'l'), Just(b'd'), Just(b'R'), Just(b'b'), Just(b'0'),
            Just(b'1'), Just(b'2'), Just(b'N'), Just(0x85u8), Just(0x86u8), Just(0x87u8), Just(0x88u8),
            Just(b'q'), Just(b'h'), Just(b'K'), Just(b'U'), Just(b'.'), any::<u8>(),
        ],
        0..400,
    )) {
        let mut stream = vec![0x80, 2];
        stream.extend(body);
        stream.push(b'.');
        let _ = pickle::parse(&stream);
        let _ = python::parse_batch(DatasetKind::Cifar100, &stream, Path::new("fuzzed"), 100, Some(20));
    }

    #[test]
    fn mutated_official_files_never_panic(
        which in any::<prop::sample::Index>(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let seeds = seeds();
        let (kind, layout, name, bytes) = &seeds[which.index(seeds.len())];
        let mut bytes = bytes.clone();
        mutate(&mut bytes, &mutations);
        let file = Path::new(name);
        match layout {
            Layout::Binary => {
                let _ = binary::parse_records(*kind, &bytes, file, 10, Some(20));
                let _ = binary::parse_names(&bytes, file);
            }
            Layout::Python => {
                let _ = python::parse_batch(*kind, &bytes, file, 100, Some(20));
                let _ = python::parse_meta(*kind, &bytes, file);
            }
        }
    }

    #[test]
    fn truncated_python_pickles_are_errors(which in 0..PYTHON_PICKLES.len(), cut in any::<prop::sample::Index>()) {
        let bytes = PYTHON_PICKLES[which];
        let len = cut.index(bytes.len());
        prop_assert!(pickle::parse(&bytes[..len]).is_err(), "{len} bytes of pickle {which}");
    }

    #[test]
    fn mutated_archives_never_panic(mutations in proptest::collection::vec(mutation(), 1..4)) {
        let mut bytes = archive_seed().clone();
        mutate(&mut bytes, &mutations);
        let wanted = vec![
            "cifar-10-batches-bin/data_batch_1.bin".to_owned(),
            "cifar-10-batches-bin/batches.meta.txt".to_owned(),
        ];
        let _ = archive::read_members(Path::new("fuzzed.tar.gz"), bytes.as_slice(), &wanted);
    }
}

#[test]
fn unmutated_seeds_parse() {
    // The mutation tests start from valid files; make sure they are.
    for (kind, layout, name, bytes) in seeds() {
        let file = Path::new(name);
        let ok = match layout {
            Layout::Binary if name.ends_with(".txt") => binary::parse_names(bytes, file).is_ok(),
            Layout::Binary => binary::parse_records(*kind, bytes, file, 100, Some(20)).is_ok(),
            Layout::Python if name.contains("meta") => {
                python::parse_meta(*kind, bytes, file).is_ok()
            }
            Layout::Python => python::parse_batch(*kind, bytes, file, 100, Some(20)).is_ok(),
        };
        assert!(ok, "{kind:?} {layout:?} {name}");
    }
    let wanted = vec!["cifar-10-batches-bin/test_batch.bin".to_owned()];
    let members =
        archive::read_members(Path::new("seed.tar.gz"), archive_seed().as_slice(), &wanted)
            .expect("archive");
    assert_eq!(members[&wanted[0]].len(), 3073);
}
