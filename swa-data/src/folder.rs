//! Data sets in torchvision's `ImageFolder` layout: one sub-folder per class, classes in sorted
//! order, image files found recursively, and decoding of JPEG and PNG files to RGB bytes.
//!
//! The scan follows `torchvision.datasets.folder`: classes are the sub-folders of the root (symbolic
//! links followed) sorted by name; each class folder is walked recursively, folders in sorted order
//! of their path and files in sorted order of their name, and a file is an image when its name ends
//! (ignoring case) in one of [`IMAGE_EXTENSIONS`]. The index of a file is therefore the one
//! torchvision gives it, and its label the index of its class.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use image::error::{DecodingError, ImageFormatHint};
use image::{ImageError, ImageFormat, RgbImage};

use crate::error::{DataError, Result};

/// torchvision's `IMG_EXTENSIONS`: the file name endings an ImageFolder scan keeps (compared
/// case-insensitively). Only JPEG and PNG contents are decoded; a file of another format gives
/// [`DataError::Image`] when it is read.
pub const IMAGE_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// What to do with a file that cannot be read or decoded, or a class folder without images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadImages {
    /// Stop with the error (torchvision's behaviour).
    #[default]
    Fail,
    /// Leave the file (or empty class) out, and record it with its error in the skip report.
    Skip,
}

/// A file or folder left out under [`BadImages::Skip`], with the error it would have raised.
#[derive(Debug)]
pub struct SkippedImage {
    /// The image file, or the class folder for an empty class or an unreadable folder.
    pub path: PathBuf,
    /// Why it was left out.
    pub error: DataError,
}

/// One image of an [`ImageFolder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The image file.
    pub path: PathBuf,
    /// Index of its class in [`ImageFolder::classes`].
    pub label: u32,
}

/// The classes and image files of a folder in torchvision's `ImageFolder` layout.
#[derive(Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<Sample>,
    skipped: Vec<SkippedImage>,
}

impl ImageFolder {
    /// Scans `root`; an empty class folder or an unreadable folder is an error.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(root, BadImages::Fail)
    }

    /// Scans `root`. Under [`BadImages::Skip`] an empty class keeps its label (as torchvision's
    /// `allow_empty=True`) and is recorded in [`ImageFolder::skipped`], as is a folder that
    /// cannot be listed.
    ///
    /// Fails when `root` is not a folder, has no class sub-folder, or (under [`BadImages::Fail`])
    /// a class holds no image or a folder cannot be listed.
    pub fn open_with(root: impl AsRef<Path>, bad_images: BadImages) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let metadata = std::fs::metadata(&root).map_err(|e| DataError::io("reading", &root, e))?;
        if !metadata.is_dir() {
            return Err(DataError::NotImageFolder {
                path: root,
                problem: "it is a file, not a folder".into(),
            });
        }
        let mut skipped = Vec::new();
        let class_dirs = class_folders(&root)?;
        if class_dirs.is_empty() {
            return Err(DataError::NotImageFolder {
                path: root,
                problem: "it has no sub-folder".into(),
            });
        }
        let label_limit = u32::MAX as usize;
        if class_dirs.len() > label_limit {
            return Err(DataError::NotImageFolder {
                path: root,
                problem: format!("{} classes, more than labels can hold", class_dirs.len()),
            });
        }
        let mut classes = Vec::with_capacity(class_dirs.len());
        let mut samples = Vec::new();
        for (label, name) in class_dirs.iter().enumerate() {
            let folder = root.join(name);
            let class = name.to_string_lossy().into_owned();
            let before = samples.len();
            for path in image_files(&folder, bad_images, &mut skipped)? {
                samples.push(Sample {
                    path,
                    label: label as u32,
                });
            }
            if samples.len() == before {
                let error = DataError::EmptyClass {
                    folder: folder.clone(),
                    class: class.clone(),
                    extensions: IMAGE_EXTENSIONS.join(", "),
                };
                match bad_images {
                    BadImages::Fail => return Err(error),
                    BadImages::Skip => skipped.push(SkippedImage {
                        path: folder,
                        error,
                    }),
                }
            }
            classes.push(class);
        }
        Ok(ImageFolder {
            root,
            classes,
            samples,
            skipped,
        })
    }

    /// The folder scanned.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names (the sub-folders' names) in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// The image files in torchvision's order, with their labels.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Number of image files.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no image file was found.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Empty classes and unlistable folders left out by the scan under [`BadImages::Skip`].
    pub fn skipped(&self) -> &[SkippedImage] {
        &self.skipped
    }

    /// Decodes image `index` (see [`decode_image`]); `None` past the end.
    pub fn decode(&self, index: usize) -> Option<Result<RgbImage>> {
        self.samples
            .get(index)
            .map(|sample| decode_image(&sample.path))
    }
}

/// Reads a JPEG or PNG file (recognised by its contents, not its name) and converts it to 8-bit
/// RGB, as torchvision's loader does with `Image.convert("RGB")`: grey levels are repeated on
/// the three channels and an alpha channel is dropped.
pub fn decode_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io("reading", path, e))?;
    let image_error = |source| DataError::Image {
        file: path.to_path_buf(),
        source,
    };
    if image::guess_format(&bytes).ok() == Some(ImageFormat::Jpeg) && !jpeg_is_complete(&bytes) {
        return Err(image_error(ImageError::Decoding(DecodingError::new(
            ImageFormatHint::Exact(ImageFormat::Jpeg),
            "truncated: no end-of-image marker after the last scan",
        ))));
    }
    Ok(image::load_from_memory(&bytes)
        .map_err(image_error)?
        .into_rgb8())
}

/// Whether a JPEG stream's end-of-image marker follows its last start-of-scan marker.
///
/// The decoder fills the missing part of a truncated JPEG with grey rather than failing; Pillow
/// (and so torchvision) refuses such a file ("image file is truncated"). A marker byte pair cannot
/// occur inside entropy-coded data (a 0xFF there is followed by a stuffed 0x00 or a restart
/// marker), and an embedded thumbnail's markers precede the main image's scans, so a complete
/// file is one whose last scan is followed by an end-of-image marker.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_marker = |marker: u8| bytes.windows(2).rposition(|pair| pair == [0xFF, marker]);
    match (last_marker(0xDA), last_marker(0xD9)) {
        (Some(scan), Some(end)) => end > scan,
        // Without a scan the decoder reports the missing data itself.
        (None, _) => true,
        (Some(_), None) => false,
    }
}

/// Whether `name` ends in one of [`IMAGE_EXTENSIONS`], ignoring case.
pub fn has_image_extension(name: &str) -> bool {
    let lower = name.to_lowercase();
    IMAGE_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
}

/// The names of the sub-folders of `root` (symbolic links followed), in byte order of their names
/// (Python's order of `str` for UTF-8 names).
fn class_folders(root: &Path) -> Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| DataError::io("listing", root, e))? {
        let entry = entry.map_err(|e| DataError::io("listing", root, e))?;
        // `metadata` follows symbolic links, as Python's `DirEntry.is_dir()` does.
        if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
            names.push(entry.file_name());
        }
    }
    names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    Ok(names)
}

/// The image files under `class_folder` in torchvision's order: `sorted(os.walk(folder,
/// followlinks=True))`, i.e. folders by path, then the files of each folder by name.
///
/// A folder reached twice through symbolic links is walked once (Python would loop forever).
fn image_files(
    class_folder: &Path,
    bad_images: BadImages,
    skipped: &mut Vec<SkippedImage>,
) -> Result<Vec<PathBuf>> {
    let mut folders: Vec<(PathBuf, Vec<OsString>)> = Vec::new();
    let mut pending = vec![class_folder.to_path_buf()];
    let mut visited = HashSet::new();
    while let Some(folder) = pending.pop() {
        if let Ok(canonical) = std::fs::canonicalize(&folder) {
            if !visited.insert(canonical) {
                continue;
            }
        }
        let listing = match list_folder(&folder) {
            Ok(listing) => listing,
            Err(error) => match bad_images {
                BadImages::Fail => return Err(error),
                BadImages::Skip => {
                    skipped.push(SkippedImage {
                        path: folder,
                        error,
                    });
                    continue;
                }
            },
        };
        let mut files = Vec::new();
        for (name, is_dir) in listing {
            if is_dir {
                pending.push(folder.join(&name));
            } else if has_image_extension(&name.to_string_lossy()) {
                files.push(name);
            }
        }
        files.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        folders.push((folder, files));
    }
    folders.sort_by(|a, b| {
        a.0.as_os_str()
            .as_encoded_bytes()
            .cmp(b.0.as_os_str().as_encoded_bytes())
    });
    Ok(folders
        .into_iter()
        .flat_map(|(folder, files)| files.into_iter().map(move |name| folder.join(name)))
        .collect())
}

/// The entries of `folder`: name and whether it is a folder (symbolic links followed; a broken
/// link counts as a file, as in `os.walk`).
fn list_folder(folder: &Path) -> Result<Vec<(OsString, bool)>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(|e| DataError::io("listing", folder, e))? {
        let entry = entry.map_err(|e| DataError::io("listing", folder, e))?;
        let is_dir = std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir());
        entries.push((entry.file_name(), is_dir));
    }
    Ok(entries)
}
