//! Helpers shared by the integration tests: sparse images and a running file-backed server.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::Path;

use cbt_csi::server::{FileMetadataService, Listen, RunningServer, ServerOptions, spawn};
use cbt_csi::{ClientConfig, Extent, MetadataClient, RetryPolicy};

/// Creates a sparse image of `size` bytes with `writes` applied.
pub fn image(dir: &Path, id: &str, size: u64, writes: &[(u64, Vec<u8>)]) {
    let f = std::fs::File::create(dir.join(id)).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in writes {
        f.write_all_at(data, *off).unwrap();
    }
}

/// Copies image `from` to `to` (same directory).
pub fn copy(dir: &Path, from: &str, to: &str) {
    std::fs::copy(dir.join(from), dir.join(to)).unwrap();
}

/// Writes bytes into an existing image.
pub fn write(dir: &Path, id: &str, off: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(id))
        .unwrap();
    f.write_all_at(data, off).unwrap();
}

/// Starts the file-backed server on a unix socket inside `sock_dir`.
pub async fn serve_unix(opts: ServerOptions, sock_dir: &Path) -> RunningServer {
    let svc = FileMetadataService::new(opts).unwrap();
    spawn(svc, Listen::Unix(sock_dir.join("csi.sock")), None)
        .await
        .unwrap()
}

/// A client with fast, deterministic retries.
pub async fn client(endpoint: &str) -> MetadataClient {
    MetadataClient::connect(ClientConfig::new(endpoint).with_retry(fast_retry()))
        .await
        .unwrap()
}

/// Retries with millisecond backoff and a fixed seed.
pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        initial_backoff: std::time::Duration::from_millis(2),
        max_backoff: std::time::Duration::from_millis(20),
        seed: Some(42),
    }
}

/// Shorthand extent.
pub fn ext(offset: u64, len: u64) -> Extent {
    Extent::new(offset, len)
}
