//! Proving a restored device holds a snapshot: every chunk of the target is read back and
//! compared with the manifest (the chunk's recorded hash for stored chunks: BLAKE3, keyed in an
//! encrypted repository; all zeros for zero chunks).
//!
//! Reads the target only, never the repository, so it checks what landed on the device, not
//! what was downloaded. Memory: one chunk buffer. Time: one sequential read of the volume.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cbt_core::{ChunkState, Manifest};
use serde::Serialize;

use crate::repo::Codec;

/// Result of [`verify_target`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetVerifyReport {
    /// Bytes read back from the target.
    pub bytes_checked: u64,
    /// Chunks whose content matched.
    pub chunks_ok: u64,
    /// Chunk indexes whose content did not match (at most the first 32 are listed).
    pub mismatched: Vec<u64>,
    /// Number of mismatched chunks.
    pub mismatched_count: u64,
}

impl TargetVerifyReport {
    /// True when every chunk matched.
    pub fn is_ok(&self) -> bool {
        self.mismatched_count == 0
    }
}

/// Reads `target` back and compares every chunk with `manifest`, read from the repository
/// whose [`Codec`] is `codec` (`repo.codec()`: it knows how chunks are named).
///
/// # Errors
/// An I/O error opening or reading the target (a target shorter than the volume is an
/// `UnexpectedEof` error naming the offset).
pub async fn verify_target(
    codec: &Codec,
    manifest: &Manifest,
    target: &Path,
) -> std::io::Result<TargetVerifyReport> {
    let manifest = manifest.clone();
    let target = target.to_path_buf();
    let codec = codec.clone();
    tokio::task::spawn_blocking(move || verify_blocking(&codec, &manifest, &target))
        .await
        .map_err(std::io::Error::other)?
}

fn verify_blocking(
    codec: &Codec,
    manifest: &Manifest,
    target: &Path,
) -> std::io::Result<TargetVerifyReport> {
    let file = File::open(target)?;
    let geometry = *manifest.chunks.geometry();
    let mut buf = vec![0u8; usize::try_from(geometry.chunk_size()).map_err(std::io::Error::other)?];
    let mut report = TargetVerifyReport {
        bytes_checked: 0,
        chunks_ok: 0,
        mismatched: Vec::new(),
        mismatched_count: 0,
    };
    for index in 0..geometry.chunk_count() {
        let len = usize::try_from(geometry.chunk_len(index)).map_err(std::io::Error::other)?;
        let offset = geometry.chunk_offset(index);
        let chunk = &mut buf[..len];
        file.read_exact_at(chunk, offset).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("reading {} at offset {offset}: {e}", target.display()),
            )
        })?;
        report.bytes_checked += len as u64;
        let ok = match manifest.chunks.get(index) {
            ChunkState::Zero => chunk.iter().all(|b| *b == 0),
            ChunkState::Stored(r) => r.raw_len == len as u64 && codec.chunk_hash(chunk) == r.hash,
        };
        if ok {
            report.chunks_ok += 1;
        } else {
            report.mismatched_count += 1;
            if report.mismatched.len() < 32 {
                report.mismatched.push(index);
            }
        }
    }
    Ok(report)
}
