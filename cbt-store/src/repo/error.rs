//! The error type of the repository and the engine, and its classification for exit codes.

use std::path::PathBuf;

use cbt_core::{CoreError, RangeSet};

use crate::chunk::ChunkDecodeError;
use crate::crypto::{CryptoError, SealError};
use crate::repo::lock::HolderState;
use crate::store::{ErrorKind, StoreError};

/// Everything the repository and engine can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// An object-store call failed; `context` says what the repository was doing.
    #[error("{context}: {source}")]
    Store {
        /// What was being done, with names.
        context: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A pure-core check failed (bad range, name, chunk size, retention policy).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The store holds no repository.
    #[error("no repository found (no `config` object); initialize one first")]
    NotInitialized,
    /// `init` found an existing repository.
    #[error("a repository already exists here (id {id})")]
    AlreadyInitialized {
        /// Id of the existing repository.
        id: String,
    },
    /// The repository config is damaged or of a newer format.
    #[error("repository config: {reason}")]
    BadConfig {
        /// What is wrong.
        reason: String,
        /// True if it is a newer format version rather than damage.
        unsupported: bool,
    },
    /// No such snapshot.
    #[error("snapshot {volume}/{snapshot} not found")]
    SnapshotNotFound {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
    },
    /// A snapshot with this name already exists (snapshots are immutable).
    #[error("snapshot {volume}/{snapshot} already exists; choose another name")]
    SnapshotExists {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
    },
    /// A manifest object cannot be read.
    #[error("manifest `{key}`: {source}")]
    Manifest {
        /// Object key.
        key: String,
        /// Decode or version error.
        #[source]
        source: CoreError,
    },
    /// A manifest object's framing is damaged.
    #[error("manifest `{key}` is damaged: {reason}")]
    ManifestFraming {
        /// Object key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A stored chunk referenced by a snapshot is missing.
    #[error("snapshot {snapshot}: chunk {index} (offset {offset}) object `{key}` is missing")]
    ChunkMissing {
        /// `volume/snapshot`.
        snapshot: String,
        /// Chunk index.
        index: u64,
        /// Byte offset of the chunk in the volume.
        offset: u64,
        /// Object key.
        key: String,
    },
    /// A stored chunk failed an integrity check.
    #[error(
        "snapshot {snapshot}: chunk {index} (offset {offset}) object `{key}` is corrupt: {reason}"
    )]
    ChunkCorrupt {
        /// `volume/snapshot`.
        snapshot: String,
        /// Chunk index.
        index: u64,
        /// Byte offset of the chunk in the volume.
        offset: u64,
        /// Object key.
        key: String,
        /// What failed.
        reason: ChunkDecodeError,
    },
    /// Another process holds a conflicting lock.
    #[error(
        "repository is locked: {}; if that process is gone, break its lock by id", holders.join("; ")
    )]
    Locked {
        /// Descriptions of the conflicting locks.
        holders: Vec<String>,
    },
    /// `break_lock` refused: the holder is alive on this host, or its state cannot be told.
    #[error("{}", match state {
        HolderState::AliveHere => format!("refusing to break lock {id}: its holder is still running on this host ({holder}); breaking it would let prune delete data it is using"),
        HolderState::Unknown => format!("refusing to break lock {id}: cannot tell whether its holder is still running ({holder}); check that host first"),
    })]
    LockInUse {
        /// The lock's id.
        id: String,
        /// Who holds it (escaped for printing).
        holder: String,
        /// What is known about the holder.
        state: HolderState,
    },
    /// A backup's lock disappeared before it committed (broken by an operator): GC may have
    /// removed data it relies on, so nothing was committed.
    #[error(
        "the lock of {purpose} was broken while it ran; nothing was committed (GC may have removed data it relied on): run it again"
    )]
    LockLost {
        /// What the lock protected.
        purpose: String,
    },
    /// A restore into an existing device or file failed after writing to it.
    #[error(
        "restore to {path} failed after writing to it: {source}; {} of {volume_size} bytes hold the snapshot ({}), the rest ({}) holds the target's previous contents or partly written chunks",
        restored.total_bytes(),
        short_ranges(restored),
        short_ranges(&RangeSet::full(*volume_size).subtract(restored))
    )]
    RestoreIncomplete {
        /// Target path.
        path: PathBuf,
        /// Size of the snapshot's volume.
        volume_size: u64,
        /// Byte ranges that were completely written with the snapshot's contents.
        restored: RangeSet,
        /// What failed.
        #[source]
        source: Box<RepoError>,
    },
    /// Reading the backup source failed.
    #[error("reading {path} at offset {offset} ({len} bytes): {source}")]
    SourceIo {
        /// Source path.
        path: String,
        /// Offset of the failed read.
        offset: u64,
        /// Length of the failed read.
        len: u64,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Opening, sizing or writing the restore target failed.
    #[error("restore target {path}{}: {source}", offset.map(|o| format!(" at offset {o}")).unwrap_or_default())]
    TargetIo {
        /// Target path.
        path: PathBuf,
        /// Offset of the failed write, if any.
        offset: Option<u64>,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The restore target cannot hold the volume.
    #[error("restore target {path} holds {target_size} bytes but the snapshot needs {volume_size}")]
    TargetTooSmall {
        /// Target path.
        path: PathBuf,
        /// Its size.
        target_size: u64,
        /// Snapshot volume size.
        volume_size: u64,
    },
    /// The restore target exists and overwriting was not allowed.
    #[error("restore target {path} already exists; pass overwrite to replace its contents")]
    TargetExists {
        /// Target path.
        path: PathBuf,
    },
    /// The backup request is inconsistent (wrong parent volume, chunk size of a parent...).
    #[error("invalid request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// An object written by a newer format this build cannot read.
    #[error("object `{key}`: {reason}")]
    UnsupportedObject {
        /// Object key.
        key: String,
        /// What is unknown.
        reason: String,
    },
    /// The repository is encrypted and no key or password was supplied.
    #[error("the repository is encrypted and no password or key file was given")]
    KeyRequired,
    /// A key or password was supplied but the repository is not encrypted (refused, so a
    /// repository whose config was edited to drop encryption is never written to in the clear).
    #[error("a password or key file was given but the repository is not encrypted")]
    NotEncrypted,
    /// No key slot opens with the password.
    #[error(
        "wrong password: none of the repository's {slots} key slot(s) opens with it{}",
        if invalid.is_empty() { String::new() } else { format!(" ({} damaged slot(s) skipped: {})", invalid.len(), invalid.join("; ")) }
    )]
    WrongPassword {
        /// Usable slots tried.
        slots: usize,
        /// Slots skipped as damaged or out of bounds (`id: reason`, escaped).
        invalid: Vec<String>,
    },
    /// No key slot opens with the key file.
    #[error(
        "wrong key file: no key slot of this repository opens with key file {key_file_id} \
         ({slots} slot(s) made for it tried, {others} other slot(s)){}",
        if invalid.is_empty() { String::new() } else { format!(" ({} damaged slot(s) skipped: {})", invalid.len(), invalid.join("; ")) }
    )]
    WrongKeyFile {
        /// Id of the key file given.
        key_file_id: String,
        /// Slots made for this key file that were tried.
        slots: usize,
        /// Slots of passwords or other key files (not tried).
        others: usize,
        /// Slots skipped as damaged or out of bounds (`id: reason`, escaped).
        invalid: Vec<String>,
    },
    /// The key file being added already opens the repository.
    #[error("key file {key_file_id} already opens this repository (key slot {slot})")]
    KeyFileAlreadyAdded {
        /// Id of the key file.
        key_file_id: String,
        /// The slot made for it.
        slot: String,
    },
    /// The repository is encrypted but holds no key slot at all.
    #[error(
        "the repository is encrypted but has no key slot (`keys/` is empty): it cannot be opened with a password"
    )]
    NoKeySlot,
    /// A key opened but is not this repository's key (its key id differs from the config's).
    #[error(
        "the key from {source_desc} is not this repository's key (key id {found}, the config says {expected})"
    )]
    KeyMismatch {
        /// Which slot (or "the supplied key").
        source_desc: String,
        /// Key id of the key that opened.
        found: String,
        /// Key id in the config.
        expected: String,
    },
    /// A key slot is damaged or out of bounds.
    #[error("key slot {id} is unusable: {reason}")]
    KeySlotInvalid {
        /// Slot id (escaped).
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// No such key slot.
    #[error("no key slot {id}")]
    KeySlotNotFound {
        /// Slot id.
        id: String,
    },
    /// Refused removing the key slot that opened the repository.
    #[error(
        "key slot {id} is the one that opened the repository; open it with another password or key file to remove it"
    )]
    KeyInUse {
        /// Slot id.
        id: String,
    },
    /// Refused removing the last usable key slot (the data could never be read again).
    #[error(
        "key slot {id} is the repository's last usable key slot; add another password or key file first"
    )]
    LastKeySlot {
        /// Slot id.
        id: String,
    },
    /// More key slots than any repository of ours has.
    #[error("the repository lists {count} key slots, more than the {max} accepted")]
    TooManyKeySlots {
        /// Slots listed.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// Key handling failed (unusable password or password file, KDF parameters, RNG).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// An encrypted object (manifest, lock) failed to open.
    #[error("object `{key}`: {source}")]
    Sealed {
        /// Object key.
        key: String,
        /// What failed.
        #[source]
        source: SealError,
    },
    /// A bug: a worker task panicked, or encoding in memory failed.
    #[error("internal error: {message}")]
    Internal {
        /// What failed.
        message: String,
    },
}

impl RepoError {
    /// Wraps a store error with what the repository was doing.
    pub fn store(context: impl Into<String>, source: StoreError) -> Self {
        RepoError::Store {
            context: context.into(),
            source,
        }
    }

    /// Classifies the error in the toolkit's one vocabulary, for exit codes and retry
    /// decisions.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RepoError::Store { source, .. } => source.kind(),
            RepoError::Core(e) | RepoError::Manifest { source: e, .. } => e.kind(),
            RepoError::BadConfig { unsupported, .. } => {
                if *unsupported {
                    ErrorKind::Unsupported
                } else {
                    ErrorKind::Integrity
                }
            }
            RepoError::ChunkCorrupt {
                reason:
                    ChunkDecodeError::Version(_) | ChunkDecodeError::Sealed(SealError::Version(_)),
                ..
            }
            | RepoError::Sealed {
                source: SealError::Version(_),
                ..
            } => ErrorKind::Unsupported,
            RepoError::Sealed { .. }
            | RepoError::NoKeySlot
            | RepoError::KeyMismatch { .. }
            | RepoError::KeySlotInvalid { .. }
            | RepoError::TooManyKeySlots { .. } => ErrorKind::Integrity,
            // The password (or its absence) is the user's setup, like any credential.
            RepoError::KeyRequired
            | RepoError::NotEncrypted
            | RepoError::WrongPassword { .. }
            | RepoError::WrongKeyFile { .. }
            | RepoError::Crypto(CryptoError::BadPassword { .. })
            | RepoError::Crypto(CryptoError::PasswordFile { .. })
            | RepoError::Crypto(CryptoError::KeyFile { .. })
            | RepoError::Crypto(CryptoError::KeyFileWrite { .. }) => ErrorKind::Config,
            // Refusing to overwrite: the user named a path that is taken.
            RepoError::Crypto(CryptoError::KeyFileExists { .. }) => ErrorKind::Conflict,
            RepoError::KeyInUse { .. } | RepoError::LastKeySlot { .. } => ErrorKind::Usage,
            RepoError::KeySlotNotFound { .. } => ErrorKind::NotFound,
            RepoError::Crypto(CryptoError::Random) => ErrorKind::Bug,
            RepoError::Crypto(_) => ErrorKind::Usage,
            RepoError::ManifestFraming { .. }
            | RepoError::ChunkMissing { .. }
            | RepoError::ChunkCorrupt { .. } => ErrorKind::Integrity,
            RepoError::RestoreIncomplete { source, .. } => source.kind(),
            RepoError::Locked { .. }
            | RepoError::KeyFileAlreadyAdded { .. }
            | RepoError::LockInUse { .. }
            | RepoError::LockLost { .. }
            | RepoError::SnapshotExists { .. }
            | RepoError::AlreadyInitialized { .. } => ErrorKind::Conflict,
            RepoError::SourceIo { source, .. } | RepoError::TargetIo { source, .. } => {
                io_kind(source)
            }
            // No repository at the URL given: the URL (or a missing `cbt repo init`) is setup.
            RepoError::NotInitialized => ErrorKind::Config,
            RepoError::SnapshotNotFound { .. } => ErrorKind::NotFound,
            RepoError::TargetTooSmall { .. }
            | RepoError::TargetExists { .. }
            | RepoError::InvalidRequest { .. } => ErrorKind::Usage,
            RepoError::UnsupportedObject { .. } => ErrorKind::Unsupported,
            RepoError::Internal { .. } => ErrorKind::Bug,
        }
    }

    /// True when retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }

    /// What the user can do about it, in one line: the library knows the cause, so it says
    /// the remedy (`None` when the message says it all).
    pub fn guidance(&self) -> Option<String> {
        match self {
            RepoError::Store { source, .. } => source.guidance(),
            RepoError::NotInitialized => {
                Some("check --repo, or create it with `cbt repo init`".into())
            }
            RepoError::KeyRequired => Some(
                "set CBT_PASSWORD, or pass --password-file (CBT_PASSWORD_FILE) or --key-file \
                 (CBT_KEY_FILE)"
                    .into(),
            ),
            RepoError::WrongKeyFile { .. } => Some(
                "check --key-file / CBT_KEY_FILE; `cbt key list` shows the ids of the key files \
                 that open the repository"
                    .into(),
            ),
            RepoError::Crypto(CryptoError::KeyFile { .. }) => {
                Some("check --key-file / CBT_KEY_FILE: it must name a file cbt wrote".into())
            }
            RepoError::Crypto(CryptoError::KeyFileExists { .. }) => {
                Some("choose a path where nothing exists yet".into())
            }
            RepoError::WrongPassword { .. } => Some(
                "check CBT_PASSWORD / the password file; each password added with \
                 `cbt key add` opens the repository"
                    .into(),
            ),
            RepoError::NotEncrypted => Some(
                "unset CBT_PASSWORD / CBT_PASSWORD_FILE / CBT_KEY_FILE for this repository; if it was \
                 created encrypted, its config has been edited: restore it before writing"
                    .into(),
            ),
            RepoError::Crypto(CryptoError::BadPassword { .. })
            | RepoError::Crypto(CryptoError::PasswordFile { .. }) => {
                Some("check CBT_PASSWORD / the password file".into())
            }
            RepoError::KeyInUse { .. } | RepoError::LastKeySlot { .. } => Some(
                "to rotate a password or key file: `cbt key add` the new one, then `cbt key \
                 remove` the old slot while opening with the new one"
                    .into(),
            ),
            RepoError::KeySlotNotFound { .. } => Some("see `cbt key list`".into()),
            RepoError::Locked { .. } => Some(
                "another cbt process is using the repository; if it died, see `cbt lock list` \
                 and `cbt lock break <id>`"
                    .into(),
            ),
            _ => match self.kind() {
                ErrorKind::Integrity => {
                    Some("run `cbt verify --read-data` to list every damaged object".to_string())
                }
                ErrorKind::Transient => Some(
                    "retry; an interrupted backup resumes without re-uploading stored chunks"
                        .to_string(),
                ),
                ErrorKind::Unsupported => Some("upgrade cbt".to_string()),
                _ => None,
            },
        }
    }
}

/// A missing path, a denied permission or a device shorter than expected will fail the same
/// way on retry: the operator must act. Anything else (EIO, timeouts of network block devices,
/// interrupted calls) may pass on a later attempt.
fn io_kind(e: &std::io::Error) -> ErrorKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound
        | K::PermissionDenied
        | K::InvalidInput
        | K::UnexpectedEof
        | K::ReadOnlyFilesystem
        | K::IsADirectory
        | K::NotADirectory
        | K::StorageFull
        | K::FileTooLarge => ErrorKind::Usage,
        _ => ErrorKind::Transient,
    }
}

/// At most a few ranges of a set, for messages (`[0, 4096), [8192, 12288), … (17 ranges)`).
fn short_ranges(set: &RangeSet) -> String {
    const SHOWN: usize = 4;
    if set.is_empty() {
        return "none".into();
    }
    let mut s: Vec<String> = set.iter().take(SHOWN).map(ToString::to_string).collect();
    if set.len() > SHOWN {
        s.push(format!("… ({} ranges)", set.len()));
    }
    s.join(", ")
}

/// Result alias for repository and engine operations.
pub type Result<T, E = RepoError> = std::result::Result<T, E>;
