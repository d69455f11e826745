//! Downloads from a small HTTP server on 127.0.0.1 serving a synthetic archive: success, checksum
//! mismatch, a connection cut part-way, and no server at all. Nothing partial may be left behind.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use swa_data::synthetic::{self, SyntheticSpec};
use swa_data::{
    download_file, ensure_available_from, md5_hex, DataError, DatasetKind, Layout, Packaging,
};

const ARCHIVE: &str = "cifar-10-binary.tar.gz";

fn synthetic_archive() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temporary folder");
    let spec = SyntheticSpec {
        train_images: 60,
        test_images: 10,
        ..SyntheticSpec::new(
            DatasetKind::Cifar10,
            Layout::Binary,
            Packaging::Archive,
            0,
            8,
        )
    };
    let path = synthetic::write_spec(&spec, dir.path()).expect("write archive");
    std::fs::read(path).expect("read archive")
}

/// Serves `body` at `/ok/<name>` and, at `/cut/<name>`, announces the full length but closes after
/// half of it. Handles at most `connections` requests, then its thread ends.
fn serve(body: Vec<u8>, connections: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let address = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let Ok(stream) = stream else { continue };
            let _ = respond(stream, &body);
        }
    });
    format!("http://{address}")
}

fn respond(mut stream: TcpStream, body: &[u8]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let head = |status: &str, len: usize| {
        format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nContent-Type: application/gzip\r\nConnection: close\r\n\r\n")
    };
    if path.starts_with("/ok/") {
        stream.write_all(head("200 OK", body.len()).as_bytes())?;
        stream.write_all(body)?;
    } else if path.starts_with("/cut/") {
        stream.write_all(head("200 OK", body.len()).as_bytes())?;
        stream.write_all(&body[..body.len() / 2])?;
    } else {
        stream.write_all(head("404 Not Found", 0).as_bytes())?;
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Both)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_complete_download_with_the_right_checksum_is_kept_and_loads() {
    let body = synthetic_archive();
    let md5 = md5_hex(&body);
    let base = serve(body.clone(), 4);
    let dir = tempfile::tempdir().expect("temporary folder");
    // A leftover of an interrupted earlier run is cleaned up.
    std::fs::write(
        dir.path().join(format!(".{ARCHIVE}.x1y2z3.part")),
        b"partial",
    )
    .expect("write leftover");
    let path = download_file(
        &format!("{base}/ok/{ARCHIVE}"),
        dir.path(),
        ARCHIVE,
        &md5,
        false,
    )
    .expect("download");
    assert_eq!(path, dir.path().join(ARCHIVE));
    assert_eq!(std::fs::read(&path).expect("read"), body);
    assert_eq!(entries(dir.path()), vec![ARCHIVE.to_owned()]);
    let data = swa_data::load(dir.path()).expect("load downloaded archive");
    assert_eq!((data.train.len(), data.test.len()), (60, 10));
}

#[test]
fn a_checksum_mismatch_leaves_nothing() {
    let base = serve(synthetic_archive(), 4);
    let dir = tempfile::tempdir().expect("temporary folder");
    let official = "c32a1d4ab5d03f1284b67883e8d87530";
    let error = download_file(
        &format!("{base}/ok/{ARCHIVE}"),
        dir.path(),
        ARCHIVE,
        official,
        false,
    )
    .expect_err("synthetic archive cannot have the official checksum");
    match &error {
        DataError::ChecksumMismatch { file, expected, .. } => {
            assert_eq!(file, &dir.path().join(ARCHIVE));
            assert_eq!(expected, official);
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn a_connection_cut_part_way_leaves_nothing_and_a_retry_succeeds() {
    let body = synthetic_archive();
    let md5 = md5_hex(&body);
    let base = serve(body, 4);
    let dir = tempfile::tempdir().expect("temporary folder");
    let error = download_file(
        &format!("{base}/cut/{ARCHIVE}"),
        dir.path(),
        ARCHIVE,
        &md5,
        false,
    )
    .expect_err("cut connection");
    assert!(
        matches!(&error, DataError::Download { url, .. } if url.contains("/cut/")),
        "{error:?}"
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new());
    download_file(
        &format!("{base}/ok/{ARCHIVE}"),
        dir.path(),
        ARCHIVE,
        &md5,
        false,
    )
    .expect("retry");
    assert_eq!(entries(dir.path()), vec![ARCHIVE.to_owned()]);
}

#[test]
fn http_errors_are_download_errors() {
    let base = serve(Vec::new(), 2);
    let dir = tempfile::tempdir().expect("temporary folder");
    let error = download_file(
        &format!("{base}/missing/{ARCHIVE}"),
        dir.path(),
        ARCHIVE,
        "00",
        false,
    )
    .expect_err("404");
    assert!(error.to_string().contains("404"), "{error}");
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn without_a_server_the_error_says_where_to_put_the_archive_and_how_to_verify_it() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    let dir = tempfile::tempdir().expect("temporary folder");
    let error = ensure_available_from(
        DatasetKind::Cifar10,
        Some(dir.path()),
        &format!("http://127.0.0.1:{port}"),
        false,
    )
    .expect_err("nothing to download from");
    let message = error.to_string();
    assert!(matches!(error, DataError::Unavailable(_)));
    assert!(message.contains("cifar-10-binary.tar.gz"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("cargo xtask data check cifar10 --data"),
        "{message}"
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn local_data_is_found_without_downloading() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let written = synthetic::write(
        DatasetKind::Cifar100,
        Layout::Python,
        Packaging::Folder,
        dir.path(),
        3,
        1,
    )
    .expect("write");
    let found = ensure_available_from(
        DatasetKind::Cifar100,
        Some(dir.path()),
        "http://127.0.0.1:9",
        false,
    )
    .expect("found locally");
    assert_eq!(found, written);
}

#[test]
fn ensure_available_downloads_the_binary_archive_from_the_base_url() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let base = serve(synthetic_archive(), 2);
    // The served archive is not the official one, so the checksum stops it, and nothing remains.
    let error = ensure_available_from(
        DatasetKind::Cifar10,
        Some(dir.path()),
        &format!("{base}/ok"),
        false,
    )
    .expect_err("checksum");
    assert!(
        error.to_string().contains("MD5 checksum mismatch"),
        "{error}"
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}
