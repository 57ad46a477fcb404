//! The one error type of `cbt-core` and its coarse classification.
//!
//! Every variant carries the values a user needs to act on it (the offending name, offset,
//! version, chunk index). Callers branch on [`CoreError::kind`], never on message text.

/// What a caller can do about a failure: the one vocabulary every crate of the toolkit
/// (`cbt-core`, `cbt-csi`, `cbt-store`, `cbt-k8s`) classifies its errors into, so an embedding
/// tool branches on one enum, and every binary turns it into the one exit-code table
/// ([`crate::exit::ExitClass`] implements `From<ErrorKind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is wrong (a name, range, flag, policy, a target too small): fix the request.
    Usage,
    /// What the request names does not exist (an object, a snapshot).
    NotFound,
    /// Configuration: endpoint, credentials, password, TLS, kubeconfig, RBAC, a missing CRD,
    /// driver or class.
    Config,
    /// Stored or read data is damaged or inconsistent: repair needed.
    Integrity,
    /// A peer (a metadata service, an API server) broke its protocol: report it to its
    /// maintainers.
    Protocol,
    /// Retry later: throttling, timeouts, 5xx, dropped connections, I/O that may pass.
    Transient,
    /// Someone else holds or changed what this needs: a lock, an object that exists and differs.
    Conflict,
    /// Not supported: written by a newer version of this software, or a feature the peer does
    /// not offer (no changed-block tracking for a volume).
    Unsupported,
    /// The storage system, snapshot controller or a Job reported a failure of its own.
    Backend,
    /// The caller (or a signal) stopped the operation.
    Cancelled,
    /// A bug in this software.
    Bug,
}

impl ErrorKind {
    /// True when the same operation may succeed if retried later.
    pub fn is_transient(self) -> bool {
        self == Self::Transient
    }

    /// Short snake-case name, as JSON documents write it (`error.kind`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Usage => "usage",
            Self::NotFound => "not_found",
            Self::Config => "config",
            Self::Integrity => "integrity",
            Self::Protocol => "protocol",
            Self::Transient => "transient",
            Self::Conflict => "conflict",
            Self::Unsupported => "unsupported",
            Self::Backend => "backend",
            Self::Cancelled => "cancelled",
            Self::Bug => "bug",
        }
    }
}

/// Errors produced by the pure core.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoreError {
    /// A byte range of length zero was given where every range must hold data.
    #[error("empty byte range at offset {offset}: length must be > 0")]
    EmptyRange {
        /// Start of the rejected range.
        offset: u64,
    },
    /// `offset + len` does not fit in 64 bits.
    #[error("byte range at offset {offset} with length {len} overflows u64")]
    RangeOverflow {
        /// Start of the rejected range.
        offset: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A signed extent (as CSI sends them) had a negative offset or length.
    #[error("negative extent: offset {offset}, length {len}")]
    NegativeExtent {
        /// Offset as received.
        offset: i64,
        /// Length as received.
        len: i64,
    },
    /// A byte range reaches past the end of the volume.
    #[error("range [{start}, {end}) reaches past the end of the volume ({volume_size} bytes)")]
    RangePastEnd {
        /// Start of the offending range.
        start: u64,
        /// End (exclusive) of the offending range.
        end: u64,
        /// Size of the volume.
        volume_size: u64,
    },
    /// A chunk size outside the supported set.
    #[error("invalid chunk size {size}: must be a power of two between {min} and {max} bytes")]
    InvalidChunkSize {
        /// The rejected size.
        size: u64,
        /// Smallest accepted size.
        min: u64,
        /// Largest accepted size.
        max: u64,
    },
    /// A name that would be unsafe or ambiguous inside an object key.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// Which kind of name (volume, snapshot, label key...).
        what: &'static str,
        /// The rejected name (escaped by `{:?}` when printed).
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A content hash that is not 64 lowercase hex digits.
    #[error("invalid chunk hash {value:?}: expected 64 lowercase hex digits")]
    InvalidHash {
        /// The rejected text.
        value: String,
    },
    /// The manifest was written with a format version this build cannot read.
    #[error(
        "manifest format version {found} is not supported (this build reads versions {min_supported}..={max_supported}); upgrade cbt"
    )]
    UnsupportedManifestVersion {
        /// Version found in the manifest.
        found: u64,
        /// Oldest version this build reads.
        min_supported: u32,
        /// Newest version this build reads.
        max_supported: u32,
    },
    /// The manifest bytes are not a well-formed manifest.
    #[error("manifest cannot be decoded: {message}")]
    ManifestDecode {
        /// What the decoder said.
        message: String,
    },
    /// The manifest decodes but breaks an invariant (bad index, wrong chunk length, ...).
    #[error("manifest is inconsistent: {reason}")]
    ManifestInvalid {
        /// The broken invariant, with values.
        reason: String,
    },
    /// A chunk index at or beyond the number of chunks in the volume.
    #[error("chunk index {index} out of range: volume has {chunk_count} chunks")]
    ChunkIndexOutOfRange {
        /// The offending index.
        index: u64,
        /// Number of chunks in the volume.
        chunk_count: u64,
    },
    /// A stored chunk's raw length disagrees with the volume geometry.
    #[error("chunk {index}: raw length {raw_len} but the geometry says {expected}")]
    ChunkLengthMismatch {
        /// Chunk index.
        index: u64,
        /// Length recorded for the chunk.
        raw_len: u64,
        /// Length the volume geometry requires.
        expected: u64,
    },
    /// A child snapshot cannot be derived from this parent.
    #[error("cannot derive snapshot from parent {parent:?}: {reason}")]
    IncompatibleParent {
        /// Name of the parent snapshot.
        parent: String,
        /// Why not.
        reason: String,
    },
    /// Two references to the same content hash disagree about what is stored under it.
    #[error(
        "chunk {hash} is recorded at index {first_index} as {first} and at index {index} as {other}; one content hash must have one raw length, stored size and checksum"
    )]
    ConflictingChunkRefs {
        /// The content hash.
        hash: String,
        /// First index that references it.
        first_index: u64,
        /// How the first index records it (`raw/stored/crc`).
        first: String,
        /// A later index that records it differently.
        index: u64,
        /// How that index records it.
        other: String,
    },
    /// A stored chunk's recorded object size cannot hold its data (or is absurdly large).
    #[error(
        "chunk {index}: stored size {stored_size} is impossible for {raw_len} raw bytes (must be 1..={max})"
    )]
    StoredSizeOutOfBounds {
        /// Chunk index.
        index: u64,
        /// Recorded stored size.
        stored_size: u64,
        /// Recorded raw length.
        raw_len: u64,
        /// Largest stored size the format allows for this raw length.
        max: u64,
    },
    /// The manifest text is larger than any manifest of its geometry can be.
    #[error(
        "manifest is larger than {limit} bytes{}, more than any manifest can need; refusing to decode it",
        chunk_count.map(|c| format!(" (the limit for {c} chunks)")).unwrap_or_default()
    )]
    ManifestTooLarge {
        /// The limit that was exceeded, in bytes of JSON.
        limit: u64,
        /// Chunk count the limit was derived from, once the geometry was known.
        chunk_count: Option<u64>,
    },
    /// A segment of a format-2 manifest's chunk map failed a check (see
    /// [`crate::maptree::decode_segment`]).
    #[error("manifest segment at level {level}, chunk index {first_index} is invalid: {reason}")]
    SegmentInvalid {
        /// Level of the segment (0 = leaf).
        level: u8,
        /// First chunk index its position covers.
        first_index: u64,
        /// The check that failed.
        reason: String,
    },
    /// A segment of an encoding version this build does not know.
    #[error(
        "manifest segment encoding version {found} is not supported (this build reads {supported}); upgrade cbt"
    )]
    UnsupportedSegmentVersion {
        /// Version found.
        found: u8,
        /// Version this build reads.
        supported: u8,
    },
    /// A retention policy with no rule, which would delete every snapshot.
    #[error(
        "retention policy has no rule (keep-last / keep-within); refusing to delete everything"
    )]
    EmptyRetentionPolicy,
}

impl CoreError {
    /// Classifies the error for callers that react by kind (retry, fix input, repair).
    pub fn kind(&self) -> ErrorKind {
        match self {
            CoreError::UnsupportedManifestVersion { .. }
            | CoreError::UnsupportedSegmentVersion { .. } => ErrorKind::Unsupported,
            CoreError::ManifestDecode { .. }
            | CoreError::ManifestInvalid { .. }
            | CoreError::ChunkLengthMismatch { .. }
            | CoreError::ConflictingChunkRefs { .. }
            | CoreError::StoredSizeOutOfBounds { .. }
            | CoreError::ManifestTooLarge { .. }
            | CoreError::SegmentInvalid { .. } => ErrorKind::Integrity,
            _ => ErrorKind::Usage,
        }
    }
}
