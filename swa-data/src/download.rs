//! Download of the official archives into a cache folder, checked by MD5 and written atomically.
//!
//! A download streams into a temporary file in the destination folder while its MD5 is computed;
//! only a complete file with the right MD5 is renamed into place. Failures (network, checksum,
//! interruption) leave no partial file, and leftovers of a killed process are removed by the next
//! attempt.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};

use crate::error::{DataError, Result, Unavailable};
use crate::layout::{DatasetKind, Layout, OfficialFiles};
use crate::source;

/// Where the official archives are published.
pub const DEFAULT_BASE_URL: &str = "https://www.cs.toronto.edu/~kriz";
/// Environment variable overriding [`DEFAULT_BASE_URL`] (a mirror, or a local server in tests).
pub const BASE_URL_ENV: &str = "SWA_DATA_URL";
/// Environment variable naming the data folder.
pub const DATA_DIR_ENV: &str = "SWA_DATA_DIR";

/// The data folder: `$SWA_DATA_DIR`, else `swa-rs/data` under the platform cache folder.
pub fn default_data_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(DATA_DIR_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir()
        .map(|cache| cache.join("swa-rs").join("data"))
        .ok_or(DataError::NoDataDir)
}

/// The base URL: `$SWA_DATA_URL`, else [`DEFAULT_BASE_URL`].
pub fn base_url() -> String {
    std::env::var(BASE_URL_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned())
}

/// MD5 of bytes, as lowercase hex.
pub fn md5_hex(bytes: &[u8]) -> String {
    hex(&Md5::digest(bytes))
}

/// MD5 of a file, as lowercase hex.
pub fn md5_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io("opening", path, e))?;
    let mut hasher = Md5::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| DataError::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes temporary files left by an interrupted download of `file_name` in `dir`.
fn remove_stale_parts(dir: &Path, file_name: &str) {
    let prefix = format!(".{file_name}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".part") {
            // Best effort: a file another process still writes stays, and is renamed or removed by it.
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Downloads `url` to `dir/file_name`, checking its MD5 against `expected_md5` (hex).
///
/// Shows a progress bar on a terminal when `progress` is set. On any failure nothing is left in
/// `dir` but what was there before.
pub fn download_file(
    url: &str,
    dir: &Path,
    file_name: &str,
    expected_md5: &str,
    progress: bool,
) -> Result<PathBuf> {
    let failed = |message: String| DataError::Download {
        url: url.to_owned(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| DataError::io("creating", dir, e))?;
    remove_stale_parts(dir, file_name);
    let destination = dir.join(file_name);

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| failed(e.to_string()))?;
    let expected_len = response.body().content_length();

    let mut part = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(|e| DataError::io("creating a temporary file in", dir, e))?;
    let bar = if progress {
        indicatif::ProgressBar::new(expected_len.unwrap_or(0))
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(file_name.to_owned());

    let mut hasher = Md5::new();
    let mut reader = response.body_mut().as_reader();
    let mut buffer = vec![0u8; 1 << 16];
    let mut received: u64 = 0;
    loop {
        let n = reader
            .read(&mut buffer)
            .map_err(|e| failed(format!("connection failed after {received} bytes: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        part.write_all(&buffer[..n])
            .map_err(|e| DataError::io("writing", part.path(), e))?;
        received += n as u64;
        bar.set_position(received);
    }
    bar.finish_and_clear();
    if let Some(expected_len) = expected_len {
        if received != expected_len {
            return Err(failed(format!(
                "received {received} bytes, the server announced {expected_len}"
            )));
        }
    }
    let actual = hex(&hasher.finalize());
    if !actual.eq_ignore_ascii_case(expected_md5) {
        return Err(DataError::ChecksumMismatch {
            file: destination,
            expected: expected_md5.to_owned(),
            actual,
        });
    }
    part.as_file()
        .sync_all()
        .map_err(|e| DataError::io("syncing", part.path(), e))?;
    part.persist(&destination)
        .map_err(|e| DataError::io("renaming into", &destination, e.error))?;
    Ok(destination)
}

/// Downloads the official archive of `kind` in `layout` from `base_url` into `dir`.
pub fn download(
    kind: DatasetKind,
    layout: Layout,
    dir: &Path,
    base_url: &str,
    progress: bool,
) -> Result<PathBuf> {
    let files = OfficialFiles::new(kind, layout);
    let url = format!("{}/{}", base_url.trim_end_matches('/'), files.archive());
    download_file(&url, dir, files.archive(), files.archive_md5(), progress)
}

/// Finds `kind` in `data_dir` (default: [`default_data_dir`]) in any official form, or downloads
/// the binary archive there from [`base_url`]. Returns the folder or archive to load.
pub fn ensure_available(kind: DatasetKind, data_dir: Option<&Path>) -> Result<PathBuf> {
    ensure_available_from(kind, data_dir, &base_url(), true)
}

/// [`ensure_available`] with an explicit base URL and progress choice.
pub fn ensure_available_from(
    kind: DatasetKind,
    data_dir: Option<&Path>,
    base_url: &str,
    progress: bool,
) -> Result<PathBuf> {
    let dir = match data_dir {
        Some(dir) => dir.to_path_buf(),
        None => default_data_dir()?,
    };
    if let Ok(found) = source::detect_kind(kind, &dir) {
        return Ok(found.path);
    }
    let files = OfficialFiles::new(kind, Layout::Binary);
    let url = format!("{}/{}", base_url.trim_end_matches('/'), files.archive());
    download(kind, Layout::Binary, &dir, base_url, progress).map_err(|error| {
        DataError::Unavailable(Box::new(Unavailable {
            kind,
            dir: dir.clone(),
            url,
            reason: error.to_string(),
        }))
    })
}
