//! The versioned snapshot manifest: the complete chunk map of one backed-up snapshot.
//!
//! Owns the manifest's in-memory model, its invariants and its JSON wire form. A manifest maps
//! the *whole* volume (every chunk index is either zero/unallocated or a reference to one stored
//! chunk), so restoring a snapshot reads one manifest and never walks a chain; the parent link
//! is lineage only. An incremental manifest is its parent's map with the changed chunks
//! replaced ([`Manifest::derive_child`]).
//!
//! # Size bound
//! Only stored chunks are serialized, one JSON array `[index,"hash",stored_size,crc32c,raw_len]`
//! of about 100 bytes each. At the default 4 MiB chunk size a fully allocated 1 TiB volume has
//! 262,144 entries: 26.8 MB of JSON, 12.7 MB once the repository compresses it with zstd
//! (measured; the 32-byte hashes are incompressible). In memory an entry costs about 70 bytes (map node
//! included), about 18 MiB per fully allocated TiB; zero chunks cost nothing.
//!
//! # Trust
//! A manifest read from storage is untrusted input. Every decoded manifest passes
//! [`Manifest::validate`] before anyone sees it: indices inside the volume, raw lengths that
//! match the chunk geometry, stored sizes a chunk object of that raw length can have, one raw
//! length / stored size / checksum per content hash, and totals that fit in 64 bits. A restore
//! planned from a valid manifest therefore never addresses a byte outside `[0, volume_size)`.
//!
//! Decoding is bounded by the geometry the manifest declares, not by what the bytes inflate
//! to: [`Manifest::from_json_reader`] reads the header fields first (the writer puts
//! `format_version`, `volume_size` and `chunk_size` before the chunk list, and v1 readers rely
//! on that order), then accepts at most [`max_json_len`] bytes for that many chunks
//! ([`MAX_METADATA_JSON`] for everything but the entries, [`MAX_CHUNK_ENTRY_JSON`] per entry).
//! Before the geometry is known only [`MAX_METADATA_JSON`] bytes are read.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, BufReader, Read};
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::maptree::SegmentRef;
use crate::names::{SnapshotName, VolumeName, validate_name};
use crate::ranges::{ChunkGeometry, ChunkSet, RangeSet};
use crate::time::Timestamp;

/// The manifest format version this build writes (2: a head plus a segment tree, see
/// [`crate::maptree`]).
pub const MANIFEST_FORMAT_VERSION: u32 = 2;
/// The oldest manifest format version this build reads (1: one JSON document with the whole
/// chunk map).
pub const MIN_MANIFEST_FORMAT_VERSION: u32 = 1;
/// Format version of the single-document JSON manifest ([`Manifest::to_json`]).
pub const MANIFEST_V1: u32 = 1;
/// Most bytes of a format-2 manifest head's JSON: the metadata budget plus the map reference.
pub const MAX_HEAD_JSON: u64 = MAX_METADATA_JSON + 1024;

/// Most framing bytes (header + trailer) a stored chunk object may add to its raw bytes; a
/// recorded stored size above `raw_len + MAX_CHUNK_FRAMING` is rejected. `cbt-store`'s chunk
/// format uses 52 and checks at compile time that it stays below this.
pub const MAX_CHUNK_FRAMING: u64 = 256;
/// Most bytes of manifest JSON besides the chunk entries (names, source, labels, stats).
/// [`Manifest::to_json`] refuses to write more, so every manifest written is readable.
pub const MAX_METADATA_JSON: u64 = 1 << 20;
/// Most bytes one compact chunk entry can take:
/// `[<u64>,"<64 hex>",<u64>,<u32>,<u64>],` is at most 143 bytes.
pub const MAX_CHUNK_ENTRY_JSON: u64 = 144;

/// The most bytes of JSON a manifest of `geometry` can need (saturating).
pub fn max_json_len(geometry: &ChunkGeometry) -> u64 {
    MAX_METADATA_JSON.saturating_add(geometry.chunk_count().saturating_mul(MAX_CHUNK_ENTRY_JSON))
}

/// A 32-byte content hash (BLAKE3 of the chunk's raw bytes) that names a stored chunk.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }

    /// Parses 64 lowercase hex digits.
    ///
    /// # Errors
    /// [`CoreError::InvalidHash`] for anything else.
    pub fn from_hex(s: &str) -> Result<Self, CoreError> {
        let bad = || CoreError::InvalidHash {
            value: s.chars().take(80).collect(),
        };
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(bad());
        }
        let nib = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            let hi = nib(b[2 * i]).ok_or_else(bad)?;
            let lo = nib(b[2 * i + 1]).ok_or_else(bad)?;
            *o = (hi << 4) | lo;
        }
        Ok(ChunkHash(out))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.to_hex())
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ChunkHash::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// Where one chunk's bytes are stored and how to check them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    /// BLAKE3 of the raw bytes; also the chunk object's name.
    pub hash: ChunkHash,
    /// Size of the stored object in bytes (header + payload + trailer).
    pub stored_size: u64,
    /// crc32c of the raw (uncompressed) bytes.
    pub crc32c: u32,
    /// Number of raw bytes (the chunk size, or less for the volume's last chunk).
    pub raw_len: u64,
}

/// The content of one chunk index: all zeros / unallocated, or a stored chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkState {
    /// Reads as zeros; nothing is stored.
    Zero,
    /// Stored in the referenced chunk object.
    Stored(ChunkRef),
}

/// Maps every chunk index of a volume to its [`ChunkState`]; only stored chunks take memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMap {
    geometry: ChunkGeometry,
    stored: BTreeMap<u64, ChunkRef>,
}

impl ChunkMap {
    /// A map of `geometry` where every chunk is zero.
    pub fn new(geometry: ChunkGeometry) -> Self {
        ChunkMap {
            geometry,
            stored: BTreeMap::new(),
        }
    }

    /// The volume geometry this map covers.
    pub fn geometry(&self) -> &ChunkGeometry {
        &self.geometry
    }

    /// The state of chunk `index` (indices past the end read as zero).
    pub fn get(&self, index: u64) -> ChunkState {
        self.stored
            .get(&index)
            .map_or(ChunkState::Zero, |r| ChunkState::Stored(*r))
    }

    /// Sets chunk `index`, checking the index and the chunk's raw length against the geometry.
    ///
    /// # Errors
    /// [`CoreError::ChunkIndexOutOfRange`] or [`CoreError::ChunkLengthMismatch`].
    pub fn set(&mut self, index: u64, state: ChunkState) -> Result<(), CoreError> {
        let count = self.geometry.chunk_count();
        if index >= count {
            return Err(CoreError::ChunkIndexOutOfRange {
                index,
                chunk_count: count,
            });
        }
        match state {
            ChunkState::Zero => {
                self.stored.remove(&index);
            }
            ChunkState::Stored(r) => {
                let expected = self.geometry.chunk_len(index);
                if r.raw_len != expected {
                    return Err(CoreError::ChunkLengthMismatch {
                        index,
                        raw_len: r.raw_len,
                        expected,
                    });
                }
                self.stored.insert(index, r);
            }
        }
        Ok(())
    }

    /// Stored chunks in ascending index order.
    pub fn iter_stored(&self) -> impl Iterator<Item = (u64, &ChunkRef)> + '_ {
        self.stored.iter().map(|(i, r)| (*i, r))
    }

    /// Number of stored (non-zero) chunk indices.
    pub fn stored_count(&self) -> u64 {
        self.stored.len() as u64
    }

    /// Raw bytes held by stored chunks (the snapshot's allocated, non-zero data).
    ///
    /// Every stored index is distinct and its raw length is the geometry's, so the sum never
    /// exceeds the volume size; it saturates rather than trusting that.
    pub fn allocated_bytes(&self) -> u64 {
        self.stored
            .values()
            .fold(0u64, |acc, r| acc.saturating_add(r.raw_len))
    }

    /// Bytes of the volume that read as zero.
    pub fn zero_bytes(&self) -> u64 {
        self.geometry
            .volume_size()
            .saturating_sub(self.allocated_bytes())
    }

    /// Distinct stored chunks referenced by this map, with their stored sizes.
    pub fn unique_chunks(&self) -> BTreeMap<ChunkHash, u64> {
        self.stored
            .values()
            .map(|r| (r.hash, r.stored_size))
            .collect()
    }

    /// The byte ranges that hold stored data (merged across neighbouring chunks).
    pub fn allocated_ranges(&self) -> RangeSet {
        RangeSet::from_ranges(
            self.stored
                .keys()
                .filter_map(|i| self.geometry.chunk_range(*i).ok()),
        )
    }
}

/// Lineage link to the snapshot an incremental backup was based on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Name of the parent snapshot in this repository.
    pub snapshot: SnapshotName,
    /// Unique id of the parent (guards against a later snapshot reusing the name).
    pub snapshot_id: String,
}

/// Where the backed-up data came from on the Kubernetes/CSI side, kept so a chain of
/// incrementals survives the deletion of the base VolumeSnapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceInfo {
    /// CSI driver name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csi_driver: Option<String>,
    /// CSI snapshot handle of the backed-up snapshot (the next delta's base).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csi_snapshot_id: Option<String>,
    /// CSI snapshot handle the changed ranges were computed against, for incrementals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_csi_snapshot_id: Option<String>,
    /// Namespace of the PVC / VolumeSnapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the PVC backed up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,
    /// `metadata.uid` of that PVC (a re-created PVC of the same name has another).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pvc_uid: Option<String>,
    /// StorageClass of the PVC (a restore uses it unless told otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// Access modes of the PVC.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub access_modes: Vec<String>,
    /// Volume mode of the PVC (`Block`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
    /// Labels of the PVC.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pvc_labels: BTreeMap<String, String>,
    /// Name of the VolumeSnapshot read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_snapshot: Option<String>,
    /// Name of the VolumeGroupSnapshot the VolumeSnapshot was a member of: the backups
    /// recording the same group were cut at one instant (crash-consistent together).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot: Option<String>,
    /// Free-form description of a non-Kubernetes source (an image path, a device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Figures of the backup run that produced a manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackupStats {
    /// Bytes the ranges given to the backup cover, before alignment to chunks: what CBT
    /// reported as changed (incremental) or allocated (full; the whole volume when unknown).
    /// `bytes_read` over this is the chunk-alignment amplification.
    pub bytes_in_ranges: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes in chunks whose content differs from the parent's (all non-zero data for a full).
    pub bytes_changed: u64,
    /// Stored (compressed, framed) bytes uploaded.
    pub bytes_uploaded: u64,
    /// Raw bytes not uploaded because an identical chunk was already stored.
    pub bytes_deduplicated: u64,
    /// Raw bytes read that turned out to be all zeros (never stored).
    pub bytes_zero: u64,
    /// Chunks read from the source.
    pub chunks_read: u64,
    /// Chunk objects written.
    pub objects_written: u64,
    /// Chunks found already stored.
    pub chunks_deduplicated: u64,
    /// Chunks that were all zeros.
    pub chunks_zero: u64,
    /// Wall time of the run in milliseconds.
    pub wall_ms: u64,
}

/// Identity and metadata of a new snapshot, everything except its chunk map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Volume the snapshot belongs to.
    pub volume: VolumeName,
    /// Snapshot name, unique within the volume.
    pub snapshot: SnapshotName,
    /// Unique id (the engine derives it from a hash; must pass name validation).
    pub snapshot_id: String,
    /// Creation time, injected by the caller.
    pub created: Timestamp,
    /// Kubernetes/CSI provenance.
    pub source: SourceInfo,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Figures of the run.
    pub stats: BackupStats,
}

/// One backed-up snapshot: metadata plus the complete chunk map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Volume the snapshot belongs to.
    pub volume: VolumeName,
    /// Snapshot name, unique within the volume.
    pub snapshot: SnapshotName,
    /// Unique id of this snapshot.
    pub snapshot_id: String,
    /// Creation time.
    pub created: Timestamp,
    /// The complete chunk map (also fixes volume size and chunk size).
    pub chunks: ChunkMap,
    /// Lineage: the snapshot this one was derived from, if incremental.
    pub parent: Option<ParentRef>,
    /// Kubernetes/CSI provenance.
    pub source: SourceInfo,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Figures of the run that produced it.
    pub stats: BackupStats,
}

impl Manifest {
    /// Assembles a manifest from its metadata and a complete chunk map, and validates it.
    ///
    /// # Errors
    /// [`CoreError::InvalidName`] if the snapshot id is not a valid name; any error of
    /// [`Manifest::validate`].
    pub fn new(
        meta: SnapshotMeta,
        chunks: ChunkMap,
        parent: Option<ParentRef>,
    ) -> Result<Self, CoreError> {
        validate_name("snapshot id", &meta.snapshot_id)?;
        let m = Manifest {
            volume: meta.volume,
            snapshot: meta.snapshot,
            snapshot_id: meta.snapshot_id,
            created: meta.created,
            chunks,
            parent,
            source: meta.source,
            labels: meta.labels,
            stats: meta.stats,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks everything a reader relies on, so that a manifest from storage can be used
    /// without further checks: every stored index lies inside the volume with the raw length
    /// the geometry gives it; every stored size is one a chunk object of that raw length can
    /// have (`1..=raw_len + MAX_CHUNK_FRAMING`); every reference to one content hash records the
    /// same raw length, stored size and checksum; and the sums callers take (allocated bytes,
    /// stored bytes of the distinct chunks) fit in 64 bits.
    ///
    /// Every constructor and decoder calls it; it costs one pass and a table of the distinct
    /// chunks (about 50 bytes each), freed on return.
    ///
    /// # Errors
    /// [`CoreError::ChunkIndexOutOfRange`], [`CoreError::ChunkLengthMismatch`],
    /// [`CoreError::StoredSizeOutOfBounds`], [`CoreError::ConflictingChunkRefs`],
    /// [`CoreError::ManifestInvalid`] for totals that overflow, [`CoreError::InvalidName`].
    pub fn validate(&self) -> Result<(), CoreError> {
        validate_name("snapshot id", &self.snapshot_id)?;
        check_chunk_refs(self.chunks.geometry(), self.chunks.iter_stored())
    }

    /// Builds an incremental manifest: the parent's map, resized to `volume_size`, with
    /// `changes` applied. Chunks not in `changes` keep the parent's state.
    ///
    /// When the size changed, the chunk that was the parent's short last chunk (or becomes the
    /// child's) no longer has the same length; it must be among `changes`
    /// ([`crate::plan::BackupPlan::incremental`] always includes it).
    ///
    /// # Errors
    /// [`CoreError::IncompatibleParent`] for another volume or a stale boundary chunk;
    /// [`CoreError::ChunkIndexOutOfRange`] / [`CoreError::ChunkLengthMismatch`] for bad changes.
    pub fn derive_child<I>(
        parent: &Manifest,
        meta: SnapshotMeta,
        volume_size: u64,
        changes: I,
    ) -> Result<Manifest, CoreError>
    where
        I: IntoIterator<Item = (u64, ChunkState)>,
    {
        let incompatible = |reason: String| CoreError::IncompatibleParent {
            parent: parent.snapshot.to_string(),
            reason,
        };
        if parent.volume != meta.volume {
            return Err(incompatible(format!(
                "parent belongs to volume {:?}, not {:?}",
                parent.volume.as_str(),
                meta.volume.as_str()
            )));
        }
        let geometry = ChunkGeometry::new(volume_size, parent.chunks.geometry().chunk_size())?;
        let mut map = ChunkMap::new(geometry);
        // Changed indices kept as runs: ascending input (what the engine passes) costs one
        // range per run of neighbouring chunks, not a set entry per chunk.
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        for (index, state) in changes {
            map.set(index, state)?;
            match runs.last_mut() {
                Some(last) if last.end == index => last.end += 1,
                // `set` accepted the index, so it is below the chunk count and `+ 1` fits.
                _ => runs.push(index..index + 1),
            }
        }
        let changed = ChunkSet::from_runs(runs);
        let count = geometry.chunk_count();
        for (index, r) in parent.chunks.iter_stored() {
            if index >= count || changed.contains(index) {
                continue;
            }
            if r.raw_len != geometry.chunk_len(index) {
                return Err(incompatible(format!(
                    "chunk {index} changed length with the volume size and was not re-read"
                )));
            }
            map.stored.insert(index, *r);
        }
        Manifest::new(
            meta,
            map,
            Some(ParentRef {
                snapshot: parent.snapshot.clone(),
                snapshot_id: parent.snapshot_id.clone(),
            }),
        )
    }

    /// Size of the volume in bytes.
    pub fn volume_size(&self) -> u64 {
        self.chunks.geometry().volume_size()
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunks.geometry().chunk_size()
    }

    /// Serializes to the single-document JSON form of format 1, which every build reads (the
    /// repository writes format 2: [`ManifestHead`] plus [`crate::maptree`] segments).
    ///
    /// # Errors
    /// [`CoreError::ManifestInvalid`] if the encoder fails, which plain strings and integers
    /// never make it do; the error exists so a broken manifest is never written silently.
    pub fn to_json(&self) -> Result<Vec<u8>, CoreError> {
        let wire = WireRef {
            format_version: MANIFEST_V1,
            volume: &self.volume,
            snapshot: &self.snapshot,
            snapshot_id: &self.snapshot_id,
            created_unix_ms: self.created,
            volume_size: self.volume_size(),
            chunk_size: self.chunk_size(),
            parent: self.parent.as_ref(),
            source: &self.source,
            labels: &self.labels,
            stats: &self.stats,
            chunks: self
                .chunks
                .iter_stored()
                .map(|(i, r)| (i, r.hash, r.stored_size, r.crc32c, r.raw_len))
                .collect(),
        };
        let json = serde_json::to_vec(&wire).map_err(|e| CoreError::ManifestInvalid {
            reason: format!("cannot encode: {e}"),
        })?;
        // Readers refuse anything larger; refusing here keeps every written manifest readable.
        let limit = max_json_len(self.chunks.geometry());
        if json.len() as u64 > limit {
            return Err(CoreError::ManifestInvalid {
                reason: format!(
                    "encoded manifest is {} bytes, more than the {limit} a reader accepts (labels \
                     or source descriptions too long?)",
                    json.len()
                ),
            });
        }
        Ok(json)
    }

    /// Parses the JSON wire form, checking the format version before anything else.
    ///
    /// # Errors
    /// [`CoreError::UnsupportedManifestVersion`] for a version this build does not know;
    /// [`CoreError::ManifestDecode`] for malformed JSON; [`CoreError::ManifestTooLarge`] for
    /// more bytes than its geometry can need; [`CoreError::ManifestInvalid`] when an
    /// invariant is broken (bad index, wrong chunk length, duplicate index, bad name), or any
    /// other error of [`Manifest::validate`].
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, CoreError> {
        #[derive(Deserialize)]
        struct Probe {
            format_version: Option<u64>,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| CoreError::ManifestDecode {
                message: e.to_string(),
            })?;
        let version = probe
            .format_version
            .ok_or_else(|| CoreError::ManifestDecode {
                message: "missing format_version".into(),
            })?;
        check_version(version)?;
        if version != u64::from(MANIFEST_V1) {
            return Err(not_inline());
        }
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| CoreError::ManifestDecode {
            message: e.to_string(),
        })?;
        let invalid = |reason: String| CoreError::ManifestInvalid { reason };
        let geometry = ChunkGeometry::new(wire.volume_size, wire.chunk_size)
            .map_err(|e| invalid(e.to_string()))?;
        let limit = max_json_len(&geometry);
        if bytes.len() as u64 > limit {
            return Err(CoreError::ManifestTooLarge {
                limit,
                chunk_count: Some(geometry.chunk_count()),
            });
        }
        let mut map = ChunkMap::new(geometry);
        for (index, hash, stored_size, crc32c, raw_len) in wire.chunks {
            if map.stored.contains_key(&index) {
                return Err(invalid(format!("chunk {index} listed twice")));
            }
            let r = ChunkRef {
                hash,
                stored_size,
                crc32c,
                raw_len,
            };
            map.set(index, ChunkState::Stored(r))
                .map_err(|e| invalid(e.to_string()))?;
        }
        let meta = SnapshotMeta {
            volume: wire.volume,
            snapshot: wire.snapshot,
            snapshot_id: wire.snapshot_id,
            created: wire.created_unix_ms,
            source: wire.source,
            labels: wire.labels,
            stats: wire.stats,
        };
        Manifest::new(meta, map, wire.parent).map_err(|e| match e {
            // Keep the typed consistency errors; wrap the rest (names) as before.
            e @ (CoreError::ConflictingChunkRefs { .. }
            | CoreError::StoredSizeOutOfBounds { .. }
            | CoreError::ManifestInvalid { .. }) => e,
            other => invalid(other.to_string()),
        })
    }

    /// Decodes a manifest from a stream of JSON (e.g. a decompressor), reading no more than
    /// its declared geometry can need.
    ///
    /// The header fields are read first: at most [`MAX_METADATA_JSON`] bytes may come before
    /// `volume_size` and `chunk_size`; once both are known the whole document may be at most
    /// [`max_json_len`] bytes. A few KiB of compressed data that would inflate to gigabytes is
    /// therefore rejected after reading at most that many bytes, with memory bounded the same
    /// way. Then the text is decoded like [`Manifest::from_json`].
    ///
    /// # Errors
    /// [`CoreError::ManifestTooLarge`] past the limit; [`CoreError::ManifestDecode`] for
    /// malformed JSON, a header field out of order, or a failing reader (a damaged compressed
    /// stream); otherwise as [`Manifest::from_json`].
    pub fn from_json_reader<R: Read>(reader: R) -> Result<Manifest, CoreError> {
        match decode_json_reader(reader)? {
            StoredManifest::V1(m) => Ok(m),
            StoredManifest::V2(_) => Err(not_inline()),
        }
    }

    /// The metadata of this manifest, without its map (whose location is unknown in memory).
    pub fn head(&self) -> ManifestHead {
        ManifestHead {
            volume: self.volume.clone(),
            snapshot: self.snapshot.clone(),
            snapshot_id: self.snapshot_id.clone(),
            created: self.created,
            geometry: *self.chunks.geometry(),
            parent: self.parent.clone(),
            source: self.source.clone(),
            labels: self.labels.clone(),
            stats: self.stats,
            map: MapLocation::Inline,
        }
    }
}

fn not_inline() -> CoreError {
    CoreError::ManifestDecode {
        message: "a format-2 manifest keeps its chunk map in segments; read it through the \
                  repository"
            .into(),
    }
}

fn check_version(version: u64) -> Result<(), CoreError> {
    if version < u64::from(MIN_MANIFEST_FORMAT_VERSION)
        || version > u64::from(MANIFEST_FORMAT_VERSION)
    {
        return Err(CoreError::UnsupportedManifestVersion {
            found: version,
            min_supported: MIN_MANIFEST_FORMAT_VERSION,
            max_supported: MANIFEST_FORMAT_VERSION,
        });
    }
    Ok(())
}

/// A manifest object's content as decoded: a whole format-1 manifest, or a format-2 head
/// whose map lives in segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredManifest {
    /// Format 1: the complete manifest.
    V1(Manifest),
    /// Format 2: the head; the map is read from its segments.
    V2(ManifestHead),
}

impl StoredManifest {
    /// The head of either form.
    pub fn head(&self) -> ManifestHead {
        match self {
            StoredManifest::V1(m) => m.head(),
            StoredManifest::V2(h) => h.clone(),
        }
    }
}

/// Where a manifest's chunk map is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapLocation {
    /// Inside the manifest document itself (format 1), or in memory.
    Inline,
    /// In a segment tree (format 2); `None` when every chunk is zero.
    Tree {
        /// The root segment.
        root: Option<SegmentRef>,
    },
}

/// A snapshot's metadata without its chunk map: identity, geometry, lineage, provenance,
/// figures, and where the map is. In format 2 this is the whole manifest object (bounded by
/// [`MAX_HEAD_JSON`], whatever the volume size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestHead {
    /// Volume the snapshot belongs to.
    pub volume: VolumeName,
    /// Snapshot name, unique within the volume.
    pub snapshot: SnapshotName,
    /// Unique id of this snapshot.
    pub snapshot_id: String,
    /// Creation time.
    pub created: Timestamp,
    /// Volume size and chunk size.
    pub geometry: ChunkGeometry,
    /// Lineage: the snapshot this one was derived from, if incremental.
    pub parent: Option<ParentRef>,
    /// Kubernetes/CSI provenance.
    pub source: SourceInfo,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Figures of the run that produced it.
    pub stats: BackupStats,
    /// Where the chunk map is.
    pub map: MapLocation,
}

impl ManifestHead {
    /// Size of the volume in bytes.
    pub fn volume_size(&self) -> u64 {
        self.geometry.volume_size()
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.geometry.chunk_size()
    }

    /// The lineage link a child of this snapshot records.
    pub fn as_parent(&self) -> ParentRef {
        ParentRef {
            snapshot: self.snapshot.clone(),
            snapshot_id: self.snapshot_id.clone(),
        }
    }

    /// The metadata part, to build a [`Manifest`] with a map.
    pub fn meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            volume: self.volume.clone(),
            snapshot: self.snapshot.clone(),
            snapshot_id: self.snapshot_id.clone(),
            created: self.created,
            source: self.source.clone(),
            labels: self.labels.clone(),
            stats: self.stats,
        }
    }

    /// Serializes the format-2 head (`format_version` and the geometry first, like format 1).
    ///
    /// # Errors
    /// [`CoreError::ManifestInvalid`] for a head that is not format 2 (its map is inline) or
    /// larger than [`MAX_HEAD_JSON`] (labels or descriptions too long), or a bad snapshot id.
    pub fn to_json(&self) -> Result<Vec<u8>, CoreError> {
        validate_name("snapshot id", &self.snapshot_id)?;
        let MapLocation::Tree { root } = self.map else {
            return Err(CoreError::ManifestInvalid {
                reason: "a format-2 head needs a segment tree".into(),
            });
        };
        let wire = WireHeadRef {
            format_version: 2,
            volume: &self.volume,
            snapshot: &self.snapshot,
            snapshot_id: &self.snapshot_id,
            created_unix_ms: self.created,
            volume_size: self.volume_size(),
            chunk_size: self.chunk_size(),
            parent: self.parent.as_ref(),
            source: &self.source,
            labels: &self.labels,
            stats: &self.stats,
            map: WireMap {
                segment_version: crate::maptree::SEGMENT_FORMAT_VERSION,
                leaf_span: crate::maptree::LEAF_SPAN,
                fanout: crate::maptree::FANOUT,
                root: root.map(|r| WireSegRef {
                    name: r.name,
                    len: r.len,
                    stored: r.stored,
                }),
            },
        };
        let json = serde_json::to_vec(&wire).map_err(|e| CoreError::ManifestInvalid {
            reason: format!("cannot encode: {e}"),
        })?;
        if json.len() as u64 > MAX_HEAD_JSON {
            return Err(CoreError::ManifestInvalid {
                reason: format!(
                    "encoded manifest head is {} bytes, more than the {MAX_HEAD_JSON} a reader \
                     accepts (labels or source descriptions too long?)",
                    json.len()
                ),
            });
        }
        Ok(json)
    }

    /// Parses a format-2 head, checking everything that does not need the segments: version,
    /// tree parameters, names, geometry, and that the root's stored count fits the volume.
    ///
    /// # Errors
    /// [`CoreError::ManifestTooLarge`], [`CoreError::ManifestDecode`],
    /// [`CoreError::UnsupportedManifestVersion`], [`CoreError::ManifestInvalid`].
    pub fn from_json(bytes: &[u8]) -> Result<ManifestHead, CoreError> {
        if bytes.len() as u64 > MAX_HEAD_JSON {
            return Err(CoreError::ManifestTooLarge {
                limit: MAX_HEAD_JSON,
                chunk_count: None,
            });
        }
        let decode = |e: serde_json::Error| CoreError::ManifestDecode {
            message: e.to_string(),
        };
        #[derive(Deserialize)]
        struct Probe {
            format_version: Option<u64>,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(decode)?;
        let version = probe
            .format_version
            .ok_or_else(|| CoreError::ManifestDecode {
                message: "missing format_version".into(),
            })?;
        check_version(version)?;
        if version != 2 {
            return Err(CoreError::ManifestDecode {
                message: format!("format {version} is not a manifest head"),
            });
        }
        let wire: WireHead = serde_json::from_slice(bytes).map_err(decode)?;
        let invalid = |reason: String| CoreError::ManifestInvalid { reason };
        if wire.map.segment_version != crate::maptree::SEGMENT_FORMAT_VERSION {
            return Err(CoreError::UnsupportedSegmentVersion {
                found: wire.map.segment_version,
                supported: crate::maptree::SEGMENT_FORMAT_VERSION,
            });
        }
        if wire.map.leaf_span != crate::maptree::LEAF_SPAN
            || wire.map.fanout != crate::maptree::FANOUT
        {
            return Err(invalid(format!(
                "segment tree of leaf span {} and fan-out {}; this build reads {} and {}",
                wire.map.leaf_span,
                wire.map.fanout,
                crate::maptree::LEAF_SPAN,
                crate::maptree::FANOUT
            )));
        }
        validate_name("snapshot id", &wire.snapshot_id).map_err(|e| invalid(e.to_string()))?;
        let geometry = ChunkGeometry::new(wire.volume_size, wire.chunk_size)
            .map_err(|e| invalid(e.to_string()))?;
        let root = match wire.map.root {
            None => None,
            Some(r) => {
                if r.stored == 0 || r.stored > geometry.chunk_count() {
                    return Err(invalid(format!(
                        "root claims {} stored chunks in a volume of {}",
                        r.stored,
                        geometry.chunk_count()
                    )));
                }
                if r.len == 0 || u64::from(r.len) > crate::maptree::MAX_SEGMENT_LEN {
                    return Err(invalid(format!("root segment length {}", r.len)));
                }
                Some(SegmentRef {
                    name: r.name,
                    len: r.len,
                    stored: r.stored,
                })
            }
        };
        Ok(ManifestHead {
            volume: wire.volume,
            snapshot: wire.snapshot,
            snapshot_id: wire.snapshot_id,
            created: wire.created_unix_ms,
            geometry,
            parent: wire.parent,
            source: wire.source,
            labels: wire.labels,
            stats: wire.stats,
            map: MapLocation::Tree { root },
        })
    }
}

/// Checks chunk references gathered from several places (the loaded leaves of a tree, or a
/// whole map) against each other and the geometry: indices inside the volume, raw lengths
/// the geometry gives, possible stored sizes, one raw length / stored size / checksum per
/// content hash, and sums that fit in 64 bits. [`Manifest::validate`] applies it to whole
/// maps.
///
/// # Errors
/// As [`Manifest::validate`].
pub fn check_chunk_refs<'a, I>(geometry: &ChunkGeometry, refs: I) -> Result<(), CoreError>
where
    I: IntoIterator<Item = (u64, &'a ChunkRef)>,
{
    let g = geometry;
    let count = g.chunk_count();
    let mut first: HashMap<ChunkHash, (u64, ChunkRef)> = HashMap::new();
    let mut allocated: u64 = 0;
    let mut stored_total: u64 = 0;
    let overflow = |what: &str| CoreError::ManifestInvalid {
        reason: format!("{what} overflows 64 bits"),
    };
    for (index, r) in refs {
        if index >= count {
            return Err(CoreError::ChunkIndexOutOfRange {
                index,
                chunk_count: count,
            });
        }
        let expected = g.chunk_len(index);
        if r.raw_len != expected {
            return Err(CoreError::ChunkLengthMismatch {
                index,
                raw_len: r.raw_len,
                expected,
            });
        }
        // raw_len <= 64 MiB here (it equals a chunk length), so the sum cannot overflow.
        let max = r.raw_len + MAX_CHUNK_FRAMING;
        if r.stored_size == 0 || r.stored_size > max {
            return Err(CoreError::StoredSizeOutOfBounds {
                index,
                stored_size: r.stored_size,
                raw_len: r.raw_len,
                max,
            });
        }
        allocated = allocated
            .checked_add(r.raw_len)
            .ok_or_else(|| overflow("allocated bytes"))?;
        match first.get(&r.hash) {
            Some((first_index, f)) => {
                if f != r {
                    let show = |c: &ChunkRef| {
                        format!(
                            "raw {} / stored {} / crc32c {:#010x}",
                            c.raw_len, c.stored_size, c.crc32c
                        )
                    };
                    return Err(CoreError::ConflictingChunkRefs {
                        hash: r.hash.to_hex(),
                        first_index: *first_index,
                        first: show(f),
                        index,
                        other: show(r),
                    });
                }
            }
            None => {
                stored_total = stored_total
                    .checked_add(r.stored_size)
                    .ok_or_else(|| overflow("stored bytes"))?;
                first.insert(r.hash, (index, *r));
            }
        }
    }
    if allocated > g.volume_size() {
        return Err(CoreError::ManifestInvalid {
            reason: format!(
                "stored chunks hold {allocated} bytes, more than the volume's {}",
                g.volume_size()
            ),
        });
    }
    Ok(())
}

/// Decodes a stored manifest document of either format from a stream, reading no more than
/// its declared version and geometry can need (see [`Manifest::from_json_reader`]; a format-2
/// head is at most [`MAX_HEAD_JSON`] bytes).
///
/// # Errors
/// As [`Manifest::from_json_reader`] and [`ManifestHead::from_json`].
pub fn decode_json_reader<R: Read>(reader: R) -> Result<StoredManifest, CoreError> {
    {
        let state = Rc::new(ProbeState {
            version: Cell::new(None),
            limit: Cell::new(MAX_METADATA_JSON),
            chunk_count: Cell::new(None),
            exceeded: Cell::new(false),
            failure: RefCell::new(None),
        });
        let capped = Capped {
            inner: reader,
            buf: Vec::new(),
            state: state.clone(),
        };
        // serde_json reads a byte at a time: buffer so the source sees large reads.
        let mut buffered = BufReader::with_capacity(64 * 1024, capped);
        let probed = {
            let mut de = serde_json::Deserializer::from_reader(&mut buffered);
            serde::Deserializer::deserialize_map(&mut de, HeaderVisitor { state: &state })
        };
        let too_large = |state: &ProbeState| CoreError::ManifestTooLarge {
            limit: state.limit.get(),
            chunk_count: state.chunk_count.get(),
        };
        if let Err(e) = probed {
            if state.exceeded.get() {
                return Err(too_large(&state));
            }
            if let Some(typed) = state.failure.borrow_mut().take() {
                return Err(typed);
            }
            return Err(CoreError::ManifestDecode {
                message: e.to_string(),
            });
        }
        if state.chunk_count.get().is_none() {
            return Err(CoreError::ManifestDecode {
                message: "missing volume_size or chunk_size".into(),
            });
        }
        // The rest (trailing whitespace, or garbage `from_json` rejects) under the same limit.
        if let Err(e) = io::copy(&mut buffered, &mut io::sink()) {
            if state.exceeded.get() {
                return Err(too_large(&state));
            }
            return Err(CoreError::ManifestDecode {
                message: e.to_string(),
            });
        }
        let bytes = std::mem::take(&mut buffered.get_mut().buf);
        drop(buffered);
        match state.version.get() {
            Some(2) => ManifestHead::from_json(&bytes).map(StoredManifest::V2),
            _ => Manifest::from_json(&bytes).map(StoredManifest::V1),
        }
    }
}

/// What the header probe of [`Manifest::from_json_reader`] learned, shared with the reader.
struct ProbeState {
    /// The format version, once read.
    version: Cell<Option<u64>>,
    /// Bytes the reader may still produce in total.
    limit: Cell<u64>,
    /// Chunk count once `volume_size` and `chunk_size` are known.
    chunk_count: Cell<Option<u64>>,
    /// The reader stopped because the limit was exceeded.
    exceeded: Cell<bool>,
    /// A typed error found by the probe (serde only carries strings).
    failure: RefCell<Option<CoreError>>,
}

/// A reader that keeps what it reads and fails once more than the shared limit was read.
struct Capped<R> {
    inner: R,
    buf: Vec<u8>,
    state: Rc<ProbeState>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.buf.extend_from_slice(&out[..n]);
        if self.buf.len() as u64 > self.state.limit.get() {
            self.state.exceeded.set(true);
            return Err(io::Error::other("manifest exceeds its size limit"));
        }
        Ok(n)
    }
}

/// Reads the version and geometry fields and skips everything else without keeping it.
struct HeaderVisitor<'a> {
    state: &'a ProbeState,
}

impl HeaderVisitor<'_> {
    fn fail<E: serde::de::Error>(&self, e: CoreError) -> E {
        let msg = e.to_string();
        *self.state.failure.borrow_mut() = Some(e);
        E::custom(msg)
    }
}

impl<'de> serde::de::Visitor<'de> for HeaderVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a manifest object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (mut volume_size, mut chunk_size) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "format_version" => {
                    let version: u64 = map.next_value()?;
                    check_version(version).map_err(|e| self.fail(e))?;
                    self.state.version.set(Some(version));
                    if version == 2 {
                        // A head holds no chunk entries: its size does not follow the geometry.
                        self.state.limit.set(MAX_HEAD_JSON);
                    }
                }
                "volume_size" => volume_size = Some(map.next_value::<u64>()?),
                "chunk_size" => chunk_size = Some(map.next_value::<u64>()?),
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            if self.state.chunk_count.get().is_none()
                && let (Some(v), Some(c)) = (volume_size, chunk_size)
            {
                let g = ChunkGeometry::new(v, c).map_err(|e| {
                    self.fail(CoreError::ManifestInvalid {
                        reason: e.to_string(),
                    })
                })?;
                self.state.chunk_count.set(Some(g.chunk_count()));
                if self.state.version.get() != Some(2) {
                    self.state.limit.set(max_json_len(&g));
                }
            }
        }
        Ok(())
    }
}

type WireChunk = (u64, ChunkHash, u64, u32, u64);

#[derive(Serialize)]
struct WireRef<'a> {
    format_version: u32,
    volume: &'a VolumeName,
    snapshot: &'a SnapshotName,
    snapshot_id: &'a str,
    created_unix_ms: Timestamp,
    volume_size: u64,
    chunk_size: u64,
    parent: Option<&'a ParentRef>,
    source: &'a SourceInfo,
    labels: &'a BTreeMap<String, String>,
    stats: &'a BackupStats,
    chunks: Vec<WireChunk>,
}

#[derive(Serialize, Deserialize)]
struct WireSegRef {
    name: ChunkHash,
    len: u32,
    stored: u64,
}

#[derive(Serialize)]
struct WireMap {
    segment_version: u8,
    leaf_span: u64,
    fanout: u64,
    root: Option<WireSegRef>,
}

#[derive(Deserialize)]
struct WireMapIn {
    segment_version: u8,
    leaf_span: u64,
    fanout: u64,
    root: Option<WireSegRef>,
}

#[derive(Serialize)]
struct WireHeadRef<'a> {
    format_version: u32,
    volume: &'a VolumeName,
    snapshot: &'a SnapshotName,
    snapshot_id: &'a str,
    created_unix_ms: Timestamp,
    volume_size: u64,
    chunk_size: u64,
    parent: Option<&'a ParentRef>,
    source: &'a SourceInfo,
    labels: &'a BTreeMap<String, String>,
    stats: &'a BackupStats,
    map: WireMap,
}

#[derive(Deserialize)]
struct WireHead {
    volume: VolumeName,
    snapshot: SnapshotName,
    snapshot_id: String,
    created_unix_ms: Timestamp,
    volume_size: u64,
    chunk_size: u64,
    #[serde(default)]
    parent: Option<ParentRef>,
    #[serde(default)]
    source: SourceInfo,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    stats: BackupStats,
    map: WireMapIn,
}

#[derive(Deserialize)]
struct Wire {
    volume: VolumeName,
    snapshot: SnapshotName,
    snapshot_id: String,
    created_unix_ms: Timestamp,
    volume_size: u64,
    chunk_size: u64,
    #[serde(default)]
    parent: Option<ParentRef>,
    #[serde(default)]
    source: SourceInfo,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    stats: BackupStats,
    chunks: Vec<WireChunk>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> ChunkHash {
        ChunkHash([b; 32])
    }

    fn meta(name: &str) -> SnapshotMeta {
        SnapshotMeta {
            volume: VolumeName::new("vol").unwrap(),
            snapshot: SnapshotName::new(name).unwrap(),
            snapshot_id: format!("id-{name}"),
            created: Timestamp(1000),
            source: SourceInfo {
                csi_snapshot_id: Some("snap-handle".into()),
                ..Default::default()
            },
            labels: BTreeMap::from([("k".into(), "v".into())]),
            stats: BackupStats::default(),
        }
    }

    fn stored(b: u8, raw_len: u64) -> ChunkState {
        ChunkState::Stored(ChunkRef {
            hash: h(b),
            stored_size: 100 + u64::from(b),
            crc32c: u32::from(b),
            raw_len,
        })
    }

    fn sample() -> Manifest {
        let g = ChunkGeometry::new(10_000, 4096).unwrap();
        let mut map = ChunkMap::new(g);
        map.set(0, stored(1, 4096)).unwrap();
        map.set(2, stored(2, 10_000 - 8192)).unwrap();
        Manifest::new(meta("s1"), map, None).unwrap()
    }

    #[test]
    fn json_round_trip() {
        let m = sample();
        let bytes = m.to_json().unwrap();
        assert_eq!(Manifest::from_json(&bytes).unwrap(), m);
        assert_eq!(m.chunks.allocated_bytes(), 4096 + 10_000 - 8192);
        assert_eq!(m.chunks.get(1), ChunkState::Zero);
    }

    #[test]
    fn the_group_snapshot_name_is_optional_on_the_wire() {
        // Written only when set, so manifests without a group are byte-for-byte as before,
        // and manifests written before the field existed still read.
        let m = sample();
        let text = String::from_utf8(m.to_json().unwrap()).unwrap();
        assert!(!text.contains("volume_group_snapshot"));
        let mut grouped = sample();
        grouped.source.volume_group_snapshot = Some("cbt-group-1".into());
        let back = Manifest::from_json(&grouped.to_json().unwrap()).unwrap();
        assert_eq!(
            back.source.volume_group_snapshot.as_deref(),
            Some("cbt-group-1")
        );
        let old: SourceInfo =
            serde_json::from_str(r#"{"csi_driver":"d","volume_snapshot":"vs"}"#).unwrap();
        assert_eq!(old.volume_group_snapshot, None);
    }

    #[test]
    fn future_and_missing_versions_are_typed_errors() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&sample().to_json().unwrap()).unwrap();
        v["format_version"] = 3.into();
        // A future version may change any field; it must be rejected before decoding them.
        v["chunks"] = "something new".into();
        let err = Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(
            err,
            CoreError::UnsupportedManifestVersion {
                found: 3,
                min_supported: 1,
                max_supported: 2
            }
        );
        assert_eq!(err.kind(), crate::ErrorKind::Unsupported);
        v.as_object_mut().unwrap().remove("format_version");
        assert!(matches!(
            Manifest::from_json(&serde_json::to_vec(&v).unwrap()),
            Err(CoreError::ManifestDecode { .. })
        ));
        assert!(matches!(
            Manifest::from_json(b"{not json"),
            Err(CoreError::ManifestDecode { .. })
        ));
    }

    #[test]
    fn inconsistent_manifests_are_rejected() {
        let base: serde_json::Value = serde_json::from_slice(&sample().to_json().unwrap()).unwrap();
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("index past end", serde_json::json!([[3, h(1), 1, 1, 4096]])),
            ("wrong raw len", serde_json::json!([[0, h(1), 1, 1, 4000]])),
            (
                "duplicate",
                serde_json::json!([[0, h(1), 1, 1, 4096], [0, h(2), 1, 1, 4096]]),
            ),
        ];
        for (what, chunks) in cases {
            let mut v = base.clone();
            v["chunks"] = chunks;
            assert!(
                matches!(
                    Manifest::from_json(&serde_json::to_vec(&v).unwrap()),
                    Err(CoreError::ManifestInvalid { .. })
                ),
                "{what}"
            );
        }
        let mut v = base.clone();
        v["snapshot"] = "../escape".into();
        assert!(Manifest::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
        let mut v = base;
        v["chunks"] = serde_json::json!([[0, "ZZ", 1, 1, 4096]]);
        assert!(Manifest::from_json(&serde_json::to_vec(&v).unwrap()).is_err());
    }

    #[test]
    fn derive_child_replaces_changed_chunks_and_handles_resize() {
        let parent = sample();
        let child = Manifest::derive_child(
            &parent,
            meta("s2"),
            10_000,
            [(1, stored(3, 4096)), (0, ChunkState::Zero)],
        )
        .unwrap();
        assert_eq!(child.chunks.get(0), ChunkState::Zero);
        assert_eq!(child.chunks.get(1), stored(3, 4096));
        assert_eq!(child.chunks.get(2), parent.chunks.get(2));
        assert_eq!(child.parent.as_ref().unwrap().snapshot_id, "id-s1");

        // Growing the volume changes the old short last chunk's length: it must be re-read.
        let err = Manifest::derive_child(&parent, meta("s3"), 20_000, []).unwrap_err();
        assert!(matches!(err, CoreError::IncompatibleParent { .. }));
        let grown =
            Manifest::derive_child(&parent, meta("s3"), 20_000, [(2, stored(4, 4096))]).unwrap();
        assert_eq!(grown.chunks.geometry().chunk_count(), 5);
        // Shrinking drops chunks past the new end.
        let shrunk = Manifest::derive_child(&parent, meta("s4"), 4096, []).unwrap();
        assert_eq!(shrunk.chunks.stored_count(), 1);

        // Changes in any order (and repeated) override the parent at exactly their indices.
        let parent4 = {
            let g = ChunkGeometry::new(4 * 4096, 4096).unwrap();
            let mut map = ChunkMap::new(g);
            for i in 0..4 {
                map.set(i, stored(10 + i as u8, 4096)).unwrap();
            }
            Manifest::new(meta("p4"), map, None).unwrap()
        };
        let child = Manifest::derive_child(
            &parent4,
            meta("c4"),
            4 * 4096,
            [
                (3, ChunkState::Zero),
                (0, stored(20, 4096)),
                (3, stored(21, 4096)),
                (2, ChunkState::Zero),
            ],
        )
        .unwrap();
        let states: Vec<ChunkState> = (0..4).map(|i| child.chunks.get(i)).collect();
        assert_eq!(
            states,
            vec![
                stored(20, 4096),
                parent4.chunks.get(1),
                ChunkState::Zero,
                stored(21, 4096)
            ]
        );

        let mut other = meta("s5");
        other.volume = VolumeName::new("other").unwrap();
        assert!(Manifest::derive_child(&parent, other, 10_000, []).is_err());
    }

    #[test]
    fn serialized_size_per_chunk_is_bounded() {
        // A fully allocated 256 GiB volume at 4 MiB chunks: 65,536 entries with worst-case
        // (large) sizes and random-looking hashes.
        let cs = crate::ranges::DEFAULT_CHUNK_SIZE;
        let g = ChunkGeometry::new(65_536 * cs, cs).unwrap();
        let mut map = ChunkMap::new(g);
        let mut stream = crate::testing::XorShift::from_state(0x1234_5678_9abc_def1);
        for i in 0..g.chunk_count() {
            let mut hash = [0u8; 32];
            stream.fill_low(&mut hash);
            let r = ChunkRef {
                hash: ChunkHash(hash),
                stored_size: cs + 52,
                crc32c: u32::MAX - i as u32,
                raw_len: cs,
            };
            map.set(i, ChunkState::Stored(r)).unwrap();
        }
        let m = Manifest::new(meta("big"), map, None).unwrap();
        let per_entry = m.to_json().unwrap().len() as u64 / g.chunk_count();
        assert!(per_entry <= 110, "{per_entry} bytes per chunk entry");
    }

    #[test]
    fn one_hash_must_mean_one_chunk() {
        // The short last chunk claims the content of a full one: restoring it would write a
        // whole chunk past the end of the volume.
        let base: serde_json::Value = serde_json::from_slice(&sample().to_json().unwrap()).unwrap();
        let mut v = base.clone();
        v["chunks"] = serde_json::json!([[0, h(1), 101, 1, 4096], [2, h(1), 101, 1, 1808]]);
        let err = Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(
            err,
            CoreError::ConflictingChunkRefs {
                first_index: 0,
                index: 2,
                ..
            }
        ));
        assert_eq!(err.kind(), crate::ErrorKind::Integrity);
        // Same hash, same length, different checksum or stored size.
        for other in [
            serde_json::json!([1, h(1), 101, 2, 4096]),
            serde_json::json!([1, h(1), 102, 1, 4096]),
        ] {
            let mut v = base.clone();
            v["chunks"] = serde_json::json!([[0, h(1), 101, 1, 4096], other]);
            assert!(matches!(
                Manifest::from_json(&serde_json::to_vec(&v).unwrap()),
                Err(CoreError::ConflictingChunkRefs { .. })
            ));
        }
        // Stored sizes no chunk object can have.
        for stored in [0, 4096 + MAX_CHUNK_FRAMING + 1, u64::MAX] {
            let mut v = base.clone();
            v["chunks"] = serde_json::json!([[0, h(1), stored, 1, 4096]]);
            assert!(matches!(
                Manifest::from_json(&serde_json::to_vec(&v).unwrap()),
                Err(CoreError::StoredSizeOutOfBounds { .. })
            ));
        }
        // Built in memory, the same inconsistency is refused at construction.
        let g = ChunkGeometry::new(3 * 4096, 4096).unwrap();
        let mut map = ChunkMap::new(g);
        map.set(0, stored(1, 4096)).unwrap();
        let mut bad = stored(1, 4096);
        if let ChunkState::Stored(r) = &mut bad {
            r.crc32c ^= 1;
        }
        map.set(1, bad).unwrap();
        assert!(matches!(
            Manifest::new(meta("x"), map, None),
            Err(CoreError::ConflictingChunkRefs { .. })
        ));
    }

    #[test]
    fn reader_decoding_is_bounded_by_the_declared_geometry() {
        let m = sample();
        let json = m.to_json().unwrap();
        assert_eq!(Manifest::from_json_reader(&json[..]).unwrap(), m);

        // A valid header followed by an endless stream: stopped at the geometry's limit.
        let endless = json[..json.len() - 1]
            .iter()
            .copied()
            .chain(b",\"labels2\":\"".iter().copied())
            .chain(std::iter::repeat(b'x'));
        struct It<I>(I, u64);
        impl<I: Iterator<Item = u8>> Read for It<I> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                for (i, b) in out.iter_mut().enumerate() {
                    *b = self.0.next().unwrap_or(b' ');
                    self.1 += 1;
                    if self.1 > 64 << 20 {
                        return Ok(i); // the test's own backstop: never reached
                    }
                }
                Ok(out.len())
            }
        }
        let err = Manifest::from_json_reader(It(endless, 0)).unwrap_err();
        let limit = max_json_len(m.chunks.geometry());
        assert_eq!(
            err,
            CoreError::ManifestTooLarge {
                limit,
                chunk_count: Some(3)
            }
        );
        // Before the geometry is known only the metadata budget is read.
        let err = Manifest::from_json_reader(It(std::iter::repeat(b' '), 0)).unwrap_err();
        assert_eq!(
            err,
            CoreError::ManifestTooLarge {
                limit: MAX_METADATA_JSON,
                chunk_count: None
            }
        );
        // A future version stops the read at once, whatever follows.
        let future = b"{\"format_version\":9,\"x\":\""
            .iter()
            .copied()
            .chain(std::iter::repeat(b'y'));
        assert!(matches!(
            Manifest::from_json_reader(It(future, 0)),
            Err(CoreError::UnsupportedManifestVersion { found: 9, .. })
        ));
        // A zero chunk size is refused before it can divide anything.
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["chunk_size"] = 0.into();
        assert!(matches!(
            Manifest::from_json_reader(&serde_json::to_vec(&v).unwrap()[..]),
            Err(CoreError::ManifestInvalid { .. })
        ));
        // Garbage after the document is still refused.
        let mut trailing = json.clone();
        trailing.extend_from_slice(b" x");
        assert!(matches!(
            Manifest::from_json_reader(&trailing[..]),
            Err(CoreError::ManifestDecode { .. })
        ));
        // The writer refuses what a reader would refuse.
        let mut big = sample();
        big.labels
            .insert("k".into(), "v".repeat(MAX_METADATA_JSON as usize));
        assert!(matches!(
            big.to_json(),
            Err(CoreError::ManifestInvalid { .. })
        ));
    }

    #[test]
    fn hash_hex_round_trip() {
        let x = ChunkHash([0xab; 32]);
        assert_eq!(ChunkHash::from_hex(&x.to_hex()).unwrap(), x);
        assert!(ChunkHash::from_hex(&"AB".repeat(32)).is_err());
        assert!(ChunkHash::from_hex("ab").is_err());
    }
}
