//! Proving a restored device holds a snapshot: every chunk of the target is read back and
//! compared with the manifest (the chunk's recorded hash for stored chunks: BLAKE3, keyed in an
//! encrypted repository; all zeros for zero chunks).
//!
//! Reads the target's bytes, never the repository's chunks, so it checks what landed on the
//! device, not what was downloaded. Memory: one chunk buffer, plus the chunk map:
//! [`verify_target_stored`] walks a format-2 map segment by segment (at most
//! [`READ_BACK_ENTRIES`] entries at once, whatever the volume size); [`verify_target`] and a
//! format-1 manifest hold the given map. Time: one sequential read of the volume's data.
//!
//! A regular file's holes are not read: a chunk that lies wholly in a hole reads as zeros, so
//! it is compared as zeros without reading it (found with the workspace's one `SEEK_DATA`
//! walker, [`cbt_core::extents`], about two `lseek` calls per data extent). A zero chunk there
//! matches; a stored chunk there mismatches exactly as the zeros read from it would. Block
//! devices (and files that cannot report holes) are read whole.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cbt_core::manifest::StoredManifest;
use cbt_core::{ChunkGeometry, ChunkRef, Manifest};
use futures::{Stream, TryStreamExt};
use serde::Serialize;

use crate::repo::{Codec, EntryGauge, HeldLeaf, RepoError, Repository};

/// Most chunk-map entries [`verify_target_stored`] holds at once for a format-2 map: it walks
/// the map as [`Repository::verify`] does (the leaves read ahead and the one being compared),
/// so the bound is [`crate::repo::VERIFY_MAP_ENTRIES`].
pub const READ_BACK_ENTRIES: u64 = crate::repo::VERIFY_MAP_ENTRIES;

/// Result of [`verify_target`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TargetVerifyReport {
    /// Bytes of the volume compared: those read back plus those of chunks that lie wholly in a
    /// hole of a regular-file target (compared as zeros without reading).
    pub bytes_checked: u64,
    /// Bytes read from the target (the rest of [`Self::bytes_checked`] was holes).
    pub bytes_read: u64,
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
        let reader = Reader::new(codec, File::open(&path)?, path)?;
        let buf = vec![0u8; usize::try_from(geometry.chunk_size()).map_err(std::io::Error::other)?];
        let scan = Scan {
            report: TargetVerifyReport::default(),
            buf,
            data: DataCursor::default(),
        };
        let Scan { mut report, .. } = reader
            .compare_range(&geometry, 0, geometry.chunk_count(), &entries, scan)
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
    let reader = Reader::new(repo.codec().clone(), file, path.clone()).map_err(|source| {
        RepoError::TargetIo {
            path,
            offset: None,
            source,
        }
    })?;
    let leaves = repo.stored_leaves(stored, &gauge)?;
    let mut report = reader
        .compare_in_order(stored.head().geometry, leaves)
        .await?;
    report.map_entries_peak = gauge.peak();
    Ok(report)
}

/// The target being read back, shared with the blocking tasks that read it.
#[derive(Clone)]
struct Reader {
    codec: Codec,
    file: Arc<File>,
    path: PathBuf,
    /// Holes are looked up only below this offset: the length of a regular file (a chunk past
    /// it is read, and a short target fails as it always did), 0 for anything else.
    holes_below: u64,
}

/// What one walk over the target carries from chunk to chunk (and from leaf to leaf).
struct Scan {
    report: TargetVerifyReport,
    /// One chunk's worth of buffer.
    buf: Vec<u8>,
    data: DataCursor,
}

/// The next data extent of the target at or after the last offset looked up: chunks are
/// looked at in ascending order, so one lookup answers for every chunk up to the extent's end.
#[derive(Debug, Default, Clone, Copy)]
enum DataCursor {
    /// Nothing looked up yet (or the last answer no longer covers the chunk asked about).
    #[default]
    Unknown,
    /// Data in `start..end`, and none between the last lookup and `start`.
    Data { start: u64, end: u64 },
    /// No data from the last lookup to the hole limit.
    NoMore,
}

impl Reader {
    fn new(codec: Codec, file: File, path: PathBuf) -> std::io::Result<Self> {
        let meta = file.metadata()?;
        let holes_below = if meta.file_type().is_file() {
            meta.len()
        } else {
            0
        };
        Ok(Self {
            codec,
            file: Arc::new(file),
            path,
            holes_below,
        })
    }

    /// Whether `offset..end` lies wholly in a hole of the target (never for block devices, nor
    /// for a range reaching past the end of the file). `offset` never goes backwards between
    /// calls with the same `cursor`.
    fn in_hole(&self, cursor: &mut DataCursor, offset: u64, end: u64) -> std::io::Result<bool> {
        if end > self.holes_below {
            return Ok(false);
        }
        loop {
            match *cursor {
                DataCursor::NoMore => return Ok(true),
                DataCursor::Data {
                    start,
                    end: data_end,
                } if offset < data_end => {
                    return Ok(end <= start);
                }
                _ => {
                    let limit = self.holes_below;
                    *cursor = match cbt_core::extents::next_data(&self.file, offset, limit)? {
                        None => DataCursor::NoMore,
                        Some(start) => {
                            let hole = cbt_core::extents::next_hole(&self.file, start, limit)?;
                            DataCursor::Data {
                                start,
                                // Always past `offset`, so the loop ends at the next turn.
                                end: hole.max(start + 1),
                            }
                        }
                    };
                }
            }
        }
    }

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
        let mut state = Scan {
            report: TargetVerifyReport::default(),
            buf: vec![0u8; chunk_size],
            data: DataCursor::default(),
        };
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
            state = tokio::task::spawn_blocking(move || {
                let entries = leaf.as_ref().map_or(&[][..], |l| &l.entries[..]);
                reader.compare_range(&geometry, cursor, upto, entries, state)
            })
            .await
            .map_err(|e| RepoError::Internal {
                message: format!("read-back task failed: {e}"),
            })??;
            if ended {
                return Ok(state.report);
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
        mut scan: Scan,
    ) -> crate::repo::Result<Scan> {
        let Scan { report, buf, data } = &mut scan;
        let mut stored = entries.iter().peekable();
        for index in from..upto {
            let len =
                usize::try_from(geometry.chunk_len(index)).map_err(|_| RepoError::Internal {
                    message: "chunk length exceeds the address space".into(),
                })?;
            let offset = geometry.chunk_offset(index);
            let io_err = |source| RepoError::TargetIo {
                path: self.path.clone(),
                offset: Some(offset),
                source,
            };
            let expected = stored.next_if(|(i, _)| *i == index).map(|(_, r)| r);
            let chunk = &mut buf[..len];
            let hole = self
                .in_hole(data, offset, offset + len as u64)
                .map_err(io_err)?;
            if hole {
                // Reads as zeros: a zero chunk matches unread; a stored chunk is judged on the
                // zeros a read would have returned.
                if expected.is_some() {
                    chunk.fill(0);
                }
            } else {
                self.file.read_exact_at(chunk, offset).map_err(io_err)?;
                report.bytes_read += len as u64;
            }
            report.bytes_checked += len as u64;
            let ok = match expected {
                None => hole || super::is_zero(chunk),
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
        Ok(scan)
    }
}
