//! Finding a data set on disk (folder, archive, or a parent of either) and loading it.

use std::path::{Path, PathBuf};

use crate::archive;
use crate::binary;
use crate::dataset::{CifarSplits, Dataset, DatasetParts};
use crate::error::{DataError, Result};
use crate::layout::{DatasetKind, Layout, OfficialFiles, Packaging, Split};
use crate::python;

/// Where a data set is and in which form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSource {
    /// Data set.
    pub kind: DatasetKind,
    /// Layout of its files.
    pub layout: Layout,
    /// Folder or archive.
    pub packaging: Packaging,
    /// The folder holding the files, or the archive.
    pub path: PathBuf,
}

/// The bytes of one file of a data set.
#[derive(Debug, Clone)]
pub struct RawFile {
    /// The official file name (`data_batch_1.bin`, `meta`, …).
    pub name: &'static str,
    /// Where it came from, for messages: the file, or `ARCHIVE/member`.
    pub path: PathBuf,
    /// Its contents.
    pub bytes: Vec<u8>,
}

/// The forms tried, most preferred first.
const FORMS: [(Layout, Packaging); 4] = [
    (Layout::Binary, Packaging::Folder),
    (Layout::Python, Packaging::Folder),
    (Layout::Binary, Packaging::Archive),
    (Layout::Python, Packaging::Archive),
];

/// Recognises the data set at `path`: an extracted official folder, an official archive, or a
/// folder containing either. Looks for both data sets.
pub fn detect(path: &Path) -> Result<DataSource> {
    detect_among(path, &DatasetKind::ALL)
}

/// Like [`detect`], but only for `kind`.
pub fn detect_kind(kind: DatasetKind, path: &Path) -> Result<DataSource> {
    detect_among(path, &[kind])
}

fn detect_among(path: &Path, kinds: &[DatasetKind]) -> Result<DataSource> {
    let expected = || {
        let mut names = Vec::new();
        for &kind in kinds {
            for (layout, _) in FORMS.iter().take(2) {
                let files = OfficialFiles::new(kind, *layout);
                names.push(files.folder().to_owned());
                names.push(files.archive().to_owned());
            }
        }
        format!(
            "expected one of {} (or a folder holding their files)",
            names.join(", ")
        )
    };
    if path.is_file() {
        return detect_archive(path, kinds).ok_or_else(|| DataError::NotFound {
            path: path.to_path_buf(),
            expected: expected(),
        });
    }
    if !path.is_dir() {
        return Err(DataError::NotFound {
            path: path.to_path_buf(),
            expected: format!("an existing file or folder; {}", expected()),
        });
    }
    // The folder itself holds the files?
    for &kind in kinds {
        for layout in [Layout::Binary, Layout::Python] {
            let files = OfficialFiles::new(kind, layout);
            let first = files.split_files(Split::Train)[0];
            let meta = files.meta_files()[0];
            if path.join(first).is_file() && path.join(meta).is_file() {
                return Ok(DataSource {
                    kind,
                    layout,
                    packaging: Packaging::Folder,
                    path: path.to_path_buf(),
                });
            }
        }
    }
    // A parent folder holding an official folder or archive.
    for (layout, packaging) in FORMS {
        for &kind in kinds {
            let files = OfficialFiles::new(kind, layout);
            let candidate = match packaging {
                Packaging::Folder => path.join(files.folder()),
                Packaging::Archive => path.join(files.archive()),
            };
            let present = match packaging {
                Packaging::Folder => candidate.is_dir(),
                Packaging::Archive => candidate.is_file(),
            };
            if present {
                return Ok(DataSource {
                    kind,
                    layout,
                    packaging,
                    path: candidate,
                });
            }
        }
    }
    Err(DataError::NotFound {
        path: path.to_path_buf(),
        expected: expected(),
    })
}

fn detect_archive(path: &Path, kinds: &[DatasetKind]) -> Option<DataSource> {
    let file_name = path.file_name()?.to_str()?;
    for &kind in kinds {
        for layout in [Layout::Binary, Layout::Python] {
            if OfficialFiles::new(kind, layout).archive() == file_name {
                return Some(DataSource {
                    kind,
                    layout,
                    packaging: Packaging::Archive,
                    path: path.to_path_buf(),
                });
            }
        }
    }
    // A renamed archive: recognise it by its top-level folder.
    let members = archive::list_members(path).ok()?;
    for &kind in kinds {
        for layout in [Layout::Binary, Layout::Python] {
            let folder = OfficialFiles::new(kind, layout).folder();
            if members.iter().any(|m| m.starts_with(&format!("{folder}/"))) {
                return Some(DataSource {
                    kind,
                    layout,
                    packaging: Packaging::Archive,
                    path: path.to_path_buf(),
                });
            }
        }
    }
    None
}

impl DataSource {
    /// The official file names of this source's data set and layout.
    pub fn files(&self) -> OfficialFiles {
        OfficialFiles::new(self.kind, self.layout)
    }

    /// Reads the bytes of every file the layout needs, in [`OfficialFiles::all_files`] order.
    pub fn read_raw(&self) -> Result<Vec<RawFile>> {
        let files = self.files();
        let names = files.all_files();
        match self.packaging {
            Packaging::Folder => names
                .into_iter()
                .map(|name| {
                    let path = self.path.join(name);
                    let bytes =
                        std::fs::read(&path).map_err(|e| DataError::io("reading", &path, e))?;
                    Ok(RawFile { name, path, bytes })
                })
                .collect(),
            Packaging::Archive => {
                let members: Vec<String> = names
                    .iter()
                    .map(|name| format!("{}/{name}", files.folder()))
                    .collect();
                let mut found = archive::read_members_from_file(&self.path, &members)?;
                Ok(names
                    .into_iter()
                    .zip(members)
                    .map(|(name, member)| RawFile {
                        name,
                        path: self.path.join(&member),
                        bytes: found.remove(&member).unwrap_or_default(),
                    })
                    .collect())
            }
        }
    }

    /// Loads both splits.
    pub fn load(&self) -> Result<CifarSplits> {
        let raw = self.read_raw()?;
        splits_from_raw(self, &raw)
    }
}

/// Class names from the metadata files: `(fine or only names, coarse names)`.
pub fn names_from_raw(
    source: &DataSource,
    raw: &[RawFile],
) -> Result<(Vec<String>, Option<Vec<String>>)> {
    let files = source.files();
    let meta = files.meta_files();
    let find = |name: &str| -> Result<&RawFile> {
        raw.iter()
            .find(|f| f.name == name)
            .ok_or_else(|| DataError::NotFound {
                path: source.path.join(name),
                expected: format!("the file {name}"),
            })
    };
    match source.layout {
        Layout::Binary => {
            let fine_file = find(meta[0])?;
            let fine = binary::parse_names(&fine_file.bytes, &fine_file.path)?;
            let coarse = match meta.get(1) {
                Some(name) => {
                    let coarse_file = find(name)?;
                    Some(binary::parse_names(&coarse_file.bytes, &coarse_file.path)?)
                }
                None => None,
            };
            Ok((fine, coarse))
        }
        Layout::Python => {
            let meta_file = find(meta[0])?;
            python::parse_meta(source.kind, &meta_file.bytes, &meta_file.path)
        }
    }
}

/// Decodes one data file (binary records or a pickled batch).
pub fn parse_file(
    source: &DataSource,
    file: &RawFile,
    classes: usize,
    coarse_classes: Option<usize>,
) -> Result<binary::BinaryRecords> {
    match source.layout {
        Layout::Binary => binary::parse_records(
            source.kind,
            &file.bytes,
            &file.path,
            classes,
            coarse_classes,
        ),
        Layout::Python => python::parse_batch(
            source.kind,
            &file.bytes,
            &file.path,
            classes,
            coarse_classes,
        ),
    }
}

/// Builds both splits from the raw files.
pub fn splits_from_raw(source: &DataSource, raw: &[RawFile]) -> Result<CifarSplits> {
    let (names, coarse_names) = names_from_raw(source, raw)?;
    let coarse_classes = coarse_names.as_ref().map(Vec::len);
    let split = |split: Split| -> Result<Dataset> {
        let mut parts = DatasetParts {
            class_names: names.clone(),
            coarse_class_names: coarse_names.clone(),
            coarse_labels: coarse_names.as_ref().map(|_| Vec::new()),
            ..DatasetParts::default()
        };
        for name in source.files().split_files(split) {
            let file = raw
                .iter()
                .find(|f| f.name == *name)
                .ok_or_else(|| DataError::NotFound {
                    path: source.path.join(name),
                    expected: format!("the file {name}"),
                })?;
            let records = parse_file(source, file, names.len(), coarse_classes)?;
            parts.images.extend_from_slice(&records.images);
            parts.labels.extend_from_slice(&records.labels);
            if let (Some(all), Some(coarse)) = (parts.coarse_labels.as_mut(), records.coarse_labels)
            {
                all.extend_from_slice(&coarse);
            }
        }
        Dataset::new(source.kind, split, parts, source.path.clone())
    };
    Ok(CifarSplits {
        train: split(Split::Train)?,
        test: split(Split::Test)?,
    })
}

/// Recognises and loads the data set at `path` (see [`detect`]).
pub fn load(path: &Path) -> Result<CifarSplits> {
    detect(path)?.load()
}

/// Recognises and loads `kind` at `path` (see [`detect_kind`]).
pub fn load_kind(kind: DatasetKind, path: &Path) -> Result<CifarSplits> {
    detect_kind(kind, path)?.load()
}
