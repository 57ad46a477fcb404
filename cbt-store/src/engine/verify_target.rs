//! Proving a restored device holds a snapshot: every chunk of the target is read back and
//! compared with the manifest (the chunk's recorded hash for stored chunks: BLAKE3, keyed in an
//! encrypted repository; all zeros for zero chunks).
//!
//! Reads the target's bytes, never the repository's chunks, so it checks what landed on the
//! device, not what was downloaded. Memory: one chunk buffer, plus the chunk map:
//! [`verify_target_stored`] walks a format-2 map segment by segment (at most
//! [`READ_BACK_ENTRIES`] entries at once, whatever the volume size); [`verify_target`] and a
//! format-1 manifest hold the given map. Time: one sequential read of the volume.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cbt_core::manifest::{MapLocation, StoredManifest};
use cbt_core::maptree::{LEAF_SPAN, TreeShape};
use cbt_core::{ChunkGeometry, ChunkRef, Manifest};
use futures::{Stream, TryStreamExt};
use serde::Serialize;

use crate::repo::{Codec, EntryGauge, HeldLeaf, LEAF_WINDOW, RepoError, Repository};

/// Most chunk-map entries [`verify_target_stored`] holds at once for a format-2 map: the
/// leaves read ahead ([`LEAF_WINDOW`]) and the one being compared, each at most
/// [`LEAF_SPAN`] entries.
pub const READ_BACK_ENTRIES: u64 = (LEAF_WINDOW as u64 + 1) * LEAF_SPAN;

/// Result of [`verify_target`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TargetVerifyReport {
    /// Bytes read back from the target.
    pub bytes_checked: u64,
    /// Chunks whose content matched.
    pub chunks_ok: u64,
    /// Chunk indexes whose content did not match (at most the first 32 are listed).
    pub mismatched: Vec<u64>,
    /// Number of mismatched chunks.
    pub mismatched_count: u64,
    /// Most chunk-map entries held at once: at most [`READ_BACK_ENTRIES`] for a format-2
    /// map walked by [`verify_target_stored`], the whole map otherwise.
    pub map_entries_peak: u64,
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
/// Holds the whole map (and a copy of it while reading); for a stored snapshot,
/// [`verify_target_stored`] walks a format-2 map in a bounded window instead.
///
/// # Errors
/// An I/O error opening or reading the target (a target shorter than the volume is an
/// `UnexpectedEof` error naming the offset).
pub async fn verify_target(
    codec: &Codec,
    manifest: &Manifest,
    target: &Path,
) -> std::io::Result<TargetVerifyReport> {
    let geometry = *manifest.chunks.geometry();
    let entries: Vec<(u64, ChunkRef)> = manifest
        .chunks
        .iter_stored()
        .map(|(i, r)| (i, *r))
        .collect();
    let path = target.to_path_buf();
    let codec = codec.clone();
    tokio::task::spawn_blocking(move || {
        let reader = Reader {
            codec,
            file: Arc::new(File::open(&path)?),
            path,
        };
        let buf = vec![0u8; usize::try_from(geometry.chunk_size()).map_err(std::io::Error::other)?];
        let (mut report, _) = reader
            .compare_range(
                &geometry,
                0,
                geometry.chunk_count(),
                &entries,
                TargetVerifyReport::default(),
                buf,
            )
            .map_err(|e| match e {
                RepoError::TargetIo {
                    path,
                    offset,
                    source,
                } => std::io::Error::new(
                    source.kind(),
                    format!(
                        "reading {} at offset {}: {source}",
                        path.display(),
                        offset.unwrap_or(0)
                    ),
                ),
                other => std::io::Error::other(other.to_string()),
            })?;
        report.map_entries_peak = entries.len() as u64;
        Ok(report)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Reads `target` back and compares every chunk with the snapshot `stored` of `repo` (from
/// [`Repository::load_stored`]), as [`verify_target`] does, without holding a format-2 map
/// whole: its leaves are read in index order, at most [`READ_BACK_ENTRIES`] entries at once
/// ([`TargetVerifyReport::map_entries_peak`]), each leaf's references checked against the
/// volume's geometry before its chunks are compared. A format-1 manifest is already held
/// whole (its map is bounded by its own object) and is compared in place.
///
/// # Errors
/// [`RepoError::TargetIo`] opening or reading the target (a target shorter than the volume is
/// an `UnexpectedEof` naming the offset); a damaged or missing segment, or references that do
/// not fit the volume ([`RepoError::Manifest`], [`RepoError::Core`]); store errors.
pub async fn verify_target_stored(
    repo: &Repository,
    stored: &StoredManifest,
    target: &Path,
) -> crate::repo::Result<TargetVerifyReport> {
    let gauge = Arc::new(EntryGauge::default());
    let path = target.to_path_buf();
    let file = File::open(target).map_err(|source| RepoError::TargetIo {
        path: path.clone(),
        offset: None,
        source,
    })?;
    let reader = Reader {
        codec: repo.codec().clone(),
        file: Arc::new(file),
        path,
    };
    let mut report = match stored {
        StoredManifest::V1(m) => {
            gauge.hold_whole(m.chunks.stored_count());
            let geometry = *m.chunks.geometry();
            // Copies of a leaf's worth of entries at a time: the map itself is the caller's.
            let mut entries = m.chunks.iter_stored().map(|(i, r)| (i, *r)).peekable();
            let g = gauge.clone();
            let leaves = futures::stream::iter(std::iter::from_fn(move || {
                entries.peek()?;
                let leaf: Vec<_> = entries.by_ref().take(LEAF_SPAN as usize).collect();
                Some(Ok(HeldLeaf::new(leaf, g.clone())))
            }));
            reader.compare_in_order(geometry, leaves).await?
        }
        StoredManifest::V2(head) => {
            let MapLocation::Tree { root } = head.map else {
                return Err(RepoError::Internal {
                    message: "a format-2 head without a tree".into(),
                });
            };
            let leaves = repo.leaves_in_order(
                TreeShape::new(head.geometry),
                root,
                LEAF_WINDOW,
                gauge.clone(),
            );
            reader.compare_in_order(head.geometry, leaves).await?
        }
    };
    report.map_entries_peak = gauge.peak();
    Ok(report)
}

/// The target being read back, shared with the blocking tasks that read it.
#[derive(Clone)]
struct Reader {
    codec: Codec,
    file: Arc<File>,
    path: PathBuf,
}

impl Reader {
    /// Compares the whole volume with `leaves` (stored chunks in ascending index order, in
    /// leaves): each leaf, with the zero chunks before it, in one blocking task, then the zero
    /// chunks after the last one.
    async fn compare_in_order(
        &self,
        geometry: ChunkGeometry,
        leaves: impl Stream<Item = crate::repo::Result<HeldLeaf>>,
    ) -> crate::repo::Result<TargetVerifyReport> {
        let chunk_size =
            usize::try_from(geometry.chunk_size()).map_err(|_| RepoError::Internal {
                message: "chunk size exceeds the address space".into(),
            })?;
        let mut state = (TargetVerifyReport::default(), vec![0u8; chunk_size]);
        let mut cursor = 0u64;
        let mut leaves = std::pin::pin!(leaves);
        loop {
            let leaf = leaves.try_next().await?;
            let (upto, leaf) = match leaf {
                Some(leaf) => {
                    cbt_core::manifest::check_chunk_refs(
                        &geometry,
                        leaf.entries.iter().map(|(i, r)| (*i, r)),
                    )?;
                    let mut next = cursor;
                    for (i, _) in &leaf.entries {
                        if *i < next {
                            return Err(cbt_core::CoreError::ManifestInvalid {
                                reason: format!(
                                    "chunk {i} listed out of order in the map (after chunk {})",
                                    next.saturating_sub(1)
                                ),
                            }
                            .into());
                        }
                        next = i + 1;
                    }
                    (next, Some(leaf))
                }
                None => (geometry.chunk_count(), None),
            };
            let ended = leaf.is_none();
            let reader = self.clone();
            let (report, buf) = state;
            state = tokio::task::spawn_blocking(move || {
                let entries = leaf.as_ref().map_or(&[][..], |l| &l.entries[..]);
                reader.compare_range(&geometry, cursor, upto, entries, report, buf)
            })
            .await
            .map_err(|e| RepoError::Internal {
                message: format!("read-back task failed: {e}"),
            })??;
            if ended {
                return Ok(state.0);
            }
            cursor = upto;
        }
    }

    /// Compares chunks `from..upto`: those in `entries` (ascending, inside the range) with
    /// their references, the others with zeros.
    fn compare_range(
        &self,
        geometry: &ChunkGeometry,
        from: u64,
        upto: u64,
        entries: &[(u64, ChunkRef)],
        mut report: TargetVerifyReport,
        mut buf: Vec<u8>,
    ) -> crate::repo::Result<(TargetVerifyReport, Vec<u8>)> {
        let mut stored = entries.iter().peekable();
        for index in from..upto {
            let len =
                usize::try_from(geometry.chunk_len(index)).map_err(|_| RepoError::Internal {
                    message: "chunk length exceeds the address space".into(),
                })?;
            let offset = geometry.chunk_offset(index);
            let chunk = &mut buf[..len];
            self.file
                .read_exact_at(chunk, offset)
                .map_err(|source| RepoError::TargetIo {
                    path: self.path.clone(),
                    offset: Some(offset),
                    source,
                })?;
            report.bytes_checked += len as u64;
            let expected = stored.next_if(|(i, _)| *i == index).map(|(_, r)| r);
            let ok = match expected {
                None => super::is_zero(chunk),
                Some(r) => r.raw_len == len as u64 && self.codec.chunk_hash(chunk) == r.hash,
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
        Ok((report, buf))
    }
}
