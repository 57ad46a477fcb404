//! The backup repository: its layout on an object store, snapshots, chunks and locks.
//!
//! Owns every key the repository writes and the rules that keep the repository consistent.
//! It must not read block devices or files (that is [`crate::engine`]).
//!
//! # Layout
//! ```text
//! config                           repository config (JSON): format version, id, chunk size
//! chunks/<hh>/<blake3 hex>         chunk objects (format in crate::chunk), content addressed
//! snapshots/<volume>/<snapshot>    manifests: "CBMF", encoding byte 1, zstd(JSON): a format-2
//!                                  head (metadata + root of the map's segment tree), or a
//!                                  whole format-1 manifest (still read, no longer written)
//! segments/<hh>/<name>             format-2 map segments (binary, see cbt_core::maptree),
//!                                  named by the hash of their bytes, shared between snapshots
//! locks/exclusive                  held by prune / gc
//! locks/shared/<lock id>           one per running backup (and restore, when it may write)
//! locks/keys                       held while key slots are added or removed
//! .cbt-probe/conditional-writes    S3 only: the connect-time conditional-write probe's
//!                                  marker, kept, hidden from listings (see crate::store::s3)
//! keys/<slot id>                   encrypted repositories only: key slots (see crate::crypto)
//! ```
//! # Encryption
//! A repository created with [`Repository::init_encrypted`] or
//! [`Repository::init_encrypted_with`] (config version
//! [`ENCRYPTED_REPO_FORMAT_VERSION`], so older builds refuse it instead of writing into it in
//! the clear) seals every chunk, manifest and segment object ([`Codec`], [`crate::crypto`]) and
//! names chunks and segments by a keyed hash. The config stays readable (it carries no key material, only the
//! scheme and the key id). Open it with [`Repository::open_with_key`]; [`Repository::open`]
//! refuses with [`RepoError::KeyRequired`], and `open_with_key` refuses an unencrypted
//! repository ([`RepoError::NotEncrypted`]). Passwords and key files are managed with
//! [`Repository::add_key`], [`Repository::add_key_file`], [`Repository::list_keys`] and
//! [`Repository::remove_key`], one change at a time under `locks/keys`.
//! Lock objects are sealed too (their holder's host, process id and purpose name volumes and
//! snapshots); a lock that cannot be opened still blocks what it blocks and is listed as
//! unreadable, so it can be broken by id.
//! A manifest's JSON keeps `format_version`, `volume_size` and `chunk_size` before the chunk
//! list: readers bound what they decode by that geometry before reading the list.
//! Object keys are built only from validated [`VolumeName`]/[`SnapshotName`]s and hex hashes,
//! so no user input can address anything outside these prefixes.
//!
//! # Reading untrusted objects
//! Everything read back is treated as hostile input. Every read is bounded by a size known
//! before the read ([`ObjectStore::get_bounded`]): the config and lock objects by
//! [`MAX_CONFIG_LEN`] and [`lock::MAX_LOCK_LEN`], a manifest object by
//! [`MAX_MANIFEST_OBJECT_LEN`] and its decompressed JSON by the version and geometry it
//! declares ([`cbt_core::manifest::decode_json_reader`]: a format-2 head by
//! [`cbt_core::manifest::MAX_HEAD_JSON`]), a segment by the length its parent records (at
//! most [`cbt_core::maptree::MAX_SEGMENT_LEN`], then checked against its name and position),
//! a chunk object by the stored size its manifest records
//! (itself bounded by the chunk's raw length, see [`cbt_core::Manifest::validate`]).
//! Decompression never produces more than that bound: a few KiB that would inflate to
//! gigabytes are an error naming the object. Every manifest is validated before use, so
//! nothing downstream (restore, verify, GC) acts on an inconsistent one.
//!
//! # Guarantees
//! * A snapshot is visible only once its manifest exists; the manifest (head) is written last,
//!   with `IfAbsent`, after every chunk and segment it references has landed. Snapshots are
//!   never overwritten; segments, like chunks, are immutable and shared by name.
//! * Chunks are immutable and written with `IfAbsent`: a chunk already stored is never
//!   uploaded again, so an interrupted backup resumes by re-reading but not re-uploading.
//! * Locking (see [`lock`]): backups hold a shared lock, prune/GC an exclusive one. GC refuses
//!   to run while any shared lock exists, so it can never delete a chunk that a running backup
//!   has uploaded (or deduplicated against) but not yet referenced from a manifest.
//! * When that protection is taken away (an operator breaks a live backup's lock), the backup
//!   finds out before committing and fails instead (its lock object, its parent and the chunks
//!   it found stored are re-checked), and GC's grace period keeps recently written chunks
//!   (see below) from a writer it cannot see.
//! * Only the lock object a process took is ever deleted by its release; breaking a lock
//!   whose holder may be alive needs [`BreakMode::Force`].
//! * A restore checks that every chunk it needs is stored before it writes the first byte,
//!   and never writes outside `[0, volume_size)` of its target.
//!
//! # Grace period
//! Locks protect the backups GC can see. A backup it cannot see (its lock broken by an
//! operator, or written by a tool that does not lock) may have uploaded chunks that no
//! manifest references yet. GC therefore never deletes an unreferenced chunk the store
//! modified within the grace period ([`DEFAULT_GC_GRACE`], 24 hours, far above the longest
//! backup), counted back from the earlier of the caller's clock and the store's (the store's
//! time is the modification time of the exclusive lock GC just wrote). A store that reports no
//! modification time for a chunk keeps it. Retention orders snapshots by
//! [`cbt_core::gc::trusted_created`]: the recorded creation time, but never later than when the
//! store received the manifest.

mod codec;
mod error;
mod keys;
pub mod lock;
mod maintenance;
mod tree;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use cbt_core::gc::StoredChunk;
use cbt_core::manifest::{BackupStats, MapLocation, ParentRef, SourceInfo, StoredManifest};
use cbt_core::ranges::{DEFAULT_CHUNK_SIZE, validate_chunk_size};
use cbt_core::{ChunkHash, ChunkRef, Manifest, SnapshotName, Timestamp, VolumeName};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

pub use codec::{Codec, FetchedChunk};
pub use error::{RepoError, Result};
pub use keys::{KeySlotInfo, MAX_KEY_SLOTS, NewKey, RepoKey};
pub use lock::{BreakMode, HolderState, LockInfo, LockKind, RepoLock};
pub use maintenance::{
    CHUNK_TABLE_ENTRY_BYTES, DEFAULT_GC_GRACE, GcOptions, GcReport, ProblemKind, PruneOptions,
    PruneReport, RepoStatus, SnapshotStatus, VERIFY_MAP_ENTRIES, VerifyOptions, VerifyProblem,
    VerifyReport,
};
pub use tree::{
    EntryGauge, HeldLeaf, LEAF_WINDOW, MetadataWritten, SEGMENT_BATCH, WalkReads, segment_key,
};

/// A spawned task that is cancelled when its handle is dropped (a walk that stops early
/// leaves no reads behind).
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

use crate::chunk::{self, ChunkDecodeError, EncodedChunk};
use crate::crypto::ObjectKind;
use crate::store::{
    ObjectStore, PutMode, PutOptions, PutOutcome, StoreError, UncheckedBody, list_all,
};

/// Repository format version this build writes and reads (unencrypted repositories).
pub const REPO_FORMAT_VERSION: u32 = 1;
/// Repository format version of encrypted repositories: version 1 plus sealed objects.
pub const ENCRYPTED_REPO_FORMAT_VERSION: u32 = 2;
const CONFIG_KEY: &str = "config";
const REPO_FORMAT_NAME: &str = "cbt-repository";
const MANIFEST_MAGIC: [u8; 4] = *b"CBMF";
const MANIFEST_ENCODING_ZSTD_JSON: u8 = 1;
/// Manifests read concurrently by listings.
const LIST_CONCURRENCY: usize = 8;
/// Largest `config` object accepted (ours are a few hundred bytes).
pub const MAX_CONFIG_LEN: u64 = 64 * 1024;
/// Largest stored (compressed) manifest object accepted: 1 GiB, about 80 TiB of fully
/// allocated volume at 4 MiB chunks in format 1 (which stored about 12.7 MB per such TiB).
pub const MAX_MANIFEST_OBJECT_LEN: u64 = 1 << 30;

/// The repository's `config` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Always `cbt-repository`.
    pub format: String,
    /// Repository format version.
    pub version: u32,
    /// Random id of the repository.
    pub id: String,
    /// Chunk size of new (non-incremental) backups.
    pub chunk_size: u64,
    /// When the repository was created.
    pub created_unix_ms: Timestamp,
    /// Present in encrypted repositories (version [`ENCRYPTED_REPO_FORMAT_VERSION`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
}

/// The readable part of an encrypted repository's config: no key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionConfig {
    /// Always [`crate::crypto::SCHEME`].
    pub scheme: String,
    /// Id derived from the master key: a key that opens a slot must derive this id.
    pub key_id: String,
}

/// Options of [`Repository::init`].
#[derive(Debug, Clone, Copy)]
pub struct InitOptions {
    /// Default chunk size (power of two, 4 KiB..=64 MiB); 1 MiB ([`DEFAULT_CHUNK_SIZE`]) when `None`.
    pub chunk_size: Option<u64>,
    /// Creation time (injected).
    pub now: Timestamp,
}

/// A manifest without its chunk map: what listings show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotSummary {
    /// Volume.
    pub volume: VolumeName,
    /// Snapshot name.
    pub snapshot: SnapshotName,
    /// Unique id.
    pub snapshot_id: String,
    /// Creation time.
    pub created: Timestamp,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Raw bytes of non-zero chunks.
    pub allocated_bytes: u64,
    /// Number of non-zero chunks.
    pub stored_chunks: u64,
    /// Stored bytes of the distinct chunks it references.
    pub referenced_stored_bytes: u64,
    /// Parent (lineage), if incremental.
    pub parent: Option<ParentRef>,
    /// Kubernetes/CSI provenance.
    pub source: SourceInfo,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Figures of the backup run.
    pub stats: BackupStats,
}

impl SnapshotSummary {
    /// Summarizes a manifest.
    pub fn of(m: &Manifest) -> Self {
        SnapshotSummary {
            volume: m.volume.clone(),
            snapshot: m.snapshot.clone(),
            snapshot_id: m.snapshot_id.clone(),
            created: m.created,
            volume_size: m.volume_size(),
            chunk_size: m.chunk_size(),
            allocated_bytes: m.chunks.allocated_bytes(),
            stored_chunks: m.chunks.stored_count(),
            referenced_stored_bytes: m.chunks.unique_chunks().values().sum(),
            parent: m.parent.clone(),
            source: m.source.clone(),
            labels: m.labels.clone(),
            stats: m.stats,
        }
    }
}

/// What [`Repository::put_chunk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPut {
    /// The reference to record in the manifest (stored size of the object actually stored).
    pub chunk: ChunkRef,
    /// True if this call uploaded the object; false if it was already stored.
    pub uploaded: bool,
}

/// What the caller of [`Repository::put_chunk_as`] knows about a chunk's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChunkNovelty {
    /// Nothing: a full backup's chunk, which may well be stored already.
    #[default]
    Unknown,
    /// It differs from the parent snapshot's chunk at the same place (an incremental's
    /// changed chunk): most likely stored nowhere yet.
    Changed,
}

/// An open repository on an object store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    config: RepoConfig,
    codec: Codec,
    /// The key slot whose password opened this repository, if any.
    slot: Option<String>,
    /// Shared by clones: whether chunk puts have lately been finding their chunk stored.
    dedup: Arc<DedupHint>,
}

/// After this many chunk puts in a row found no stored copy, [`Repository::put_chunk`] stops
/// asking first and creates directly (a refused create says the chunk was stored after all).
const BLIND_PUT_AFTER_MISSES: u64 = 8;

/// Whether asking for a chunk before uploading it has lately been paying off.
///
/// A backup of new data (any first full, the changed chunks of an incremental) finds almost
/// nothing stored, and a `head` per chunk then doubles the requests (on S3, the server work
/// too); a full backup of data already stored finds almost everything, and the `head` saves
/// an upload per chunk. Runs of either are long, so the recent past predicts the next chunk.
/// It starts out asking: a backup resumed after a failure, or a full backup of data already
/// stored, then uploads nothing twice.
///
/// A chunk the caller knows to differ from what the parent holds at its place
/// ([`ChunkNovelty::Changed`]: CBT reported it changed, and its hash says so) is new far more
/// often than not, so it is not asked for unless the last chunk put found its copy stored
/// (a backup resumed after a failure: then it asks again at once, and at most the puts
/// already in flight were sent in vain, each refused by the store's create-if-absent).
#[derive(Debug, Default)]
struct DedupHint {
    /// Chunk puts in a row that found no stored copy.
    misses: std::sync::atomic::AtomicU64,
    /// Whether the last chunk put found its copy stored.
    last_found: std::sync::atomic::AtomicBool,
}

impl DedupHint {
    fn ask_first(&self, novelty: ChunkNovelty) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        match novelty {
            ChunkNovelty::Unknown => self.misses.load(Relaxed) < BLIND_PUT_AFTER_MISSES,
            ChunkNovelty::Changed => self.last_found.load(Relaxed),
        }
    }

    fn record(&self, found_stored: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.last_found.store(found_stored, Relaxed);
        if found_stored {
            self.misses.store(0, Relaxed);
        } else {
            // Saturating: the count only needs to pass the threshold.
            let _ = self
                .misses
                .fetch_update(Relaxed, Relaxed, |m| Some(m.saturating_add(1)));
        }
    }
}

/// Key of a snapshot's manifest.
pub fn manifest_key(volume: &VolumeName, snapshot: &SnapshotName) -> String {
    format!("snapshots/{volume}/{snapshot}")
}

fn parse_manifest_key(key: &str) -> Option<(VolumeName, SnapshotName)> {
    let rest = key.strip_prefix("snapshots/")?;
    let (v, s) = rest.split_once('/')?;
    Some((VolumeName::new(v).ok()?, SnapshotName::new(s).ok()?))
}

/// A short random hex id (repository, snapshot and lock ids). Mixes the process's random
/// hasher seed with time and a counter; uniqueness, not secrecy, is what matters.
pub(crate) fn random_id(tag: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(tag.as_bytes());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let hash = blake3::hash(&h.finish().to_le_bytes());
    hash.to_hex()[..20].to_string()
}

impl Repository {
    /// Creates a repository on an empty store.
    ///
    /// # Errors
    /// [`RepoError::AlreadyInitialized`] if a config exists; store errors.
    ///
    /// # Guarantees
    /// The config is written with `IfAbsent`: of two concurrent inits exactly one wins.
    pub async fn init(store: Arc<dyn ObjectStore>, opts: InitOptions) -> Result<Self> {
        let chunk_size = opts.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
        validate_chunk_size(chunk_size)?;
        let config = RepoConfig {
            format: REPO_FORMAT_NAME.into(),
            version: REPO_FORMAT_VERSION,
            id: random_id("repo"),
            chunk_size,
            created_unix_ms: opts.now,
            encryption: None,
        };
        Self::write_config(store, config, Codec::plain(), None).await
    }

    /// Writes a new repository's config with `IfAbsent`.
    async fn write_config(
        store: Arc<dyn ObjectStore>,
        config: RepoConfig,
        codec: Codec,
        slot: Option<String>,
    ) -> Result<Self> {
        let body = serde_json::to_vec_pretty(&config).map_err(|e| RepoError::BadConfig {
            reason: e.to_string(),
            unsupported: false,
        })?;
        match store
            .put(CONFIG_KEY, Bytes::from(body), PutMode::IfAbsent)
            .await
            .map_err(|e| RepoError::store("writing repository config", e))?
        {
            PutOutcome::Created => Ok(Repository {
                store,
                config,
                codec,
                slot,
                dedup: Arc::default(),
            }),
            PutOutcome::AlreadyExists => {
                let existing = read_config(store.as_ref()).await?;
                Err(RepoError::AlreadyInitialized { id: existing.id })
            }
        }
    }

    /// Opens an existing unencrypted repository, checking its format version.
    ///
    /// # Errors
    /// [`RepoError::NotInitialized`], [`RepoError::BadConfig`], store errors;
    /// [`RepoError::KeyRequired`] for an encrypted repository (use
    /// [`Repository::open_with_key`]).
    pub async fn open(store: Arc<dyn ObjectStore>) -> Result<Self> {
        let config = read_config(store.as_ref()).await?;
        if config.encryption.is_some() {
            return Err(RepoError::KeyRequired);
        }
        Ok(Repository {
            store,
            config,
            codec: Codec::plain(),
            slot: None,
            dedup: Arc::default(),
        })
    }

    /// The repository config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Whether the repository is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.codec.is_encrypted()
    }

    /// How this repository encodes chunks and manifests (clone it into worker tasks).
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// The underlying object store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
}

/// Reads and checks the `config` object (either format version).
async fn read_config(store: &dyn ObjectStore) -> Result<RepoConfig> {
    {
        let body = match store.get_bounded(CONFIG_KEY, MAX_CONFIG_LEN).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => return Err(RepoError::NotInitialized),
            Err(e) => return Err(RepoError::store("reading repository config", e)),
        };
        #[derive(Deserialize)]
        struct Probe {
            format: String,
            version: u64,
        }
        let bad = |reason: String, unsupported| RepoError::BadConfig {
            reason,
            unsupported,
        };
        let probe: Probe = serde_json::from_slice(&body).map_err(|e| bad(e.to_string(), false))?;
        if probe.format != REPO_FORMAT_NAME {
            return Err(bad(format!("unknown format {:?}", probe.format), false));
        }
        if probe.version != u64::from(REPO_FORMAT_VERSION)
            && probe.version != u64::from(ENCRYPTED_REPO_FORMAT_VERSION)
        {
            return Err(bad(
                format!(
                    "repository format version {} is not supported (this build reads {REPO_FORMAT_VERSION} and {ENCRYPTED_REPO_FORMAT_VERSION}); upgrade cbt",
                    probe.version
                ),
                true,
            ));
        }
        let config: RepoConfig =
            serde_json::from_slice(&body).map_err(|e| bad(e.to_string(), false))?;
        validate_chunk_size(config.chunk_size).map_err(|e| bad(e.to_string(), false))?;
        match (&config.encryption, config.version) {
            (None, REPO_FORMAT_VERSION) => {}
            (Some(enc), ENCRYPTED_REPO_FORMAT_VERSION) => {
                if enc.scheme != crate::crypto::SCHEME {
                    return Err(bad(
                        format!(
                            "encryption scheme {:?} is not supported; upgrade cbt",
                            cbt_core::text::escape(&enc.scheme)
                        ),
                        true,
                    ));
                }
            }
            (None, _) => {
                return Err(bad(
                    "version 2 (encrypted) without an `encryption` section".into(),
                    false,
                ));
            }
            (Some(_), _) => {
                return Err(bad(
                    "an `encryption` section in a version 1 (unencrypted) config".into(),
                    false,
                ));
            }
        }
        Ok(config)
    }
}

impl Repository {
    // ---- manifests -------------------------------------------------------------------------

    /// Whether a snapshot exists.
    ///
    /// # Errors
    /// Store errors.
    pub async fn snapshot_exists(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<bool> {
        let key = manifest_key(volume, snapshot);
        self.store
            .head(&key)
            .await
            .map(|m| m.is_some())
            .map_err(|e| RepoError::store(format!("checking snapshot {volume}/{snapshot}"), e))
    }

    /// Reads and decodes a snapshot's manifest, with its whole chunk map (the segments of a
    /// format-2 manifest are read and validated; memory follows the map).
    ///
    /// # Errors
    /// [`RepoError::SnapshotNotFound`]; [`RepoError::Manifest`] for an unreadable or
    /// future-version manifest or segment; [`RepoError::ManifestFraming`]; store errors.
    pub async fn load_manifest(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<Manifest> {
        match self.load_stored(volume, snapshot).await? {
            StoredManifest::V1(m) => Ok(m),
            StoredManifest::V2(head) => self.load_tree_manifest(head).await,
        }
    }

    /// Reads a snapshot's manifest object: a whole format-1 manifest or a format-2 head.
    ///
    /// # Errors
    /// As [`Repository::load_manifest`], except that no segment is read.
    pub async fn load_stored(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<StoredManifest> {
        let key = manifest_key(volume, snapshot);
        let body = match self.store.get_bounded(&key, MAX_MANIFEST_OBJECT_LEN).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => {
                return Err(RepoError::SnapshotNotFound {
                    volume: volume.to_string(),
                    snapshot: snapshot.to_string(),
                });
            }
            Err(e) => return Err(RepoError::store(format!("reading manifest {key}"), e)),
        };
        let body = self.codec.open_object(ObjectKind::Manifest, &key, body)?;
        let m = decode_stored_manifest(&key, &body)?;
        let (v, s) = match &m {
            StoredManifest::V1(m) => (&m.volume, &m.snapshot),
            StoredManifest::V2(h) => (&h.volume, &h.snapshot),
        };
        if v != volume || s != snapshot {
            return Err(RepoError::ManifestFraming {
                key,
                reason: format!("it describes {v}/{s}"),
            });
        }
        Ok(m)
    }

    /// Commits a manifest in format 2, making the snapshot visible: its map is written as a
    /// segment tree (segments already stored, e.g. shared with a parent, are not written
    /// again), then the head. Returns the metadata written.
    ///
    /// # Errors
    /// [`RepoError::SnapshotExists`] if the name is taken; store errors.
    ///
    /// # Guarantees
    /// Written with `IfAbsent`: an existing snapshot is never replaced. Call it only after
    /// every chunk the manifest references is stored, while holding the shared lock
    /// ([`Repository::lock_shared`]) taken before the first of those chunks was stored or
    /// found stored, and re-check under it that any parent it was derived from still exists
    /// with the same id: otherwise a GC may remove referenced chunks in between.
    /// [`crate::engine::backup`] does all this.
    pub async fn commit_manifest(&self, manifest: &Manifest) -> Result<MetadataWritten> {
        self.commit_manifest_head(manifest).await.map(|(_, w)| w)
    }

    /// [`Repository::commit_manifest`], also returning the head as committed.
    ///
    /// # Errors
    /// As [`Repository::commit_manifest`].
    pub async fn commit_manifest_head(
        &self,
        manifest: &Manifest,
    ) -> Result<(cbt_core::manifest::ManifestHead, MetadataWritten)> {
        let mut head = manifest.head();
        // Refused before anything is written, like every other invalid manifest.
        head.map = MapLocation::Tree { root: None };
        head.to_json()?;
        let (root, mut written) = self.write_tree(manifest).await?;
        head.map = MapLocation::Tree { root };
        written.head_bytes = self.commit_head(&head).await?;
        Ok((head, written))
    }

    /// Volumes that have at least one snapshot.
    ///
    /// # Errors
    /// Store errors.
    pub async fn list_volumes(&self) -> Result<Vec<VolumeName>> {
        let mut v: Vec<VolumeName> = self
            .manifest_keys(None)
            .await?
            .into_iter()
            .map(|(vol, _)| vol)
            .collect();
        v.dedup();
        Ok(v)
    }

    /// `(volume, snapshot)` of every manifest key, optionally for one volume, in key order.
    async fn manifest_keys(
        &self,
        volume: Option<&VolumeName>,
    ) -> Result<Vec<(VolumeName, SnapshotName)>> {
        Ok(self
            .manifest_listing(volume)
            .await?
            .into_iter()
            .map(|(v, s, _)| (v, s))
            .collect())
    }

    /// Like `manifest_keys`, with when the store last wrote each manifest (its own clock).
    async fn manifest_listing(
        &self,
        volume: Option<&VolumeName>,
    ) -> Result<Vec<(VolumeName, SnapshotName, Option<Timestamp>)>> {
        let prefix = match volume {
            Some(v) => format!("snapshots/{v}/"),
            None => "snapshots/".to_string(),
        };
        let objects = list_all(self.store.as_ref(), &prefix)
            .await
            .map_err(|e| RepoError::store(format!("listing {prefix}"), e))?;
        // Keys that are not valid names were not written by us; they are ignored, not trusted.
        Ok(objects
            .iter()
            .filter_map(|o| {
                let (v, s) = parse_manifest_key(&o.key)?;
                Some((v, s, o.last_modified.map(Timestamp::from_system_time)))
            })
            .collect())
    }

    /// Loads every manifest (optionally of one volume) into memory at once; prefer
    /// [`Repository::list_snapshots`] when summaries suffice.
    ///
    /// # Errors
    /// The first unreadable manifest, with its key; store errors.
    pub async fn load_manifests(&self, volume: Option<&VolumeName>) -> Result<Vec<Manifest>> {
        let keys = self.manifest_keys(volume).await?;
        futures::stream::iter(keys)
            .map(|(v, s)| async move { self.load_manifest(&v, &s).await })
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await
    }

    /// The heads of every snapshot (optionally of one volume): metadata without maps, so a
    /// format-2 repository reads one small object per snapshot.
    ///
    /// # Errors
    /// The first unreadable manifest, with its key; store errors.
    pub async fn load_heads(
        &self,
        volume: Option<&VolumeName>,
    ) -> Result<Vec<cbt_core::manifest::ManifestHead>> {
        let keys = self.manifest_keys(volume).await?;
        futures::stream::iter(keys)
            .map(|(v, s)| async move { self.load_head(&v, &s).await })
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Summaries of snapshots (optionally of one volume), oldest first within each volume.
    ///
    /// # Errors
    /// The first unreadable manifest, with its key; store errors.
    pub async fn list_snapshots(
        &self,
        volume: Option<&VolumeName>,
    ) -> Result<Vec<SnapshotSummary>> {
        let keys = self.manifest_keys(volume).await?;
        // Summaries only: each manifest is dropped as soon as it is summarized.
        let mut v: Vec<SnapshotSummary> = futures::stream::iter(keys)
            .map(|(v, s)| async move {
                self.load_manifest(&v, &s)
                    .await
                    .map(|m| SnapshotSummary::of(&m))
            })
            .buffered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        v.sort_by(|a, b| {
            (&a.volume, a.created, &a.snapshot).cmp(&(&b.volume, b.created, &b.snapshot))
        });
        Ok(v)
    }

    /// The newest snapshot of a volume (the natural parent of the next incremental).
    ///
    /// # Errors
    /// The first unreadable manifest; store errors.
    pub async fn latest_snapshot(&self, volume: &VolumeName) -> Result<Option<Manifest>> {
        let newest = self
            .list_snapshots(Some(volume))
            .await?
            .into_iter()
            .max_by(|a, b| (a.created, &a.snapshot).cmp(&(b.created, &b.snapshot)));
        match newest {
            Some(s) => Ok(Some(self.load_manifest(volume, &s.snapshot).await?)),
            None => Ok(None),
        }
    }

    /// The newest snapshot of `volume` taken from the CSI snapshot `csi_snapshot_id`
    /// (`source.csi_snapshot_id`): the parent to use for a delta whose base is that snapshot.
    /// Only summaries are held while searching.
    ///
    /// # Errors
    /// The first unreadable manifest; store errors.
    pub async fn find_by_csi_snapshot_id(
        &self,
        volume: &VolumeName,
        csi_snapshot_id: &str,
    ) -> Result<Option<SnapshotSummary>> {
        Ok(self
            .list_snapshots(Some(volume))
            .await?
            .into_iter()
            .rev()
            .find(|s| s.source.csi_snapshot_id.as_deref() == Some(csi_snapshot_id)))
    }

    /// Deletes one snapshot's manifest. Its chunks stay until garbage collection; other
    /// snapshots never depend on it (each manifest maps its whole volume).
    ///
    /// # Errors
    /// [`RepoError::SnapshotNotFound`]; store errors.
    pub async fn delete_snapshot(
        &self,
        volume: &VolumeName,
        snapshot: &SnapshotName,
    ) -> Result<()> {
        if !self.snapshot_exists(volume, snapshot).await? {
            return Err(RepoError::SnapshotNotFound {
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            });
        }
        let key = manifest_key(volume, snapshot);
        self.store
            .delete(&key)
            .await
            .map_err(|e| RepoError::store(format!("deleting manifest {key}"), e))
    }

    // ---- chunks ----------------------------------------------------------------------------

    /// Stores an encoded chunk unless an intact copy is already stored.
    ///
    /// Hold a shared lock ([`Repository::lock_shared`]) until the manifest referencing the
    /// chunk is committed: an unreferenced chunk is garbage to GC.
    ///
    /// While chunk puts keep finding their chunk stored, a `head` comes first so existing
    /// chunks cost no upload; after a run of new chunks the `head` is skipped (until a put finds its chunk
    /// stored again). A missing chunk is written with `IfAbsent`. An existing object whose
    /// size differs from this encoding is fetched and checked; if it is damaged (or gone) it
    /// is replaced by this (verified-by-construction) copy.
    ///
    /// # Errors
    /// Store errors, with the chunk key.
    pub async fn put_chunk(&self, encoded: EncodedChunk) -> Result<ChunkPut> {
        self.put_chunk_as(encoded, ChunkNovelty::Unknown).await
    }

    /// [`Repository::put_chunk`] for a chunk the caller knows more about: a
    /// [`ChunkNovelty::Changed`] chunk is created directly, without asking for it first,
    /// unless the last chunk put found its copy stored. A copy that turns
    /// out to be stored is still used (if intact) or repaired, as with `put_chunk`.
    ///
    /// # Errors
    /// Store errors, with the chunk key.
    pub async fn put_chunk_as(
        &self,
        encoded: EncodedChunk,
        novelty: ChunkNovelty,
    ) -> Result<ChunkPut> {
        let key = chunk::chunk_key(&encoded.chunk.hash);
        let ctx = |what: &str| format!("{what} chunk {key}");
        // Durable at the latest when a manifest is committed (`commit_manifest` syncs first).
        let chunk_put = |mode| PutOptions {
            mode,
            crc32c: Some(encoded.body_crc32c),
            defer_sync: true,
        };
        let stored_size = if self.dedup.ask_first(novelty) {
            self.store
                .head(&key)
                .await
                .map_err(|e| RepoError::store(ctx("checking"), e))?
                .map(|m| m.size)
        } else {
            None
        };
        // `None` from here on: a refused create found nothing left to check (deleted since).
        let stored_size = match stored_size {
            Some(size) => Some(size),
            None => match self
                .store
                .put_with(&key, encoded.body.clone(), chunk_put(PutMode::IfAbsent))
                .await
                .map_err(|e| RepoError::store(ctx("uploading"), e))?
            {
                PutOutcome::Created => {
                    self.dedup.record(false);
                    return Ok(ChunkPut {
                        chunk: encoded.chunk,
                        uploaded: true,
                    });
                }
                // Stored after all (skipped `head`, or another writer of the same content
                // won a race): use what is stored if it is intact (and still there).
                PutOutcome::AlreadyExists => self
                    .store
                    .head(&key)
                    .await
                    .map_err(|e| RepoError::store(ctx("checking"), e))?
                    .map(|m| m.size),
            },
        };
        self.dedup.record(true);
        if let Some(size) = stored_size
            && let Some(existing) = self.existing_chunk(&key, size, &encoded).await?
        {
            return Ok(ChunkPut {
                chunk: existing,
                uploaded: false,
            });
        }
        self.store
            .put_with(&key, encoded.body, chunk_put(PutMode::Overwrite))
            .await
            .map_err(|e| RepoError::store(ctx("repairing"), e))?;
        Ok(ChunkPut {
            chunk: encoded.chunk,
            uploaded: true,
        })
    }

    /// The reference of an already stored chunk, or `None` if the stored copy is damaged.
    async fn existing_chunk(
        &self,
        key: &str,
        size: u64,
        encoded: &EncodedChunk,
    ) -> Result<Option<ChunkRef>> {
        if size == encoded.chunk.stored_size {
            // Same content hash and same framed size: the same chunk (integrity of the stored
            // bytes is `verify`'s job; paying a download per chunk here would defeat dedup).
            return Ok(Some(encoded.chunk));
        }
        let body = match self
            .store
            .get_bounded(key, self.codec.max_chunk_object_len(encoded.chunk.raw_len))
            .await
        {
            Ok(b) => b,
            Err(e) if e.kind() == crate::store::ErrorKind::Integrity => return Ok(None),
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(RepoError::store(format!("reading chunk {key}"), e)),
        };
        let mut out = Vec::new();
        match self.codec.decode_standalone(key, &body, &mut out) {
            Ok(r) if r.hash == encoded.chunk.hash => Ok(Some(r)),
            _ => Ok(None),
        }
    }

    /// Downloads and fully verifies one chunk into `out`; `index`/`offset`/`snapshot` only
    /// give errors their context.
    ///
    /// # Errors
    /// [`RepoError::ChunkMissing`], [`RepoError::ChunkCorrupt`], store errors.
    pub async fn read_chunk(
        &self,
        expected: &ChunkRef,
        at: ChunkContext<'_>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let body = self.fetch_chunk_for_decode(expected, at).await?;
        self.codec.decode_chunk(body, expected, at, out)
    }

    /// Downloads one chunk object without decoding it, its bytes checked against the store's
    /// checksum (to decode it, [`Repository::fetch_chunk_for_decode`] saves that pass).
    ///
    /// # Errors
    /// [`RepoError::ChunkMissing`], [`RepoError::ChunkCorrupt`] if the store's own checksum
    /// fails, store errors.
    pub async fn fetch_chunk(&self, expected: &ChunkRef, at: ChunkContext<'_>) -> Result<Bytes> {
        let key = chunk::chunk_key(&expected.hash);
        let read = self.fetch_chunk_at(expected, at, None).await?;
        read.into_checked()
            .map_err(|e| chunk_fetch_error(expected, at, key, e))
    }

    /// Downloads one chunk object for [`Codec::decode_chunk`] (or its siblings), which
    /// compares it with the store's checksum in the pass that checks the object's own.
    ///
    /// # Errors
    /// [`RepoError::ChunkMissing`], [`RepoError::ChunkCorrupt`] if the object is larger than
    /// the reference says or its framing in the store is damaged, store errors.
    pub async fn fetch_chunk_for_decode(
        &self,
        expected: &ChunkRef,
        at: ChunkContext<'_>,
    ) -> Result<FetchedChunk> {
        Ok(self.fetch_chunk_at(expected, at, None).await?.into())
    }

    /// Like [`Repository::fetch_chunk_for_decode`], for a caller that writes the chunk with
    /// direct I/O: in an unencrypted repository the store is asked to place the payload at an
    /// aligned address (in a pooled buffer), so that a chunk stored raw can be written
    /// straight from the object (see [`Codec::decode_chunk_or_borrow`]).
    ///
    /// # Errors
    /// As [`Repository::fetch_chunk_for_decode`].
    pub async fn fetch_chunk_for_write(
        &self,
        expected: &ChunkRef,
        at: ChunkContext<'_>,
    ) -> Result<FetchedChunk> {
        // An encrypted chunk is opened in place into a buffer of its own: nothing to align.
        let aligned = (!self.codec.is_encrypted()).then_some(chunk::HEADER_LEN);
        Ok(self.fetch_chunk_at(expected, at, aligned).await?.into())
    }

    /// What reads chunks for direct-I/O writers on a blocking thread, where the store can
    /// ([`ObjectStore::reads_now`]): see [`ChunkReader`].
    pub fn chunk_reader(&self) -> ChunkReader {
        ChunkReader {
            store: self.store.clone(),
            aligned_at: (!self.codec.is_encrypted()).then_some(chunk::HEADER_LEN),
        }
    }

    /// Reads a chunk object, the comparison with the store's checksum left to the caller
    /// where the store allows it.
    async fn fetch_chunk_at(
        &self,
        expected: &ChunkRef,
        at: ChunkContext<'_>,
        aligned_at: Option<usize>,
    ) -> Result<UncheckedBody> {
        let key = chunk::chunk_key(&expected.hash);
        // The manifest says how large the object is; a larger one is not read at all.
        self.store
            .get_unchecked(&key, expected.stored_size, aligned_at)
            .await
            .map_err(|e| chunk_fetch_error(expected, at, key, e))
    }
}

/// Reads chunk objects as [`Repository::fetch_chunk_for_write`] does, on the calling
/// (blocking) thread, for a store that reads without waiting (a local directory): a restore
/// then reads, checks and writes a chunk in one blocking task instead of handing the read to
/// another thread first. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ChunkReader {
    store: Arc<dyn ObjectStore>,
    aligned_at: Option<usize>,
}

impl ChunkReader {
    /// Whether [`ChunkReader::read_now`] reads (else it always returns `None`).
    pub fn reads_now(&self) -> bool {
        self.store.reads_now()
    }

    /// The chunk object, read on this thread (which may block on disk I/O); `None` where the
    /// store cannot, or after a transient failure: fetch it then with
    /// [`Repository::fetch_chunk_for_write`], which retries.
    ///
    /// # Errors
    /// As [`Repository::fetch_chunk_for_write`].
    pub fn read_now(
        &self,
        expected: &ChunkRef,
        at: ChunkContext<'_>,
    ) -> Option<Result<FetchedChunk>> {
        let key = chunk::chunk_key(&expected.hash);
        match self
            .store
            .get_unchecked_now(&key, expected.stored_size, self.aligned_at)?
        {
            Ok(read) => Some(Ok(read.into())),
            Err(e) if e.is_transient() => None,
            Err(e) => Some(Err(chunk_fetch_error(expected, at, key, e))),
        }
    }
}

/// A failed chunk read as the repository reports it: a missing object as
/// [`RepoError::ChunkMissing`], damage as [`RepoError::ChunkCorrupt`] (the store's checksum
/// failing as [`ChunkDecodeError::StoredCrc`], whether the store or the decoder found it).
fn chunk_fetch_error(
    expected: &ChunkRef,
    at: ChunkContext<'_>,
    key: String,
    e: StoreError,
) -> RepoError {
    match e {
        StoreError::TooLarge { size, .. } => RepoError::ChunkCorrupt {
            snapshot: at.snapshot.to_string(),
            index: at.index,
            offset: at.offset,
            key,
            reason: ChunkDecodeError::Size {
                expected: expected.stored_size,
                actual: size.unwrap_or(u64::MAX),
            },
        },
        StoreError::NotFound { .. } => RepoError::ChunkMissing {
            snapshot: at.snapshot.to_string(),
            index: at.index,
            offset: at.offset,
            key,
        },
        StoreError::Corrupt {
            expected: stored,
            actual: computed,
            ..
        } => RepoError::ChunkCorrupt {
            snapshot: at.snapshot.to_string(),
            index: at.index,
            offset: at.offset,
            key,
            reason: ChunkDecodeError::StoredCrc { stored, computed },
        },
        e if e.kind() == crate::store::ErrorKind::Integrity => RepoError::ChunkCorrupt {
            snapshot: at.snapshot.to_string(),
            index: at.index,
            offset: at.offset,
            key,
            reason: ChunkDecodeError::Mismatch(e.to_string()),
        },
        e => RepoError::store(format!("reading chunk {key}"), e),
    }
}

/// What one listing page of up to 1000 chunks costs, in single-chunk `head` requests (server
/// work and round trips, measured on SeaweedFS: a page of 1000 about as much as 50 heads).
/// [`Repository::check_chunks_stored`] lists while that is the cheaper way.
const HEADS_PER_LIST_PAGE: usize = 32;

/// Where `hash` falls in the hash space, from 0 to 1: chunk names are uniformly spread, so a
/// listing that reached it has covered about that fraction of the chunks.
fn hash_fraction(hash: &ChunkHash) -> f64 {
    let mut top = [0_u8; 8];
    top.copy_from_slice(&hash.0[..8]);
    u64::from_be_bytes(top) as f64 / 18_446_744_073_709_551_616.0
}

/// One chunk reference to check, with where it sits (for the error).
#[derive(Debug, Clone, Copy)]
pub struct ChunkAt {
    /// Chunk index in the snapshot.
    pub index: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// The reference.
    pub chunk: ChunkRef,
}

impl Repository {
    /// Checks that every chunk in `refs` is stored with its recorded size, before a caller
    /// commits to using them (a restore before its first write, a backup before it commits).
    /// Lists `chunks/` while a listing page costs less than asking for the chunks it would
    /// answer for, and asks for the rest one by one (`concurrency` at a time).
    ///
    /// # Errors
    /// [`RepoError::ChunkMissing`] / [`RepoError::ChunkCorrupt`] (wrong size) for the first
    /// bad chunk in `refs` order, naming `snapshot`, its index and offset; store errors.
    pub async fn check_chunks_stored(
        &self,
        snapshot: &str,
        refs: &[ChunkAt],
        concurrency: usize,
    ) -> Result<()> {
        let mut distinct: BTreeMap<ChunkHash, usize> = BTreeMap::new();
        for (i, r) in refs.iter().enumerate() {
            distinct.entry(r.chunk.hash).or_insert(i);
        }
        // Listing `chunks/` in key order answers for every chunk up to the last key listed;
        // once the listing looks dearer than asking for the chunks left (estimated from how
        // much of the uniformly spread hash space the pages so far covered), those are asked
        // for one by one. Memory follows `refs`, not the size of the repository.
        let mut sizes: BTreeMap<ChunkHash, Option<u64>> =
            distinct.keys().map(|h| (*h, None)).collect();
        let mut unresolved: Vec<ChunkHash> = Vec::new();
        if distinct.len() < HEADS_PER_LIST_PAGE {
            unresolved.extend(distinct.keys().copied());
        } else {
            let mut pages = 0_usize;
            crate::store::list_pages(self.store.as_ref(), "chunks/", |page| {
                pages += 1;
                let mut last = None;
                for o in &page.objects {
                    if let Some(h) = chunk::parse_chunk_key(&o.key) {
                        if let Some(slot) = sizes.get_mut(&h) {
                            *slot = Some(o.size);
                        }
                        last = Some(h);
                    }
                }
                if page.next.is_none() {
                    return std::ops::ControlFlow::Break(());
                }
                // Chunks after the last key listed are still open.
                let open = match last {
                    Some(l) => sizes.range(l..).skip(1).count(),
                    None => sizes.len(),
                };
                let covered = last.map_or(0.0, |l| hash_fraction(&l));
                let pages_left = if covered > 0.0 {
                    pages as f64 / covered - pages as f64
                } else {
                    f64::INFINITY
                };
                if open == 0 || pages_left * HEADS_PER_LIST_PAGE as f64 > open as f64 {
                    if let Some(l) = last {
                        unresolved.extend(sizes.range(l..).skip(1).map(|(h, _)| *h));
                    } else {
                        unresolved.extend(sizes.keys().copied());
                    }
                    return std::ops::ControlFlow::Break(());
                }
                std::ops::ControlFlow::Continue(())
            })
            .await
            .map_err(|e| RepoError::store("listing chunks/", e))?;
        }
        if !unresolved.is_empty() {
            let store = &self.store;
            let found: Vec<(ChunkHash, Option<u64>)> = futures::stream::iter(unresolved)
                .map(|hash| async move {
                    let key = chunk::chunk_key(&hash);
                    store
                        .head(&key)
                        .await
                        .map(|m| (hash, m.map(|m| m.size)))
                        .map_err(|e| RepoError::store(format!("checking chunk {key}"), e))
                })
                .buffer_unordered(concurrency.max(1))
                .try_collect()
                .await?;
            sizes.extend(found);
        }
        for r in refs {
            let key = chunk::chunk_key(&r.chunk.hash);
            match sizes.get(&r.chunk.hash).copied().flatten() {
                None => {
                    return Err(RepoError::ChunkMissing {
                        snapshot: snapshot.to_string(),
                        index: r.index,
                        offset: r.offset,
                        key,
                    });
                }
                Some(size) if size != r.chunk.stored_size => {
                    return Err(RepoError::ChunkCorrupt {
                        snapshot: snapshot.to_string(),
                        index: r.index,
                        offset: r.offset,
                        key,
                        reason: ChunkDecodeError::Size {
                            expected: r.chunk.stored_size,
                            actual: size,
                        },
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Where a chunk sits, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct ChunkContext<'a> {
    /// `volume/snapshot`.
    pub snapshot: &'a str,
    /// Chunk index.
    pub index: u64,
    /// Byte offset in the volume.
    pub offset: u64,
}

/// Frames a manifest document for storage: `CBMF`, encoding byte 1, zstd(JSON).
pub(crate) fn frame_manifest_json(json: &[u8]) -> Result<Bytes> {
    let z = zstd::bulk::compress(json, 3).map_err(|e| RepoError::Internal {
        message: format!("compressing manifest: {e}"),
    })?;
    let mut body = Vec::with_capacity(z.len() + 5);
    body.extend_from_slice(&MANIFEST_MAGIC);
    body.push(MANIFEST_ENCODING_ZSTD_JSON);
    body.extend_from_slice(&z);
    Ok(Bytes::from(body))
}

/// Largest zstd window a manifest frame may ask for (16 MiB). Ours are compressed at level 3
/// (at most 2 MiB); the decoder allocates the window a frame header asks for, so a few
/// forged header bytes must not make it allocate the format's 128 MiB maximum.
const MANIFEST_WINDOW_LOG_MAX: u32 = 24;

/// Decodes a manifest object as stored (`CBMF`, encoding byte, zstd JSON), validating it
/// ([`Manifest::validate`]); `key` only names the object in errors. This is the one decoder
/// every manifest read goes through.
///
/// # Errors
/// [`RepoError::ManifestFraming`] for bad framing or an undecodable stream;
/// [`RepoError::UnsupportedObject`] for an unknown encoding; [`RepoError::Manifest`] for
/// anything the manifest decoder or [`Manifest::validate`] rejects.
pub fn decode_manifest(key: &str, body: &[u8]) -> Result<Manifest> {
    match decode_stored_manifest(key, body)? {
        StoredManifest::V1(m) => Ok(m),
        StoredManifest::V2(_) => Err(RepoError::Manifest {
            key: key.to_string(),
            source: cbt_core::CoreError::ManifestDecode {
                message: "a format-2 head: its chunk map is in segments".into(),
            },
        }),
    }
}

/// Decodes a manifest object of either format (a whole format-1 manifest, or a format-2
/// head whose segments are not read), as [`decode_manifest`] does.
///
/// # Errors
/// As [`decode_manifest`].
pub fn decode_stored_manifest(key: &str, body: &[u8]) -> Result<StoredManifest> {
    let framing = |reason: String| RepoError::ManifestFraming {
        key: key.to_string(),
        reason,
    };
    if body.len() < 5 || body[..4] != MANIFEST_MAGIC {
        return Err(framing("not a manifest object (bad magic)".into()));
    }
    if body[4] != MANIFEST_ENCODING_ZSTD_JSON {
        return Err(RepoError::UnsupportedObject {
            key: key.to_string(),
            reason: format!(
                "manifest encoding {} is unknown (written by a newer cbt?); upgrade cbt",
                body[4]
            ),
        });
    }
    // Streamed: the JSON is read no further than the geometry it declares allows, so a small
    // object that inflates to gigabytes fails after that many bytes, not after all of them.
    let mut decoder = zstd::stream::read::Decoder::with_buffer(&body[5..])
        .map_err(|e| framing(format!("cannot decompress: {e}")))?;
    decoder
        .window_log_max(MANIFEST_WINDOW_LOG_MAX)
        .map_err(|e| framing(format!("cannot decompress: {e}")))?;
    cbt_core::manifest::decode_json_reader(decoder).map_err(|source| RepoError::Manifest {
        key: key.to_string(),
        source,
    })
}

/// Chunks stored in the repository with their sizes and store-reported modification times
/// (one full listing of `chunks/`).
pub(crate) async fn stored_chunks(
    store: &dyn ObjectStore,
) -> Result<BTreeMap<ChunkHash, StoredChunk>> {
    let objects = list_all(store, "chunks/")
        .await
        .map_err(|e| RepoError::store("listing chunks/", e))?;
    Ok(objects
        .iter()
        .filter_map(|o| {
            let hash = chunk::parse_chunk_key(&o.key)?;
            Some((
                hash,
                StoredChunk {
                    hash,
                    size: o.size,
                    modified: o.last_modified.map(Timestamp::from_system_time),
                },
            ))
        })
        .collect())
}
