//! Reading members straight out of the official `.tar.gz` archives, without extracting them.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Largest member read into memory; the largest official member is about 155 MB.
const MAX_MEMBER_BYTES: u64 = 512 * 1024 * 1024;

/// Reads the members named in `wanted` (paths inside the archive, such as
/// `cifar-10-batches-bin/data_batch_1.bin`) from a gzip-compressed tar stream.
///
/// `archive` names the archive in errors. Every wanted member must be present.
pub fn read_members(
    archive: &Path,
    stream: impl Read,
    wanted: &[String],
) -> Result<HashMap<String, Vec<u8>>> {
    let corrupt = |message: String| DataError::Archive {
        archive: archive.to_path_buf(),
        message,
    };
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(stream));
    let mut found: HashMap<String, Vec<u8>> = HashMap::new();
    let entries = tar.entries().map_err(|e| corrupt(e.to_string()))?;
    for entry in entries {
        let entry = entry.map_err(|e| corrupt(e.to_string()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(|e| corrupt(e.to_string()))?;
        let name = normalise(&path);
        if !wanted.contains(&name) || found.contains_key(&name) {
            continue;
        }
        let declared = entry.header().size().map_err(|e| corrupt(e.to_string()))?;
        if declared > MAX_MEMBER_BYTES {
            return Err(corrupt(format!(
                "member '{name}' declares {declared} bytes, more than the {MAX_MEMBER_BYTES} accepted"
            )));
        }
        // The header is not trusted for the allocation: the data must arrive first.
        let mut bytes = Vec::with_capacity(declared.min(1 << 26) as usize);
        entry
            .take(MAX_MEMBER_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| corrupt(format!("member '{name}': {e}")))?;
        if bytes.len() as u64 != declared {
            return Err(corrupt(format!(
                "member '{name}' has {} bytes, its header declares {declared}",
                bytes.len()
            )));
        }
        found.insert(name, bytes);
        if found.len() == wanted.len() {
            break;
        }
    }
    if let Some(missing) = wanted.iter().find(|name| !found.contains_key(*name)) {
        return Err(DataError::MissingMember {
            archive: archive.to_path_buf(),
            member: missing.clone(),
        });
    }
    Ok(found)
}

/// Reads members from an archive file.
pub fn read_members_from_file(
    archive: &Path,
    wanted: &[String],
) -> Result<HashMap<String, Vec<u8>>> {
    let file = std::fs::File::open(archive).map_err(|e| DataError::io("opening", archive, e))?;
    read_members(
        archive,
        std::io::BufReader::with_capacity(1 << 20, file),
        wanted,
    )
}

/// Lists the regular-file members of an archive (normalised paths).
pub fn list_members(archive: &Path) -> Result<Vec<String>> {
    let corrupt = |message: String| DataError::Archive {
        archive: archive.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(archive).map_err(|e| DataError::io("opening", archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut names = Vec::new();
    for entry in tar.entries().map_err(|e| corrupt(e.to_string()))? {
        let entry = entry.map_err(|e| corrupt(e.to_string()))?;
        if entry.header().entry_type().is_file() {
            let path = entry.path().map_err(|e| corrupt(e.to_string()))?;
            names.push(normalise(&path));
        }
    }
    Ok(names)
}

fn normalise(path: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for component in path.components() {
        if let std::path::Component::Normal(part) = component {
            parts.push(part.to_string_lossy().into_owned());
        }
    }
    parts.join("/")
}

/// Writes a `.tar.gz` holding `members` (path inside the archive, bytes) in order.
pub fn write_archive(path: &Path, members: &[(String, Vec<u8>)]) -> Result<PathBuf> {
    let file = std::fs::File::create(path).map_err(|e| DataError::io("creating", path, e))?;
    let encoder = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(0);
        builder
            .append_data(&mut header, name, bytes.as_slice())
            .map_err(|e| DataError::io("writing", path, e))?;
    }
    let encoder = builder
        .into_inner()
        .map_err(|e| DataError::io("writing", path, e))?;
    encoder
        .finish()
        .map_err(|e| DataError::io("writing", path, e))?;
    Ok(path.to_path_buf())
}
